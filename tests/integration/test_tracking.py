"""train.report_to: out/metrics.jsonl on every run, a TensorBoard event file TensorBoard reads,
and one line for a tracker that is not installed."""

import json

import pytest

from lfdist.config import config_from_dict
from lfdist.errors import UserError
from lfdist.job import Job
from lfdist.launch.run import launch_training
from lfdist.model.tiny import build_tiny
from lfdist.plan import save_plan
from tests.helpers import make_plan


def _run(tmp_path, **train):
    cfg = config_from_dict(
        {
            "model": {"spec": "tiny:llama"},
            "data": {"spec": "synthetic:lm:64", "seq_len": 32},
            "train": {"engine": "fsdp2", "nproc": 2, "steps": 4, "batch_size": 2, **train},
        }
    )
    plan = str(tmp_path / "plan.yaml")
    save_plan(make_plan(build_tiny("llama", "lm"), ["frozen"] * 6 + ["full"] * 2), plan)
    return launch_training(Job(cfg, plan, str(tmp_path / "run"), evaluate=False))


def test_metrics_jsonl_and_tensorboard_from_rank_zero(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = _run(tmp_path, report_to="tensorboard", log_every=2)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [2, 4]  # the log interval, from rank 0 only
    for r in records:
        assert r["loss"] == pytest.approx(metrics["losses"][str(r["step"] - 1)])
        assert set(r["lr"]) == {"full"} and r["lr"]["full"] > 0
        assert r["grad_norm"] > 0 and r["step_time_s"] > 0 and r["peak_memory_gib"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 * 2 * 32 / r["step_time_s"])
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [2, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert "lr/full" in events.Tags()["scalars"]


def test_unknown_or_missing_tracker_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="'tensorbord' is not a tracker"):
        config_from_dict({"train": {"report_to": "tensorbord"}})
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a)
    )
    with pytest.raises(UserError, match="names wandb, which is not installed; pip install wandb"):
        _run(tmp_path, report_to="wandb")
    assert not (tmp_path / "run").exists()  # refused before anything was written
