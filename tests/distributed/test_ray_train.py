"""Training through Ray Train (`TorchTrainer`, 2 CPU workers, gloo) with lfdist's own rank code.

FSDP2 and DeepSpeed ZeRO-2 on tiny:llama with the bottom 5 of 8 blocks frozen: both ranks report,
optimizer state covers only the trainable parameters (sharded), backward never runs below the
boundary, frozen weights are bit-identical afterwards, and both engines give the same losses.
"""

from __future__ import annotations

import os

import pytest

from lfdist.config import config_from_dict
from lfdist.errors import UserError
from lfdist.job import Job
from lfdist.model.tiny import build_tiny
from lfdist.plan import save_plan
from tests.helpers import make_plan, slow_job_script

pytestmark = pytest.mark.ray

PREFIX = ["frozen"] * 5 + ["full"] * 3


def _cfg(engine: str):
    return config_from_dict(
        {
            "model": {"spec": "tiny:llama"},
            "data": {"spec": "synthetic:lm:120", "seq_len": 32},
            "train": {
                "engine": engine,
                "zero_stage": 2,
                "nproc": 2,
                "steps": 2,
                "batch_size": 2,
                "lr": 1e-3,
                "launcher": "ray",
            },
        }
    )


def _trainable_elements() -> int:
    from lfdist.model.apply import apply_plan

    model = build_tiny("llama", "lm")
    return apply_plan(model, make_plan(model, PREFIX)).trainable


@pytest.fixture(scope="module")
def local_ray():
    pytest.importorskip("ray")
    from lfdist.orchestrate.cluster import start, stop

    started = start(num_cpus=2)
    yield
    stop(started)


def _train(tmp_path, engine: str, check_frozen: bool = True) -> dict:
    from lfdist.job import Debug
    from lfdist.orchestrate.train import ray_train

    plan = str(tmp_path / "plan.yaml")
    save_plan(make_plan(build_tiny("llama", "lm"), PREFIX), plan)
    return ray_train(
        Job(
            _cfg(engine),
            plan,
            str(tmp_path / "run"),
            evaluate=False,
            debug=Debug(check_frozen=check_frozen),
        )
    )


def _check_run(m: dict) -> None:
    trainable = _trainable_elements()
    ranks = m["per_rank"]
    assert m["world_size"] == 2 and [r["rank"] for r in ranks] == [0, 1]
    # ZeRO pads its partitions; the unpadded count is exact (FSDP2 shards have no padding).
    opt = [
        r["after_step"].get(
            "optimizer_state_elements_unpadded", r["after_step"]["optimizer_state_elements"]
        )
        for r in ranks
    ]
    assert sum(opt) == 2 * trainable  # AdamW: two states per trainable element, no frozen one
    assert all(o < 2 * trainable for o in opt)  # sharded
    assert ranks[0]["backward_blocks"] == [5, 6, 7]  # never below the boundary
    assert m["params"]["trainable"] == trainable
    assert list(m["losses"]) == ["0", "1"]


@pytest.fixture(scope="module")
def fsdp2_run(local_ray, tmp_path_factory) -> dict:
    return _train(tmp_path_factory.mktemp("fsdp2"), "fsdp2")


def test_ray_train_fsdp2(fsdp2_run):
    _check_run(fsdp2_run)
    assert fsdp2_run["engine"] == "fsdp2"
    assert fsdp2_run["frozen_digest"]["before"] == fsdp2_run["frozen_digest"]["after"] is not None


@pytest.mark.deepspeed
def test_ray_train_deepspeed_zero2(local_ray, fsdp2_run, tmp_path):
    pytest.importorskip("deepspeed")
    m = _train(tmp_path, "deepspeed")
    _check_run(m)
    assert m["engine"] == "deepspeed" and m["zero_stage"] == 2
    for step, loss in fsdp2_run["losses"].items():  # same data, same math, another engine
        assert m["losses"][step] == pytest.approx(loss, rel=1e-5), step
    assert m["frozen_digest"]["before"] == m["frozen_digest"]["after"] is not None


def test_bad_plan_is_refused_before_ray_starts(tmp_path):
    from lfdist.orchestrate.train import ray_train

    out = tmp_path / "run"
    with pytest.raises(UserError, match="does not exist"):
        ray_train(Job(_cfg("fsdp2"), str(tmp_path / "missing.yaml"), str(out)))
    assert not os.path.exists(out)


@pytest.mark.slow
def test_sigterm_stops_ray_train_at_a_step_with_a_checkpoint(tmp_path):
    """Ray Train runs each rank in a worker thread (no signal handlers there): the launching
    process turns SIGTERM into a stop request in out/, every rank stops at one step boundary
    with a checkpoint, and --resume continues it."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from lfdist.orchestrate.train import ray_train

    root = Path(__file__).resolve().parents[2]
    plan, out = str(tmp_path / "plan.yaml"), tmp_path / "run"
    save_plan(make_plan(build_tiny("llama", "lm"), PREFIX), plan)
    cfg = _cfg("fsdp2").to_dict()
    cfg["train"].update(steps=40, save_every=1)
    code = slow_job_script("lfdist.orchestrate.train:ray_train", cfg, plan, str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        end = time.monotonic() + 240
        while not (out / "checkpoints" / "latest").exists() and time.monotonic() < end:
            time.sleep(0.2)
        assert (out / "checkpoints" / "latest").exists(), "training did not start"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    latest = (out / "checkpoints" / "latest").read_text()
    step = int(latest.removeprefix("step-"))
    assert 1 <= step < 40
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"lfdist: stopped by SIGTERM; checkpoint after step {step} in "), line
    assert not (out / ".stop").exists()  # the request does not outlive the job
    resumed = ray_train(Job(config_from_dict(cfg), plan, str(out), resume=True, evaluate=False))
    assert resumed["resumed_from"] == step
    assert list(resumed["losses"]) == [str(i) for i in range(40)]
