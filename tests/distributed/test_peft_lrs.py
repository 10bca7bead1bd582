"""Per-treatment learning rates reach every engine (FSDP2 and DeepSpeed ZeRO-2/3 build the same
groups) and metrics.json reports them; DeepSpeed refuses a lisa plan in one line before launching."""

import pytest

from lfdist.config import config_from_dict
from lfdist.errors import UserError
from lfdist.job import Job
from lfdist.launch.run import launch_training
from lfdist.model.tiny import build_tiny
from lfdist.plan import save_plan
from tests.helpers import make_plan

PEFT = ["frozen"] * 4 + ["bias"] * 2 + ["lora", "full"]


def _cfg(engine, **train):
    base = {"engine": engine, "nproc": 2, "steps": 2, "batch_size": 2, "lr": 1e-3}
    return config_from_dict(
        {
            "model": {"spec": "tiny:llama"},
            "data": {"spec": "synthetic:lm:200", "seq_len": 32},
            "train": {**base, **train},
        }
    )


def _plan(tmp_path, treatments, **fields):
    path = str(tmp_path / "plan.yaml")
    save_plan(make_plan(build_tiny("llama", "lm"), treatments, **fields), path)
    return path


@pytest.mark.parametrize(
    "engine, stage",
    [
        ("fsdp2", 2),
        pytest.param("deepspeed", 2, marks=pytest.mark.deepspeed),
        pytest.param("deepspeed", 3, marks=[pytest.mark.deepspeed, pytest.mark.slow]),
    ],
)
def test_every_engine_trains_each_treatment_at_its_lr(tmp_path, engine, stage):
    # the plan's lr_scale (as select writes it) and a config override: lora 4x, bias 2e-3
    plan = _plan(tmp_path, PEFT, options={"lr_scale": {"lora": 4.0, "bias": 10.0}})
    cfg = _cfg(engine, zero_stage=stage, lr_bias=2e-3)
    m = launch_training(Job(cfg, plan, str(tmp_path / "run"), evaluate=False))
    assert m["lrs"] == {"full": 1e-3, "bias": 2e-3, "lora": 4e-3}
    assert sorted(m["losses"]) == ["0", "1"]


def test_deepspeed_refuses_lisa_before_launching(tmp_path):
    plan = _plan(
        tmp_path,
        ["frozen"] * 6 + ["full"] * 2,
        strategy="lisa",
        options={"n": 2, "period": 2, "seed": 0},
    )
    with pytest.raises(
        UserError,
        match="lisa re-draws its trainable blocks every period, which DeepSpeed cannot do",
    ):
        launch_training(Job(_cfg("deepspeed"), plan, str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()  # refused before anything was written
