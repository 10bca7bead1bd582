"""A lisa plan through the real launcher on 2 ranks: the trained set follows the schedule, every
block lands in the checkpoint, and a run resumed in the middle of a period is exact."""

import pytest
import torch

from lfdist.config import config_from_dict
from lfdist.job import Debug, Job
from lfdist.launch.run import launch_training
from lfdist.lisa_draw import lisa_blocks
from lfdist.model.tiny import build_tiny
from lfdist.plan import save_plan
from tests.helpers import make_plan

OPTIONS = {"n": 2, "period": 2, "seed": 2}  # draws [2, 6], [6, 7], [3, 5]


def _cfg(engine):
    train = {"engine": engine, "nproc": 2, "steps": 6, "batch_size": 2, "lr": 1e-3}
    return config_from_dict(
        {
            "model": {"spec": "tiny:llama"},
            "data": {"spec": "synthetic:lm:200", "seq_len": 32},
            "train": {**train, "save_every": 3},
        }
    )


def _trained(step_folder) -> dict[str, torch.Tensor]:
    from lfdist.engines.shards import TrainedWeights

    weights = TrainedWeights(str(step_folder))
    return weights.read(weights.shapes)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_lisa_run_resumes_exactly_and_keeps_every_block(tmp_path, engine):
    first = lisa_blocks(8, 2, 2, 2, 0)
    treatments = ["full" if i in first else "frozen" for i in range(8)]
    plan = make_plan(build_tiny("llama", "lm"), treatments, strategy="lisa", options=OPTIONS)
    save_plan(plan, str(tmp_path / "plan.yaml"))
    plan_path = str(tmp_path / "plan.yaml")
    straight = launch_training(Job(_cfg(engine), plan_path, str(tmp_path / "a"), evaluate=False))
    expected = {"0": [2, 6], "1": [2, 6], "2": [6, 7], "3": [6, 7], "4": [3, 5], "5": [3, 5]}
    assert straight["trained_blocks"] == expected
    assert straight["lrs"] == {"full": 1e-3}
    # stopped at step 3, inside the [6, 7] period (block 6 carried over with its state)
    launch_training(
        Job(_cfg(engine), plan_path, str(tmp_path / "b"), evaluate=False, debug=Debug(stop_after=3))
    )
    resumed = launch_training(
        Job(_cfg(engine), plan_path, str(tmp_path / "b"), resume=True, evaluate=False)
    )
    assert resumed["resumed_from"] == 3
    assert resumed["losses"] == straight["losses"]  # bit for bit
    a = _trained(tmp_path / "a/checkpoints/step-000006")
    b = _trained(tmp_path / "b/checkpoints/step-000006")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    base = build_tiny("llama", "lm").state_dict()
    saved = {int(n.split(".")[2]) for n in a if n.startswith("model.layers.")}
    changed = {
        int(n.split(".")[2])
        for n in a
        if n.startswith("model.layers.") and not torch.equal(a[n], base[n])
    }
    assert saved == set(range(8))  # the checkpoint holds every block, trained or not
    assert changed == {2, 3, 5, 6, 7}  # exactly the blocks some period trained
