"""Sharded checkpoints through the real launcher (2-rank gloo): each rank writes its own shards,
FSDP2 resumes on another world size through DCP with the losses of an undisturbed run, and
the export of a sharded run is a standard HF folder whose untrained tensors are the base
model's, byte for byte."""

import os

import pytest
import torch

from lfdist.config import config_from_dict
from lfdist.job import Debug, Job
from lfdist.launch.run import launch_training
from lfdist.model.tiny import build_tiny
from lfdist.plan import save_plan
from tests.helpers import make_plan

PREFIX = ["frozen"] * 5 + ["full"] * 3


def _cfg(engine="fsdp2", nproc=2, batch_size=2, steps=6):
    return config_from_dict(
        {
            "model": {"spec": "tiny:llama"},
            "data": {"spec": "synthetic:lm:200", "seq_len": 32},
            "train": {
                "engine": engine,
                "nproc": nproc,
                "steps": steps,
                "batch_size": batch_size,
                "lr": 1e-3,
            },
        }
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    plan = str(tmp / "plan.yaml")
    save_plan(make_plan(build_tiny("llama", "lm"), PREFIX), plan)
    metrics = launch_training(Job(_cfg(), plan, str(tmp / "run"), evaluate=False))
    return tmp, plan, metrics


def test_each_rank_writes_its_own_shards(straight):
    tmp, _, _ = straight
    folder = tmp / "run/checkpoints/step-000006"
    assert sorted(os.listdir(folder / "dcp")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (folder / "trainable.safetensors").exists()  # nothing gathered to rank 0
    from lfdist.engines.shards import TrainedWeights

    # The trained tensors: the 3 trained blocks' 9 tensors each, the final norm and the head.
    names = set(TrainedWeights(str(folder)).shapes)
    assert len(names) == 29
    assert {n.split(".")[2] for n in names if n.startswith("model.layers.")} == {"5", "6", "7"}


@pytest.mark.parametrize(
    "engine",
    [
        "fsdp2",
        pytest.param("fsdp1", marks=pytest.mark.slow),
        pytest.param("ddp", marks=pytest.mark.slow),
    ],
)
def test_resume_on_another_world_size_gives_the_same_losses(straight, tmp_path, engine):
    _, plan, undisturbed = straight  # FSDP2's losses: every engine gives them (to 1e-5)
    out = str(tmp_path / "resumed")
    launch_training(Job(_cfg(engine), plan, out, evaluate=False, debug=Debug(stop_after=3)))
    # One rank, the same global batch (1 x 4 = 2 x 2): DCP reshards the 2-rank checkpoint.
    one = _cfg(engine, nproc=1, batch_size=4)
    resumed = launch_training(Job(one, plan, out, resume=True, evaluate=False))
    assert resumed["resumed_from"] == 3
    assert resumed["world_size"] == 1
    assert list(resumed["losses"]) == [str(i) for i in range(6)]
    for step in ("3", "4", "5"):
        assert resumed["losses"][step] == pytest.approx(undisturbed["losses"][step], rel=1e-5)


def test_export_of_a_sharded_run_is_the_base_outside_the_trained_blocks(straight, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from lfdist.engines.shards import TrainedWeights
    from lfdist.model.source import ModelSource
    from lfdist.train.export import export

    tmp, _, _ = straight
    hf = export(str(tmp / "run"), str(tmp_path / "hf"))
    base_folder = ModelSource("tiny:llama").weights_folder()
    with safe_open(os.path.join(base_folder, "model.safetensors"), "pt") as f:
        base = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(os.path.join(hf, "model.safetensors"), "pt") as f:
        exported = {k: f.get_tensor(k) for k in f.keys()}
    assert exported.keys() == base.keys()
    trained_folder = str(tmp / "run/checkpoints/step-000006")
    weights = TrainedWeights(trained_folder)
    trained = weights.read(weights.shapes)
    for name, tensor in exported.items():
        if name in trained:
            assert torch.equal(tensor, trained[name]), name
            assert not torch.equal(tensor, base[name]), name
        else:  # byte for byte the base file's tensor
            assert tensor.dtype == base[name].dtype
            assert tensor.view(torch.uint8).numpy().tobytes() == (
                base[name].view(torch.uint8).numpy().tobytes()
            ), name
    assert sum(name in trained for name in exported) == 29
    model = AutoModelForCausalLM.from_pretrained(hf)
    state = model.state_dict()
    assert torch.equal(
        state["model.layers.7.mlp.up_proj.weight"], trained["model.layers.7.mlp.up_proj.weight"]
    )
    assert torch.equal(
        state["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"]
    )
