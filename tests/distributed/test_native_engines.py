"""2-rank gloo runs of DDP, FSDP1 and FSDP2 through the real launcher and worker.

Exact facts: optimizer state only for trainable parameters (sharded by FSDP), no gradient on
frozen ones, frozen weights bit-identical, backward never below the boundary, losses equal to
a single-process run with the same global batch, exact resume, exported folder loads.
"""

import json
import os

import pytest
import torch

from lfdist.config import config_from_dict
from lfdist.errors import UserError
from lfdist.job import Debug, Job
from lfdist.launch.run import launch_training
from lfdist.model.tiny import build_tiny
from lfdist.plan import save_plan
from tests.helpers import make_plan

PREFIX = ["frozen"] * 5 + ["full"] * 3
FULL = ["full"] * 8
GAPPY = ["frozen", "full", "frozen", "frozen", "full", "frozen", "full", "frozen"]


def _cfg(engine, nproc=2, steps=3, batch_size=2, **train):
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
                **train,
            },
        }
    )


def _plan(tmp_path, treatments, name="plan.yaml"):
    path = str(tmp_path / name)
    save_plan(make_plan(build_tiny("llama", "lm"), treatments), path)
    return path


def _train(tmp_path, engine, treatments, out="run", **kw):
    debug = Debug(check_frozen=True, stop_after=kw.pop("stop_after", None))
    return launch_training(
        Job(_cfg(engine, **kw), _plan(tmp_path, treatments), str(tmp_path / out), debug=debug)
    )


def _trainable_elements(treatments):
    model = build_tiny("llama", "lm")
    from lfdist.model.apply import apply_plan

    return apply_plan(model, make_plan(model, treatments)).trainable


@pytest.fixture(scope="module")
def single_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    return {
        name: launch_training(
            Job(
                _cfg("single", nproc=1, batch_size=4),
                _plan(tmp, t, f"{name}.yaml"),
                str(tmp / name),
                debug=Debug(check_frozen=True),
            )
        )
        for name, t in (("prefix", PREFIX), ("gappy", GAPPY), ("full", FULL))
    }


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "fsdp1"])
@pytest.mark.parametrize(
    "plan_name, treatments", [("prefix", PREFIX), ("gappy", GAPPY), ("full", FULL)]
)
def test_engine_exact_facts(tmp_path, single_reference, engine, plan_name, treatments):
    m = _train(tmp_path, engine, treatments)
    trainable = _trainable_elements(treatments)
    ranks = m["per_rank"]
    assert len(ranks) == 2
    opt = [r["after_step"]["optimizer_state_elements"] for r in ranks]
    grads = [r["after_backward"]["grad_elements"] for r in ranks]
    if engine == "ddp":
        assert opt == [2 * trainable] * 2  # AdamW: exp_avg + exp_avg_sq, replicated
        assert grads == [trainable] * 2
    else:
        assert sum(opt) == 2 * trainable  # sharded: each rank holds its share only
        assert sum(grads) == trainable
        assert all(o < 2 * trainable for o in opt)
    assert m["frozen_digest"]["before"] == m["frozen_digest"]["after"]
    lowest = treatments.index("full")
    assert ranks[0]["backward_blocks"] == list(range(lowest, 8))  # never below the boundary
    ref = single_reference[plan_name]["losses"]
    for step, loss in m["losses"].items():
        assert loss == pytest.approx(ref[step], rel=1e-5), step
    assert m["params"]["trainable"] == trainable
    _assert_trainable_changed(tmp_path / "run", treatments)
    # The cost model's gradient and optimizer-state bytes are what the ranks hold.
    pred = _predicted(treatments, engine)
    assert sum(r["after_backward"]["grad_bytes"] for r in ranks) == 2 * pred["grads"]
    assert sum(r["after_step"]["optimizer_state_bytes"] for r in ranks) == 2 * pred["optimizer"]


def _assert_trainable_changed(run, treatments):
    trained = _trained(run / "checkpoints/step-000003")
    base = build_tiny("llama", "lm").state_dict()
    block_weights = [n for n in trained if n.startswith("model.layers.")]
    assert {int(n.split(".")[2]) for n in block_weights} == {
        i for i, t in enumerate(treatments) if t != "frozen"
    }
    assert all(
        not torch.equal(trained[n], base[n]) for n in block_weights if n.endswith("proj.weight")
    )


