"""Ray probing on a 2-node `ray.cluster_utils.Cluster` (one CPU per node) on this machine.

Every sharded run joins the cluster by `probe.ray_address` and puts one actor on each node; the
merged statistics must equal the in-process probe's to 1e-6 relative and give the same plan.
Layer streaming must give the same statistics holding at most one block + embeddings + head,
an actor killed mid-probe must be replaced without changing the result, and the salf pilots run
as one Ray task per depth must give the serial gain curve.
"""

from __future__ import annotations

import os

import pytest
import torch

from lfdist.config import config_from_dict
from lfdist.errors import UserError
from lfdist.probe import run_probe
from lfdist.select import select_plan
from lfdist.train.prepare import prepare

pytestmark = pytest.mark.ray

CASES = {
    "llama": ("tiny:llama", "lm", "synthetic:lm:120"),
    "bert": ("tiny:bert", "classify", "synthetic:classify:120"),
}
SAMPLES, BATCH = 40, 8
REL = 1e-6


def _cfg(name: str, **probe):
    spec, task, data = CASES[name]
    return config_from_dict(
        {
            "model": {"spec": spec, "task": task},
            "data": {"spec": data, "seq_len": 32},
            "probe": {
                "samples": SAMPLES,
                "batch_size": BATCH,
                "orchestrator": "ray",
                "workers": 2,
                **probe,
            },
        }
    )


def _in_process(cfg):
    p = prepare(cfg)
    return run_probe(
        p.loaded.model,
        p.train,
        cfg.model.task,
        batch_size=BATCH,
        samples=SAMPLES,
        progress=False,
        gradnorm=cfg.probe.gradnorm,
        data_fingerprint=p.data_info["fingerprint"],
    )


def assert_same_stats(got, ref) -> float:
    """Every statistic equal to REL (normwise relative); returns the worst relative error."""
    worst = 0.0
    for field in ("count", "examples", "n_latent", "hidden", "num_labels", "grad_batches"):
        assert getattr(got.stats, field) == getattr(ref.stats, field), field
    for field in (
        "sum",
        "sumsq",
        "ce_sum",
        "class_count",
        "class_sum",
        "sketch",
        "sketch_index",
        "sketch_label",
        "grad_sq_sum",
    ):
        a, b = getattr(got.stats, field), getattr(ref.stats, field)
        assert (a is None) == (b is None), field
        if a is None:
            continue
        assert a.shape == b.shape, field
        a, b = a.double(), b.double()
        rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)) if b.numel() else 0.0
        assert rel <= REL, (field, rel)
        worst = max(worst, rel)
    for name, curve in ref.curves.items():
        assert got.curves[name] == pytest.approx(curve, rel=REL, abs=1e-12), name
    assert got.model_info["fingerprint"] == ref.model_info["fingerprint"]
    assert got.data_info["fingerprint"] == ref.data_info["fingerprint"]
    return worst


def assert_same_plan(got, ref, strategies=("salf", "top")) -> None:
    for strategy in strategies:
        a, b = select_plan(got, strategy), select_plan(ref, strategy)
        assert a.treatments == b.treatments, strategy


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of one CPU each; tests join it through probe.ray_address."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from lfdist.orchestrate.cluster import temp_dir

    node = {"num_cpus": 1, "object_store_memory": 100 * 2**20}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "disabled"))
        mp.setenv("RAY_TMPDIR", temp_dir())  # where Cluster writes its address file
        os.makedirs(os.path.join(temp_dir(), "ray"), exist_ok=True)
        c = Cluster(
            initialize_head=True,
            head_node_args={**node, "include_dashboard": False, "temp_dir": temp_dir()},
        )
        try:
            c.add_node(**node)
            c.wait_for_nodes()
            yield c
        finally:
            c.shutdown()


