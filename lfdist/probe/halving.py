"""salf's `halving` estimator: the rounds, trained (SPEC 2.1).

Every candidate split of a round is a short run of the real recipe (`run_depth`, through
lfdist.train.local, from the pre-trained weights), scored on held-out calibration examples it
never trained on. Which candidates continue is salf's rule (lfdist.select.salf_halving), passed
in as `survivors` so the probe does not depend on selection. Rounds are sized by
lfdist.probe.pilot_budget.plan_halving to stay inside the pilot budget; `train_round` runs one
round's candidates, serially here or as parallel Ray tasks (lfdist.orchestrate.pilot).

The record goes into the probe file as `curves["halving"]`: candidates, every round (steps,
candidates, held-out errors and quality, seconds, FLOPs), the budget and its note.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from lfdist.model.info import model_info
from lfdist.probe.pilot import (
    HELDOUT_SAMPLES,
    PILOT_BUDGET,
    Log,
    ModelLike,
    _error,
    _materialize,
    estimator_record,
    run_depth,
    score_base,
    split_calibration,
    stderr_log,
)
from lfdist.probe.pilot_budget import Sizing, plan_halving
from lfdist.probe.run import _check_data

# (candidates k, steps) -> one run_depth result per candidate, in that order
TrainRound = Callable[[list[int], int], list[dict]]
# (rounds so far) -> the candidates of the next round, k = 0 first
Survivors = Callable[[list[dict]], list[int]]


def size_halving(
    info: dict,
    data: dict[str, torch.Tensor],
    task: str,
    tc,
    ks: list[int],
    keep: set[int],
    budget: float = PILOT_BUDGET,
    steps: int | None = None,
    heldout_samples: int = HELDOUT_SAMPLES,
    probe_examples: int = 0,
    min_share: float | None = None,
) -> tuple[dict, dict, dict]:
    """(plan_halving's plan with the record's run facts, pilot training data, held-out data)."""
    data = _check_data(data, task, info["num_labels"])
    n, seq_len = int(data["input_ids"].shape[0]), int(data["input_ids"].shape[1])
    sz = Sizing(seq_len, n, heldout_samples, probe_examples, budget, steps, min_share)
    plan = plan_halving(info, tc, ks, keep, sz)
    train, heldout = split_calibration(data, plan["heldout_examples"])
    plan.update(
        train_examples=int(train["input_ids"].shape[0]),
        seq_len=seq_len,
        run_steps=tc.steps,
        lr=tc.lr,
        seed=tc.seed,
        metric="loss" if task == "lm" else "accuracy",
    )
    return plan, train, heldout


def serial_round(
    model: torch.nn.Module, train, heldout, task: str, tc, n_blocks: int
) -> TrainRound:
    """A round's candidates one after another in this process (k frozen = L - k trained)."""
    return lambda ks, steps: [
        run_depth(model, train, heldout, task, tc, n_blocks - k, [steps]) for k in ks
    ]


def run_rounds(
    plan: dict,
    task: str,
    train_round: TrainRound,
    survivors: Survivors,
    base: dict,
    log: Log = stderr_log,
) -> dict:
    """Every round the plan allows: the `curves["halving"]` record."""
    flops = plan["run_flops_per_example"]  # one training example of split k
    gb, held = int(plan["global_batch"]), int(plan["heldout_examples"])
    rounds: list[dict] = []
    alive = list(plan["candidates"])
    for r, steps in enumerate(plan["lengths"]):
        t0 = time.perf_counter()
        results = train_round(alive, steps)
        errors = [_error(task, res["quality"][0]) for res in results]
        spent = (
            steps * gb * sum(flops[k] for k in alive)
            + len(alive) * held * plan["forward_flops_per_example"]
        )
        rounds.append(
            {
                "steps": steps,
                "candidates": alive,
                "errors": errors,
                "quality": [res["quality"][0] for res in results],
                "seconds": time.perf_counter() - t0,
                "flops": spent,
            }
        )
        what = "loss" if task == "lm" else "error"
        shown = ", ".join(f"k={k}: {e:.4f}" for k, e in zip(alive, errors))
        log(f"halving round {r + 1}/{len(plan['lengths'])}, {steps} steps: held-out {what} {shown}")
        if r + 1 < len(plan["lengths"]):
            alive = survivors(rounds)
            if len(alive) < 2:
                break
    base_pass = held * plan["forward_flops_per_example"]  # the pre-trained model's score
    total = sum(r["flops"] for r in rounds) + base_pass
    return estimator_record(
        plan, task, base, _error(task, base), rounds, rounds=rounds, flops_total=total
    )


def run_halving(
    model: ModelLike,
    data: dict[str, torch.Tensor],
    task: str,
    tc,
    ks: list[int],
    keep: set[int],
    survivors: Survivors,
    budget: float = PILOT_BUDGET,
    steps: int | None = None,
    heldout_samples: int = HELDOUT_SAMPLES,
    probe_examples: int = 0,
    log: Log = stderr_log,
    min_share: float | None = None,
) -> dict:
    """Serial halving rounds inside `budget` of the run `tc` describes."""
    model = _materialize(model)
    info = model_info(model, task)
    sizing = (budget, steps, heldout_samples, probe_examples, min_share)
    plan, train, heldout = size_halving(info, data, task, tc, ks, keep, *sizing)
    if plan.get("skipped"):
        log(f"halving: skipped, {plan['skipped']}")
        return {**plan, "rounds": [], "seconds": [0.0]}
    log(f"halving: {plan['budget_note']}")
    base, base_s = score_base(model, heldout, task, tc)
    train_round = serial_round(model, train, heldout, task, tc, info["n_blocks"])
    record = run_rounds(plan, task, train_round, survivors, base, log)
    record["seconds"][0] += base_s
    return record