def _trained(step_folder) -> dict[str, torch.Tensor]:
    """The trained tensors of a (sharded) checkpoint, read back in one process."""
    from lfdist.engines.shards import TrainedWeights

    weights = TrainedWeights(str(step_folder))
    return weights.read(weights.shapes)


def _predicted(treatments, engine):
    from lfdist.cost import predict
    from lfdist.model.info import model_info
    from lfdist.plan import DEFAULT_MODULES

    info = model_info(build_tiny("llama", "lm"), "lm")
    return predict(
        info,
        treatments,
        DEFAULT_MODULES,
        engine=engine,
        world_size=2,
        dtype="float32",
        batch_size=2,
        seq_len=32,
    )["bytes"]


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_resume_is_exact(tmp_path, engine):
    straight = _train(tmp_path, engine, PREFIX, out="straight", steps=6)
    _train(tmp_path, engine, PREFIX, out="resumed", steps=6, stop_after=3)
    resumed = launch_training(
        Job(
            _cfg(engine, steps=6),
            str(tmp_path / "plan.yaml"),
            str(tmp_path / "resumed"),
            resume=True,
        )
    )
    assert resumed["resumed_from"] == 3
    assert list(resumed["losses"]) == [str(i) for i in range(6)]
    for step in straight["losses"]:
        assert resumed["losses"][step] == pytest.approx(
            straight["losses"][step], rel=1e-6, abs=1e-7
        )
    a = _trained(tmp_path / "straight/checkpoints/step-000006")
    b = _trained(tmp_path / "resumed/checkpoints/step-000006")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)


def test_existing_run_is_not_overwritten(tmp_path):
    _train(tmp_path, "ddp", PREFIX, steps=1)
    before = (tmp_path / "run/metrics.json").read_text()
    with pytest.raises(UserError, match="already holds a run"):
        _train(tmp_path, "ddp", PREFIX, steps=1)
    assert (tmp_path / "run/metrics.json").read_text() == before
    assert json.loads(before)["losses"]


@pytest.mark.parametrize(
    "engine, stage", [("ddp", 2), ("fsdp2", 2), ("fsdp1", 2), ("deepspeed", 3)]
)
def test_activation_checkpointing_keeps_losses_and_boundary(
    tmp_path, single_reference, engine, stage
):
    m = _train(tmp_path, engine, PREFIX, activation_checkpointing=True, zero_stage=stage)
    assert m["checkpointed_blocks"] == [5, 6, 7]
    assert m["per_rank"][0]["backward_blocks"] == [5, 6, 7]
    assert m["frozen_digest"]["before"] == m["frozen_digest"]["after"]
    ref = single_reference["prefix"]["losses"]
    for step, loss in m["losses"].items():
        assert loss == pytest.approx(ref[step], rel=1e-5), step


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_through_the_launcher(tmp_path, single_reference, stage):
    """The real `deepspeed` launcher path: frozen weights bit-identical, optimizer state only for
    trainable parameters (partitioned), backward above the boundary, losses as single-process."""
    m = _train(tmp_path, "deepspeed", PREFIX, zero_stage=stage)
    trainable = _trainable_elements(PREFIX)
    ranks = m["per_rank"]
    assert sum(r["after_step"]["optimizer_state_elements_unpadded"] for r in ranks) == 2 * trainable
    assert m["frozen_digest"]["before"] == m["frozen_digest"]["after"]
    assert ranks[0]["backward_blocks"] == [5, 6, 7]
    for step, loss in m["losses"].items():
        assert loss == pytest.approx(single_reference["prefix"]["losses"][step], rel=1e-5)


