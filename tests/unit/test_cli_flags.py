"""The CLI's config flags: one table, every key real, flags applied after --config and the
dotted overrides, typed (the sections' own checks run)."""

import dataclasses

import pytest

from lfdist.cli import _config, _parse
from lfdist.cli_flags import CONFIG_FLAGS
from lfdist.config import RunConfig, config_from_dict, with_values
from lfdist.errors import UserError


def test_every_flag_sets_a_real_config_key():
    sections = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    cfg = RunConfig()
    for command, flags in CONFIG_FLAGS.items():
        for flag, key, _ in flags:
            section, name = key.split(".")
            assert section in sections, (command, flag)
            assert hasattr(getattr(cfg, section), name), (command, flag, key)


def test_flags_win_over_overrides_and_land_typed(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  steps: 3\n  engine: ddp\n")
    args = _parse(
        ["train", "--model", "tiny:llama", "--data", "synthetic:lm", "--plan", "p.yaml"]
        + ["--config", str(config), "train.steps=5", "--steps", "7", "--out", "o"]
        + ["--eval-data", "synthetic:lm:40", "--activation-checkpointing"]
    )
    cfg = _config(args)
    assert cfg.train.steps == 7  # the flag, over the override, over the file
    assert cfg.train.engine == "ddp"  # the file, where no flag or override says otherwise
    assert cfg.data.eval_spec == "synthetic:lm:40"
    assert cfg.train.activation_checkpointing is True
    assert cfg.train.cache_frozen_prefix is False  # a flag not given changes nothing


def test_with_values_reruns_the_sections_checks():
    cfg = config_from_dict({})
    assert with_values(cfg, {"train.nproc": 4}).train.nproc == 4
    with pytest.raises(UserError, match="train.steps"):
        with_values(cfg, {"train.steps": 0})
