"""probe -> select -> 2-rank training for every strategy that trains, on tiny:llama (lm) and
tiny:bert (classify): frozen weights bit-identical, backward never below the plan's boundary."""

from __future__ import annotations

import pytest

from lfdist import pipeline
from lfdist.config import config_from_dict
from lfdist.job import Debug, Job
from lfdist.launch.run import launch_training
from lfdist.plan import load_plan

STRATEGIES = [
    "top",
    "bottom",
    "all",
    "random",
    "gradnorm",
    "salf",
    "spafit",
    "critical",
    "mask",
    "lora",
    "lisa",
]
MODELS = {
    "llama": ("tiny:llama", "lm", "synthetic:lm:200"),
    "bert": ("tiny:bert", "classify", "synthetic:classify:200"),
}


def _cfg(name: str, engine: str = "fsdp2"):
    spec, task, data = MODELS[name]
    return config_from_dict(
        {
            "model": {"spec": spec, "task": task},
            "data": {"spec": data, "seq_len": 32},
            "probe": {
                "samples": 32,
                "gradnorm": True,
                "critical_steps": 3,
                "pilot_steps": 2,
                "pilot_depths": "1,2,4",
            },
            "train": {"engine": engine, "nproc": 2, "steps": 2, "batch_size": 2, "lr": 1e-3},
        }
    )


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    out = {}
    for name in MODELS:
        path = str(tmp_path_factory.mktemp(name) / "probe.json")
        pipeline.probe(_cfg(name), path, progress=False)
        out[name] = path
    return out


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_trains_on_two_ranks(tmp_path, probes, model, strategy):
    # bias/lora/mask treatments mix frozen and trainable parameters inside a block: FSDP2 handles it.
    cfg = _cfg(model)
    plan_path = str(tmp_path / "plan.yaml")
    pipeline.select(probes[model], strategy, {}, {"engine": "fsdp2", "world_size": 2}, plan_path)
    plan = load_plan(plan_path)
    m = launch_training(
        Job(cfg, plan_path, str(tmp_path / "run"), evaluate=False, debug=Debug(check_frozen=True))
    )
    assert m["frozen_digest"]["before"] == m["frozen_digest"]["after"] is not None
    assert list(m["losses"]) == ["0", "1"]  # both steps ran (a non-finite loss stops the run)
    # Backward runs from the top down to the boundary and no further, through every block between.
    assert m["per_rank"][0]["backward_blocks"] == list(range(plan.boundary, 8))
    trainable = m["params"]["trainable"]
    assert sum(r["after_step"]["optimizer_state_elements"] for r in m["per_rank"]) == 2 * trainable
