"""train.compile: every block torch.compile'd before FSDP2 wraps it trains with the losses of the
eager run (CPU inductor; the GPU benchmark measures its speed)."""

import pytest

from lfdist.config import config_from_dict
from lfdist.errors import UserError
from lfdist.job import Job
from lfdist.launch.run import launch_training
from lfdist.model.tiny import build_tiny
from lfdist.plan import save_plan
from tests.helpers import make_plan


def _run(tmp_path, compile_: bool):
    cfg = config_from_dict(
        {
            "model": {"spec": "tiny:llama"},
            "data": {"spec": "synthetic:lm:64", "seq_len": 32},
            "train": {"engine": "fsdp2", "nproc": 1, "steps": 3, "batch_size": 2, "lr": 1e-3,
                      "compile": compile_},
        }
    )  # fmt: skip
    plan = str(tmp_path / "plan.yaml")
    save_plan(make_plan(build_tiny("llama", "lm"), ["frozen"] * 5 + ["full"] * 3), plan)
    return launch_training(Job(cfg, plan, str(tmp_path / f"run-{compile_}"), evaluate=False))


def test_compiled_blocks_train_with_the_eager_losses(tmp_path):
    eager = _run(tmp_path, False)
    compiled = _run(tmp_path, True)
    assert list(compiled["losses"].values()) == pytest.approx(
        list(eager["losses"].values()), rel=1e-5
    )
    assert compiled["per_rank"][0]["backward_blocks"] == [5, 6, 7]  # truncation holds


def test_compile_on_deepspeed_is_one_line():
    with pytest.raises(UserError, match="train.compile is for ddp, fsdp1, fsdp2 and single"):
        config_from_dict({"train": {"engine": "deepspeed", "compile": True}})
