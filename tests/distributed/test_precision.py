"""Mixed precision on 2-rank gloo runs: a bf16 model trains with fp32 master weights, fp32
gradients and fp32 AdamW states for its trainable parameters only; frozen parameters stay bf16
(bit for bit), with no master copy and no state. Pure bf16 stays an opt-in."""

import pytest

from lfdist.config import config_from_dict
from lfdist.job import Debug, Job
from lfdist.launch.run import launch_training
from lfdist.model.tiny import build_tiny
from lfdist.plan import save_plan
from tests.helpers import make_plan

PREFIX = ["frozen"] * 5 + ["full"] * 3


def _run(tmp_path, engine, precision="auto", nproc=2, batch_size=2, **train):
    cfg = config_from_dict(
        {
            "model": {"spec": "tiny:llama", "dtype": "bfloat16"},
            "data": {"spec": "synthetic:lm:200", "seq_len": 32},
            "train": {
                "engine": engine,
                "nproc": nproc,
                "steps": 3,
                "batch_size": batch_size,
                "lr": 1e-3,
                "precision": precision,
                **train,
            },
        }
    )
    plan = str(tmp_path / "plan.yaml")
    save_plan(make_plan(build_tiny("llama", "lm"), PREFIX), plan)
    out = str(tmp_path / f"{engine}-{precision}-{nproc}")
    return launch_training(Job(cfg, plan, out, evaluate=False, debug=Debug(check_frozen=True)))


def _totals(metrics, when):
    ranks = [r[when] for r in metrics["per_rank"]]
    sharded = metrics["engine"].startswith("fsdp")
    pick = (lambda k: sum(r[k] for r in ranks)) if sharded else (lambda k: ranks[0][k])
    return {k: pick(k) for k in ranks[0]}


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "fsdp1"])
def test_bf16_mixed_keeps_fp32_masters_for_trainable_parameters_only(tmp_path, engine):
    m = _run(tmp_path, engine)
    after = _totals(m, "after_step")
    backward = _totals(m, "after_backward")
    trainable, frozen = after["trainable_params"], after["frozen_params"]
    assert trainable == m["params"]["trainable"] and frozen > trainable
    assert after["trainable_param_bytes"] == 4 * trainable  # fp32 master weights
    assert after["frozen_param_bytes"] == 2 * frozen  # bf16, no master copy
    assert backward["grad_bytes"] == 4 * backward["grad_elements"] == 4 * trainable
    # exp_avg + exp_avg_sq in fp32: 8 bytes per trainable parameter, none for frozen ones
    assert after["optimizer_state_bytes"] == 8 * trainable
    assert m["frozen_digest"]["before"] == m["frozen_digest"]["after"]
    assert all(r["backward_blocks"] == [5, 6, 7] for r in m["per_rank"])


def test_bf16_mixed_two_ranks_equal_one_rank_and_differ_from_pure(tmp_path):
    two = _run(tmp_path, "fsdp2")
    one = _run(tmp_path, "single", nproc=1, batch_size=4)
    pure = _run(tmp_path, "fsdp2", precision="bf16")
    losses = [list(m["losses"].values()) for m in (two, one, pure)]
    # bf16 compute: the same global batch split over 2 ranks rounds a little differently
    assert losses[0] == pytest.approx(losses[1], abs=2e-2)
    after = _totals(pure, "after_step")
    assert after["trainable_param_bytes"] == 2 * after["trainable_params"]
    assert after["optimizer_state_bytes"] == 4 * after["trainable_params"]  # pure bf16 states
    assert losses[2][0] == pytest.approx(losses[0][0], abs=2e-2)  # same weights at step 0