def test_sharded_probe_equals_in_process_across_two_nodes(cluster):
    from lfdist.orchestrate.probe import ray_probe

    cfg = _cfg("llama", ray_address=cluster.address, gradnorm=True)
    got = ray_probe(cfg, progress=False)
    ref = _in_process(cfg)
    assert_same_stats(got, ref)
    assert_same_plan(got, ref, ("salf", "top", "gradnorm"))
    shards = got.data_info["shards"]
    assert [s["examples"] for s in shards] == [[0, 16], [16, 40]]  # cut on batch boundaries
    assert len({s["node"] for s in shards}) == 2  # one actor on each node
    assert [s["attempts"] for s in shards] == [1, 1]
    import ray

    assert not ray.is_initialized()  # the probe left the cluster it joined


def test_killed_actor_is_retried_and_classifier_result_unchanged(cluster):
    """tiny:bert (classify: cross-fitted by global example index) with shard 0's first actor
    dying mid-forward: the shard is re-run on a new actor and the merge is still exact."""
    from lfdist.orchestrate.probe import ray_probe

    cfg = _cfg("bert", ray_address=cluster.address)
    got = ray_probe(cfg, progress=False, inject_faults={0: 1})
    shards = got.data_info["shards"]
    assert [s["attempts"] for s in shards] == [2, 1]
    ref = _in_process(cfg)
    assert_same_stats(got, ref)
    assert_same_plan(got, ref)


def _no_whole_model_here(self):
    raise AssertionError("the driver loaded the whole model")


def test_parallel_pilots_equal_serial_pilots(cluster, monkeypatch):
    """salf pilots as Ray tasks (one per depth, one per node) give the serial pilots' numbers;
    the driver never loads the model (its tasks do)."""
    from lfdist.model.source import ModelSource
    from lfdist.orchestrate.pilot import ray_pilots
    from lfdist.probe.pilot import run_pilots

    cfg = _cfg("llama", ray_address=cluster.address)
    p = prepare(cfg)
    data = {k: v[:24] for k, v in p.train.items()}
    ref = run_pilots(p.loaded.model, data, "lm", cfg.train, "1,8", 4, heldout_samples=4)
    monkeypatch.setattr(ModelSource, "load_whole", _no_whole_model_here)
    got = ray_pilots(cfg, p.source, data, depths="1,8", steps=4, heldout_samples=4)
    assert got["depths"] == ref["depths"] == [1, 8] and got["lengths"] == [2, 4]
    assert got["base"] == pytest.approx(ref["base"], rel=1e-6)
    for j in range(2):
        assert got["errors"][j] == pytest.approx(ref["errors"][j], rel=1e-6)
    assert got["flops_total"] == ref["flops_total"]


def _resident_bound(name: str) -> tuple[int, int]:
    """(largest block + embeddings + final norm + head bytes, all parameter bytes) of the model."""
    from lfdist.model.blocks import find_blocks
    from lfdist.model.specs import load_model

    spec, task, _ = CASES[name]
    model = load_model(spec, task).model
    bmap = find_blocks(model)
    blocks = [0] * bmap.n_blocks
    rest = 0
    for n, p in model.named_parameters():
        i = bmap.block_of(n)
        if i is None:
            rest += p.numel() * p.element_size()
        else:
            blocks[i] += p.numel() * p.element_size()
    return max(blocks) + rest, sum(blocks) + rest