@pytest.mark.deepspeed
def test_deepspeed_zero3_resume_is_exact(tmp_path):
    straight = _train(tmp_path, "deepspeed", PREFIX, out="straight", steps=6, zero_stage=3)
    _train(
        tmp_path,
        "deepspeed",
        PREFIX,
        out="resumed",
        steps=6,
        zero_stage=3,
        stop_after=3,
    )
    resumed = launch_training(
        Job(
            _cfg("deepspeed", steps=6, zero_stage=3),
            str(tmp_path / "plan.yaml"),
            str(tmp_path / "resumed"),
            resume=True,
        )
    )
    assert resumed["resumed_from"] == 3
    for step in straight["losses"]:
        assert resumed["losses"][step] == pytest.approx(
            straight["losses"][step], rel=1e-6, abs=1e-7
        )
    # Each rank wrote its ZeRO-3 partitions of the trained weights; they assemble whole.
    parts = sorted(os.listdir(tmp_path / "straight/checkpoints/step-000006/weights"))
    assert parts == ["rank-00000.safetensors", "rank-00001.safetensors"]
    a = _trained(tmp_path / "straight/checkpoints/step-000006")
    b = _trained(tmp_path / "resumed/checkpoints/step-000006")
    assert a.keys() == b.keys() and len(a) == 29
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)
    # The export of a ZeRO-3 run: the trained tensors from those partitions, the rest the base.
    from safetensors.torch import load_file

    from lfdist.model.source import ModelSource
    from lfdist.train.export import export

    exported = load_file(
        os.path.join(export(str(tmp_path / "straight"), str(tmp_path / "hf")), "model.safetensors")
    )
    base = load_file(os.path.join(ModelSource("tiny:llama").weights_folder(), "model.safetensors"))
    assert exported.keys() == base.keys()
    for name, tensor in exported.items():
        assert torch.equal(tensor, a[name] if name in a else base[name]), name


def test_nan_loss_stops_before_the_step_and_writes_no_exploded_checkpoint(tmp_path):
    # lr=1e30: step 0's update gives weights of ~1e30 and step 1's forward NaN. The state after
    # step 0 is checkpointed only once step 1's loss is finite, so no checkpoint holds it (before,
    # step-000001 was written with those weights and --resume failed the same way at once).
    with pytest.raises(UserError, match="loss became nan at step 1, before its optimizer step"):
        launch_training(
            Job(
                _cfg("ddp", steps=4, save_every=1, lr=1e30, max_grad_norm=0.0),
                _plan(tmp_path, PREFIX),
                str(tmp_path / "run"),
            )
        )
    root = tmp_path / "run/checkpoints"
    assert not root.exists() or not [p for p in root.iterdir() if p.name.startswith("step-")]


@pytest.mark.parametrize(
    "engine", ["ddp", "fsdp2", pytest.param("deepspeed", marks=pytest.mark.deepspeed)]
)
def test_prefix_cache_gives_the_same_losses_over_two_epochs(tmp_path, engine):
    # deepspeed: ZeRO-2 (the stage README's prefix-cache line names; ZeRO-3 is refused).
    def run(out, **kw):
        cfg = config_from_dict(
            {
                "model": {"spec": "tiny:llama"},
                "data": {"spec": "synthetic:lm:30", "seq_len": 32, "max_examples": 20},
                "train": {
                    "engine": engine,
                    "zero_stage": 2,
                    "nproc": 2,
                    "steps": 2 * 5 + 1,
                    "batch_size": 2,
                    "lr": 1e-3,
                    **kw,
                },
            }
        )
        return launch_training(
            Job(cfg, _plan(tmp_path, PREFIX), str(tmp_path / out), evaluate=True)
        )

    plain = run("plain")
    assert plain["data"]["n_examples"] == 20  # capped: 5 steps an epoch, 11 steps span 3 epochs
    cached = run("cached", cache_frozen_prefix=True)
    # Epoch 1 records (each rank keeps every rank's examples), later epochs replay.
    assert cached["prefix_cache"] == {"hits": 12, "misses": 10, "spilled": False}
    for step, loss in plain["losses"].items():
        assert cached["losses"][step] == pytest.approx(loss, rel=1e-5), step
    assert cached["eval"]["loss"] == pytest.approx(plain["eval"]["loss"], rel=1e-5)
    if engine == "fsdp2":  # the same cache as a memory-mapped file per rank on disk
        spill = tmp_path / "spill"
        spill.mkdir()
        spilled = run("spilled", cache_frozen_prefix=True, cache_spill_dir=str(spill))
        assert spilled["prefix_cache"] == {"hits": 12, "misses": 10, "spilled": True}
        assert spilled["losses"] == cached["losses"]
        assert list(spill.iterdir()) == []  # each rank's file was unlinked once mapped
