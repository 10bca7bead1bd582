"""lfdist export in one process: a checkpoint of engine `single` becomes an HF folder whose
untrained tensors are the base files' bytes; a bad --out is one line and leaves nothing."""

import os

import pytest
import torch

from lfdist.config import TrainConfig, config_from_dict
from lfdist.engines import build_engine
from lfdist.engines.base import World
from lfdist.errors import UserError
from lfdist.model.apply import apply_plan
from lfdist.model.source import ModelSource
from lfdist.model.tiny import build_tiny
from lfdist.plan import save_plan
from lfdist.train.checkpoint import save_checkpoint
from lfdist.train.export import export
from tests.helpers import make_plan

WORLD = World(0, 1, 0, torch.device("cpu"))
TOP2 = ["frozen"] * 6 + ["full"] * 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    model = ModelSource("tiny:llama").load_whole()
    apply_plan(model, make_plan(model, TOP2))
    engine = build_engine("single", model, None, TrainConfig(engine="single", lr=1e-2), WORLD)
    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    engine.micro_step({"input_ids": x, "labels": x}, 1.0)
    engine.optimizer_step()
    plan = str(tmp / "plan.yaml")
    save_plan(make_plan(build_tiny("llama", "lm"), TOP2), plan)
    cfg = config_from_dict({"model": {"spec": "tiny:llama"}}).to_dict()
    extra = {"engine": "single", "model": cfg["model"], "config": cfg}
    save_checkpoint(str(tmp / "run/checkpoints"), 1, engine, WORLD, plan, extra)
    return tmp, engine.full_trainable_state()


def test_export_overlays_the_trained_tensors_on_the_base_bytes(run, tmp_path):
    from safetensors.torch import load_file

    tmp, trained = run
    hf = export(str(tmp / "run"), str(tmp_path / "hf"))
    # the weights with the same mode as the rest of the export (safetensors wrote them 0600)
    modes = {n: os.stat(os.path.join(hf, n)).st_mode & 0o777 for n in os.listdir(hf)}
    assert len(set(modes.values())) == 1 and modes["config.json"] & 0o044, modes
    assert sorted(os.listdir(hf)) == [
        "config.json",
        "generation_config.json",
        "lfdist_export.json",
        "lfdist_tokenizer.json",
        "model.safetensors",
    ]
    out = load_file(os.path.join(hf, "model.safetensors"))
    base = load_file(os.path.join(ModelSource("tiny:llama").weights_folder(), "model.safetensors"))
    assert out.keys() == base.keys()
    assert sorted(n for n in out if n in trained) == sorted(trained)  # 2 blocks, norm, head
    assert len(trained) == 2 * 9 + 2
    for name, tensor in out.items():
        expected = trained[name] if name in trained else base[name]
        assert tensor.numpy().tobytes() == expected.numpy().tobytes(), name


def test_export_to_a_file_or_under_one_is_one_line_and_writes_nothing(run, tmp_path):
    tmp, _ = run
    target = tmp_path / "a-file"
    target.write_text("mine")
    with pytest.raises(UserError, match="exists and is not an empty folder"):
        export(str(tmp / "run"), str(target))
    with pytest.raises(UserError, match="cannot write the export folder"):
        export(str(tmp / "run"), str(target / "hf"))
    assert sorted(os.listdir(tmp_path)) == ["a-file"] and target.read_text() == "mine"