def test_layer_streamed_probe_equals_in_process(cluster):
    from lfdist.orchestrate.probe import ray_probe

    cfg = _cfg("llama", ray_address=cluster.address, stream_layers=True)
    got = ray_probe(cfg, progress=False)
    ref = _in_process(cfg)
    assert_same_stats(got, ref)
    assert_same_plan(got, ref)
    bound, total = _resident_bound("llama")
    for shard in got.data_info["shards"]:
        assert 0 < shard["peak_resident_param_bytes"] <= bound
        assert shard["peak_resident_param_bytes"] < total / 3  # 8 blocks: far from the whole model


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_stream_probe_alone_is_bit_exact(tmp_path, name):
    """Without Ray: the streamed statistics are bit-identical to run_probe's (same batches)."""
    from lfdist.model.source import ModelSource
    from lfdist.probe.stream import stream_probe

    cfg = _cfg(name)
    p = prepare(cfg)
    model = p.loaded.model
    model.save_pretrained(tmp_path)
    n_total = p.train["input_ids"].shape[0]
    pick = torch.arange(SAMPLES) * n_total // SAMPLES
    source = ModelSource(str(tmp_path), cfg.model.task, model.config.num_labels)
    got, memory = stream_probe(source, {k: v[pick] for k, v in p.train.items()}, batch_size=BATCH)
    ref = run_probe(
        model, p.train, cfg.model.task, batch_size=BATCH, samples=SAMPLES, progress=False
    )
    for field in ("sum", "sumsq", "ce_sum", "class_sum", "sketch"):
        if getattr(ref.stats, field) is not None:
            assert torch.equal(getattr(got.stats, field), getattr(ref.stats, field)), field
    assert got.curves == ref.curves
    assert memory["peak_resident_param_bytes"] <= _resident_bound(name)[0]


def test_retries_are_bounded_then_name_the_shard():
    from lfdist.orchestrate.probe import Shard, _retry_or_raise

    shard = Shard(1, 16, 40)
    lost = RuntimeError("The actor died unexpectedly before finishing this task.")
    _retry_or_raise(lost, shard, attempt=1, max_attempts=3)  # returns: retry
    _retry_or_raise(lost, shard, attempt=2, max_attempts=3)
    with pytest.raises(UserError, match=r"probe shard 1 \(examples 16\.\.39\) failed 3 times"):
        _retry_or_raise(lost, shard, attempt=3, max_attempts=3)

    class Wrapped(Exception):  # what ray.get raises for a task's own exception
        cause = UserError("model path 'x' does not exist")

    with pytest.raises(UserError, match="model path"):  # bad input is never retried
        _retry_or_raise(Wrapped(), shard, attempt=1, max_attempts=3)


def test_shards_cut_on_batch_boundaries():
    from lfdist.orchestrate.probe import shard_ranges

    cuts = [(s.start, s.stop) for s in shard_ranges(40, 2, 8)]
    assert cuts == [(0, 16), (16, 40)]
    assert [(s.start, s.stop) for s in shard_ranges(10, 4, 8)] == [(0, 8), (8, 10)]  # 2 batches
    assert [(s.start, s.stop) for s in shard_ranges(64, 3, 8)] == [(0, 16), (16, 40), (40, 64)]


def test_gradnorm_and_stream_are_refused_together():
    from lfdist.orchestrate.probe import ray_probe

    with pytest.raises(UserError, match="stream_layers"):
        ray_probe(_cfg("llama", stream_layers=True, gradnorm=True), progress=False)


def test_parallel_halving_equals_serial_halving(cluster):
    """salf's halving rounds as Ray tasks (one per candidate) give the serial rounds' numbers,
    survivors included."""
    from functools import partial

    from lfdist.orchestrate.pilot import ray_halving
    from lfdist.probe.halving import run_halving
    from lfdist.select.salf_halving import survivors

    cfg = _cfg("llama", ray_address=cluster.address)
    p = prepare(cfg)
    data = {k: v[:24] for k, v in p.train.items()}
    rule = partial(survivors, "lm", run_steps=cfg.train.steps, tolerance=0.01)
    sizing = dict(ks=[0, 2, 4, 6], keep={0}, survivors=rule, budget=0.05, steps=2)
    got = ray_halving(cfg, p.source, data, heldout_samples=4, **sizing)
    ref = run_halving(p.loaded.model, data, "lm", cfg.train, heldout_samples=4, **sizing)
    assert [r["candidates"] for r in got["rounds"]] == [r["candidates"] for r in ref["rounds"]]
    assert [r["steps"] for r in got["rounds"]] == [2, 4, 8]
    for a, b in zip(got["rounds"], ref["rounds"]):
        assert a["errors"] == pytest.approx(b["errors"], rel=1e-6)
    assert got["flops_total"] == ref["flops_total"]
