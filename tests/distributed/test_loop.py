"""The training loop on 2 gloo ranks (tests/distributed/loop_worker.py runs each rank): gradient
accumulation reduces once per step, a bad step never reaches the weights or a checkpoint, and
LISA's re-drawing trains exactly the scheduled blocks on DDP and FSDP2."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from lfdist.lisa_draw import lisa_blocks
from tests.distributed import loop_worker

N = loop_worker.N_BLOCKS
PREFIX = ["frozen"] * 5 + ["full"] * 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, scenarios: list[dict]) -> list[list[dict]]:
    """Per scenario, the two ranks' results (one spawn runs them all)."""
    mp.spawn(loop_worker.run, args=(2, _free_port(), str(tmp_path), scenarios), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return [list(pair) for pair in zip(*ranks)]


def _block_elements(i: int = 0) -> int:
    from lfdist.model.tiny import build_tiny

    model = build_tiny("llama", "lm")
    return sum(p.numel() for p in model.model.layers[i].parameters())


def _changed_blocks(before: dict, after: dict) -> list[int]:
    changed = set()
    for name, t in before.items():
        if name.startswith("model.layers.") and not torch.equal(t, after[name]):
            changed.add(int(name.split(".")[2]))
    return sorted(changed)


ACCUM_RUNS = [(engine, accum) for engine in ("ddp", "fsdp2", "fsdp1") for accum in (1, 2)]


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
    """The default-suite scenarios in one spawn: 6 accumulation runs, then the two bad steps."""
    scenarios = [
        {
            "train": {"engine": e, "steps": 2, "batch_size": 2, "grad_accum": a, "lr": 1e-3},
            "treatments": PREFIX,
        }
        for e, a in ACCUM_RUNS
    ]
    bomb = {"engine": "ddp", "steps": 6, "batch_size": 2, "lr": 1e-3, "save_every": 1}
    huge = {"engine": "ddp", "steps": 4, "batch_size": 2, "lr": 1e30, "save_every": 1}
    huge["max_grad_norm"] = 0.0
    scenarios += [
        {"train": bomb, "treatments": PREFIX, "lr_bomb_at": 2},
        {"train": huge, "treatments": PREFIX},
    ]
    results = _run(tmp_path_factory.mktemp("loop"), scenarios)
    n = len(ACCUM_RUNS)
    return {"accum": dict(zip(ACCUM_RUNS, results[:n])), "bomb": results[n], "huge": results[n + 1]}


def test_gradient_accumulation_reduces_once_per_step(default_runs):
    reduced = {}
    for key, ranks in default_runs["accum"].items():
        assert ranks[0]["error"] is None
        reduced[key] = ranks[0]["reduced"][:2]
    trainable = 3 * _block_elements() + 64 * 320 + 64  # blocks 5-7, lm_head, final norm
    # DDP: every step all-reduces the trainable gradients once, whatever the accumulation
    # (before: once per micro-batch, twice as many elements with grad_accum=2)
    assert [sum(s) for s in reduced["ddp", 1]] == [trainable] * 2
    assert reduced["ddp", 2] == reduced["ddp", 1]
    # FSDP2: one reduce-scatter per trainable unit, once per step: 3 blocks, the untied head
    # (its own unit) and the root with the final norm; the frozen embedding unit has none
    assert [len(s) for s in reduced["fsdp2", 1]] == [5, 5]
    assert reduced["fsdp2", 2] == reduced["fsdp2", 1]
    # FSDP1: one reduce-scatter per trainable unit (3 blocks, the root with head and norm)
    assert [len(s) for s in reduced["fsdp1", 1]] == [4, 4]
    assert reduced["fsdp1", 2] == reduced["fsdp1", 1]


def test_a_bad_step_never_reaches_the_weights_or_a_checkpoint(default_runs):
    for r in default_runs["huge"]:  # lr=1e30: the state after step 0 never passes, none saved
        assert r["error"].startswith("loss became nan at step 1, before its optimizer step")
        assert "no checkpoint passed the check, so none was written" in r["error"]
        assert r["saved"] == {}
    ranks = default_runs["bomb"]
    for r in ranks:
        # step 2's update (lr 1e30) blows the weights up; step 3's forward sees it first
        assert r["error"].startswith("loss became nan at step 3, before its optimizer step")
        assert "the last good checkpoint (step 2) is kept" in r["error"]
        assert sorted(r["saved"]) == [1, 2]  # the exploded state after step 3 was never saved
        for step, weights in r["saved"].items():
            assert all(torch.isfinite(t).all() for t in weights.values())
            # what was saved is the state after `step` steps, untouched by the bad update
            assert all(torch.equal(t, r["snapshots"][step][n]) for n, t in weights.items())
    assert all(torch.equal(t, ranks[1]["saved"][2][n]) for n, t in ranks[0]["saved"][2].items())


@pytest.mark.slow
def test_lisa_trains_exactly_the_scheduled_blocks(tmp_path):
    n, period, seed, steps = 2, 2, 2, 6
    options = {"n": n, "period": period, "seed": seed}
    first = lisa_blocks(N, n, period, seed, 0)
    treatments = ["full" if i in first else "frozen" for i in range(N)]
    scenarios = [
        {
            "train": {"engine": engine, "steps": steps, "batch_size": 2, "lr": 1e-3},
            "treatments": treatments,
            "strategy": "lisa",
            "options": options,
        }
        for engine in ("ddp", "fsdp2")
    ]
    for engine, ranks in zip(("ddp", "fsdp2"), _run(tmp_path, scenarios)):
        _check_lisa(engine, ranks, n, period, seed, steps)


def _check_lisa(engine, ranks, n, period, seed, steps):
    schedule = {s: lisa_blocks(N, n, period, seed, s) for s in range(steps)}
    # The trained set changes at the period boundaries: seed 2 draws [2, 6], [6, 7], [3, 5]
    # (block 6 carries on across the first boundary, keeping its optimizer state).
    assert len({tuple(b) for b in schedule.values()}) == 3
    head_and_norm = 64 * 320 + 64  # lm_head + final norm stay trainable throughout
    for r in ranks:
        assert r["error"] is None
        assert r["trained_blocks"] == schedule
        snaps = r["snapshots"]
        for s in range(steps):
            # a block changes in step s exactly when the schedule trains it there; the
            # others stay bit for bit what they were
            assert _changed_blocks(snaps[s], snaps[s + 1]) == schedule[s], s
        if engine == "ddp":  # all-reduced gradient elements: the drawn blocks + head + norm
            per_step = [sum(x) for x in r["reduced"]]
            assert per_step == [n * _block_elements() + head_and_norm] * steps
        else:  # a reduce-scatter per drawn block, one for the untied head's own unit and one
            # for the root (final norm); nothing for the frozen rest or the embeddings
            assert [len(x) for x in r["reduced"]] == [n + 2] * steps
        # the optimizer holds the last draw's blocks (9 tensors each) + norm + head, no others
        assert r["optimizer_params"] == r["optimizer_state_params"] == n * 9 + 2
    for name, t in ranks[0]["snapshots"][steps].items():
        assert torch.equal(t, ranks[1]["snapshots"][steps][name]), name
