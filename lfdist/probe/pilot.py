"""Pilot fine-tunes for `salf` (estimator pilot) and `critical` (SPEC 2.1, 2.3).

Every pilot is a short run of the real recipe: `lfdist.train.local.train_split` (the run's
engine step, feeder, scheduler and clipping, on the run's global batch in one process), so
"same recipe" holds by construction. `run_pilots` trains the top n blocks at a few depths, at
two lengths that follow the run's steps, and measures held-out quality on calibration examples
it never trained on; `plan_pilots` (lfdist.probe.pilot_budget) sizes them so that probe +
pilots cost at most a share of the run (default 5%). `run_critical` trains every block and records how far each one moved.
The model is put back exactly as it was found; results are deterministic functions of
(weights, data, recipe, seed), so a Ray task per depth returns the serial loop's numbers.

The records go into the probe file as `curves["pilot"]` and `curves["critical"]`, so that
`select` stays a pure function of probe.json.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from lfdist.errors import UserError
from lfdist.model.blocks import find_blocks
from lfdist.model.info import model_info
from lfdist.probe.pilot_budget import (  # noqa: F401  (PILOT_BUDGET, MIN_STEPS: re-exported)
    MIN_STEPS,
    PILOT_BUDGET,
    Sizing,
    example_flops,
    global_batch,
    plan_pilots,
    top_treatments,
)
from lfdist.probe.result import ProbeResult
from lfdist.probe.run import _check_data

CRITICAL_STEPS = 50
HELDOUT_SAMPLES = 64  # held-out calibration examples each pilot is scored on, at most

ModelLike = nn.Module | Callable[[], nn.Module]
Log = Callable[[str], None]


def stderr_log(line: str) -> None:
    """One line per stage, whether or not stderr is a terminal (a batch job's log too)."""
    print(f"lfdist: {line}", file=sys.stderr, flush=True)


def pilot_depths(spec: str, n_blocks: int) -> list[int]:
    """`auto`: 1, 2, 4, 8, ... below L, then L itself; or a comma list such as "1,2,4,8"."""
    if spec == "auto":
        depths, n = [], 1
        while n < n_blocks:
            depths.append(n)
            n *= 2
        return depths + [n_blocks]
    try:
        depths = sorted({int(x) for x in str(spec).split(",") if x.strip()})
    except ValueError:
        depths = []
    if not depths or depths[0] < 1 or depths[-1] > n_blocks:
        raise UserError(
            f"probe.pilot_depths={spec!r} must be auto or a comma list of block counts in "
            f"1..{n_blocks}, e.g. 1,2,4,{n_blocks}"
        )
    return depths


def split_calibration(
    data: dict[str, torch.Tensor], heldout_samples: int = HELDOUT_SAMPLES
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(train, held-out): a quarter of the examples held out, at most `heldout_samples`.

    Evenly spaced over the WHOLE set like the probe's own sample, so sorted data stay
    represented on both sides (the first 64 of every 4th example of a topic-sorted corpus
    were one topic: held-out accuracy 0 or 100% whatever the pilot learned).
    """
    n = data["input_ids"].shape[0]
    if n < 2:
        raise UserError("pilot fine-tunes need at least 2 calibration examples; give more data")
    h = min(heldout_samples, max(1, n // 4))
    held = ((torch.arange(h) * 2 + 1) * n) // (2 * h)  # the middle of each of h equal strides
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    return {k: v[keep] for k, v in data.items()}, {k: v[held] for k, v in data.items()}


def _materialize(model: ModelLike) -> nn.Module:
    return model if isinstance(model, nn.Module) else model()


def pilot_recipe(tc, steps: int):
    """The run's recipe (TrainConfig) for a pilot of `steps` steps, in one process: the same
    global batch, lr, clipping and schedule shape (warm-up scaled to the pilot's length)."""
    warmup = round(tc.warmup_steps * steps / tc.steps) if tc.steps else 0
    return replace(
        tc, steps=steps, batch_size=tc.batch_size * tc.nproc, nproc=1, warmup_steps=warmup
    )


def _error(task: str, quality: dict) -> float:
    """salf's error scale: the loss for language models, 1 - accuracy for classifiers."""
    return quality["loss"] if task == "lm" else 1.0 - quality["accuracy"]


def estimator_record(plan: dict, task: str, base: dict, base_error, runs: list[dict], **fields):
    """An estimator's probe record: its plan, the metric, the pre-trained model's score and
    each run's (or round's) seconds, with the estimator's own `fields`."""
    seconds = [r["seconds"] for r in runs]
    metric = "loss" if task == "lm" else "accuracy"
    return {
        **plan,
        **fields,
        "metric": metric,
        "base": base,
        "base_error": base_error,
        "seconds": seconds,
    }


def run_depth(
    model: ModelLike,
    train: dict[str, torch.Tensor],
    heldout: dict[str, torch.Tensor],
    task: str,
    tc,
    depth: int,
    lengths: list[int],
) -> dict:
    """Train the top `depth` blocks (+ final norm and head, as a plan would) once per length,
    each from the pre-trained weights; held-out quality after each."""
    from lfdist.train.local import train_split

    model = _materialize(model)
    L = find_blocks(model).n_blocks
    if not 1 <= depth <= L:
        raise UserError(f"pilot depth {depth} must be a block count in 1..{L}")
    t0 = time.perf_counter()
    runs = [
        train_split(
            model, top_treatments(L, depth), train, heldout, task, pilot_recipe(tc, s), tc.seed
        )
        for s in lengths
    ]
    for r in runs:
        if not all(math.isfinite(v) for v in r["losses"]):
            raise UserError(f"a pilot fine-tune diverged (loss {r['losses'][-1]}); lower train.lr")
    return {
        "depth": depth,
        "quality": [r["quality"] for r in runs],
        "train_losses": [r["losses"] for r in runs],
        "seconds": time.perf_counter() - t0,
    }


def score_base(model: nn.Module, heldout: dict[str, torch.Tensor], task: str, tc):
    """(held-out quality of the pre-trained model, seconds): the baseline every pilot record
    carries and books in its first entry's seconds."""
    from lfdist.train.evaluate import evaluate

    t0 = time.perf_counter()
    return evaluate(model, heldout, task, global_batch(tc)), time.perf_counter() - t0


def assemble_pilots(results: list[dict], plan: dict, task: str, base: dict, extra: dict) -> dict:
    """The `curves["pilot"]` record from per-depth `run_depth` results (any order)."""
    results = sorted(results, key=lambda r: r["depth"])
    lengths = plan["lengths"]
    held = int(plan["heldout_examples"])
    deepest = _error(task, results[-1]["quality"][-1])
    # Binomial spread of an accuracy on `held` examples; the loss gets its spread from the fit.
    noise = math.sqrt(max(deepest * (1 - deepest), 0.0) / held) if task == "classify" else 0.0
    by_length = range(len(lengths))
    return estimator_record(
        plan,
        task,
        base,
        _error(task, base) if task == "lm" else None,  # classifiers: gains from the deepest
        results,
        **extra,
        errors=[[_error(task, r["quality"][j]) for r in results] for j in by_length],
        quality=[[r["quality"][j] for r in results] for j in by_length],
        train_losses=[r["train_losses"] for r in results],
        noise=noise,
    )


def size_pilots(
    info: dict,
    data: dict[str, torch.Tensor],
    task: str,
    tc,
    depths: str | list[int],
    steps: int | None,
    budget: float,
    heldout_samples: int,
    probe_examples: int,
    min_share: float | None = None,
) -> tuple[dict, dict, dict, dict]:
    """(plan_pilots' plan, pilot training data, held-out data, the record's run facts)."""
    data = _check_data(data, task, info["num_labels"])
    spec = depths if isinstance(depths, str) else ",".join(map(str, depths))
    n, seq_len = int(data["input_ids"].shape[0]), int(data["input_ids"].shape[1])
    ds = pilot_depths(spec, info["n_blocks"])
    sz = Sizing(seq_len, n, heldout_samples, probe_examples, budget, steps, min_share)
    plan = plan_pilots(info, tc, ds, sz)
    train, heldout = split_calibration(data, plan["heldout_examples"])
    extra = {"train_examples": int(train["input_ids"].shape[0]), "seq_len": seq_len}
    extra.update(run_steps=tc.steps, lr=tc.lr, seed=tc.seed)
    return plan, train, heldout, extra


def run_pilots(
    model: ModelLike,
    data: dict[str, torch.Tensor],
    task: str,
    tc,
    depths: str | list[int] = "auto",
    steps: int | None = None,
    budget: float = PILOT_BUDGET,
    heldout_samples: int = HELDOUT_SAMPLES,
    probe_examples: int = 0,
    log: Log = stderr_log,
    min_share: float | None = None,
) -> dict:
    """Serial pilots at every depth the budget allows: the `curves["pilot"]` record.

    `tc`: the run's TrainConfig (its steps size the pilots). `probe_examples`: the forward
    probe's examples, counted in the budget.
    """
    model = _materialize(model)
    info = model_info(model, task)
    sizing = (depths, steps, budget, heldout_samples, probe_examples, min_share)
    plan, train, heldout, extra = size_pilots(info, data, task, tc, *sizing)
    if plan.get("skipped"):
        log(f"pilots: skipped, {plan['skipped']}")
        return {**plan, **extra, "seconds": [0.0]}
    log(f"pilots: {plan['budget_note']}")
    from lfdist.train.evaluate import evaluate

    t0 = time.perf_counter()
    base = evaluate(model, heldout, task, global_batch(tc))
    results = []
    for i, n in enumerate(plan["depths"], 1):
        r = run_depth(model, train, heldout, task, tc, n, plan["lengths"])
        results.append(r)
        shown = ", ".join(f"{_error(task, q):.4f}" for q in r["quality"])
        what = "loss" if task == "lm" else "error"
        log(f"pilot {i}/{len(plan['depths'])}: top {n} blocks, held-out {what} {shown}")
    results[0]["seconds"] += time.perf_counter() - t0 - sum(r["seconds"] for r in results)
    return assemble_pilots(results, plan, task, base, extra)


def _block_change(before: list[torch.Tensor], after: list[torch.Tensor]) -> tuple[float, float]:
    """(||dW||_1 / ||W||_1, angle between W and W' in units of pi) over one block's parameters."""
    diff = sum(float((a.double() - b.double()).abs().sum()) for a, b in zip(after, before))
    norm = sum(float(b.double().abs().sum()) for b in before)
    dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(after, before))
    na = math.sqrt(sum(float(a.double().pow(2).sum()) for a in after))
    nb = math.sqrt(sum(float(b.double().pow(2).sum()) for b in before))
    cos = dot / (na * nb) if na > 0 and nb > 0 else 1.0
    return (diff / norm if norm > 0 else 0.0), math.acos(max(-1.0, min(1.0, cos))) / math.pi


def run_critical(
    model: ModelLike,
    data: dict[str, torch.Tensor],
    task: str,
    tc,
    steps: int = CRITICAL_STEPS,
    log: Log = stderr_log,
) -> dict:
    """Train every block for `steps` steps with the run's recipe (`train_split`); per block
    relative L1 change and angular distance. The `curves["critical"]` record."""
    from lfdist.train.local import train_split

    model = _materialize(model)
    info = model_info(model, task)
    data = _check_data(data, task, info["num_labels"])
    if steps < 1:
        raise UserError(
            f"critical pilot steps must be >= 1, got {steps}; e.g. probe.critical_steps=50"
        )
    blocks = find_blocks(model).blocks(model)
    L = len(blocks)
    log(f"critical: training all {L} blocks for {steps} steps")
    changes: list[tuple[float, float]] = []
    before = [[p.detach().clone() for p in b.parameters()] for b in blocks]

    def measure(trained: nn.Module) -> None:  # called before the weights are put back
        tb = find_blocks(trained).blocks(trained)
        changes.extend(
            _block_change(before[i], [p.detach() for p in b.parameters()]) for i, b in enumerate(tb)
        )

    t0 = time.perf_counter()
    run = train_split(
        model, ["full"] * L, data, None, task, pilot_recipe(tc, steps), tc.seed, after=measure
    )
    seconds = time.perf_counter() - t0
    log(f"critical: done in {seconds:.1f} s")
    flops = example_flops(info, int(data["input_ids"].shape[1]))["train"][0]
    return {
        "l1": [c[0] for c in changes],
        "angular": [c[1] for c in changes],
        "train_losses": run["losses"],
        "steps": steps,
        "lr": tc.lr,
        "seed": tc.seed,
        "batch_size": global_batch(tc),
        "seconds": seconds,
        "flops": steps * global_batch(tc) * flops,
    }


def attach(result: ProbeResult, key: str, record: dict) -> ProbeResult:
    """Store a pilot record (`pilot`, `halving` or `critical`) in the probe result, with its
    seconds."""
    if key not in ("pilot", "critical", "halving"):
        raise ValueError(f"unknown pilot record {key!r}")
    result.curves[key] = record
    secs = record["seconds"]
    result.timings[f"{key}_s"] = float(sum(secs) if isinstance(secs, list) else secs)
    return result
