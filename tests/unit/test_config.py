import pytest

from lfdist.config import RunConfig, config_from_dict, load_config, merge_overrides
from lfdist.errors import UserError


def test_defaults_and_overrides():
    cfg = config_from_dict(
        {"train": {"steps": 5}}, ["train.lr=1e-5", "model.spec=tiny:gpt2", "select.budget.blocks=3"]
    )
    assert cfg.train.steps == 5
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.model.spec == "tiny:gpt2"
    assert cfg.select.budget == {"blocks": 3}
    assert isinstance(cfg, RunConfig)


def test_int_for_float_is_accepted():
    assert config_from_dict({"train": {"lr": 1}}).train.lr == 1.0


@pytest.mark.parametrize(
    "data, overrides, needle",
    [
        ({"trian": {}}, [], "unknown config key trian"),
        ({"train": {"stpes": 3}}, [], "unknown config key train.stpes"),
        ({}, ["train.lrr=1"], "unknown config key train.lrr"),
        ({"train": {"steps": "ten"}}, [], "train.steps must be int"),
        ({"train": {"engine": "horovod"}}, [], "train.engine='horovod' is not allowed"),
        ({"train": {"steps": 0}}, [], "train.steps must be a positive number"),
        ({"model": {"task": "seq2seq"}}, [], "model.task"),
        ({"train": 3}, [], "must be a mapping"),
        ({}, ["train.lr"], "must look like section.key=value"),
    ],
)
def test_bad_config_is_one_clear_error(data, overrides, needle):
    with pytest.raises(UserError) as e:
        config_from_dict(data, overrides)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_config(str(p))


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_overrides_do_not_mutate_input():
    data = {"train": {"steps": 3}}
    merge_overrides(data, ["train.steps=4"])
    assert data == {"train": {"steps": 3}}
