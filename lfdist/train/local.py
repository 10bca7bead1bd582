"""One split trained in this process through the same engine, feeder and loop as a real run.

`train_split` is what the oracle sweep (lfdist.bench.quality) and the pilot fine-tunes use so
that "same recipe" holds by construction: `build_engine("single")` (the DDP/single engine with
the run's optimizer, scheduler and clipping), `StepFeeder` (the run's batches for a seed) and
`train_loop`. The caller's model is put back bit for bit afterwards (trainable weights,
requires_grad flags, gradients, train/eval mode), so one loaded model serves many splits.
Plans with `lora` or `mask` treatments change the model's modules, so those train a copy.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from lfdist.engines import build_engine
from lfdist.engines.base import World
from lfdist.model.apply import apply_plan
from lfdist.model.blocks import find_blocks, fingerprint
from lfdist.plan import DEFAULT_MODULES, BlockPlan, Plan
from lfdist.train.evaluate import evaluate
from lfdist.train.feed import StepFeeder
from lfdist.train.loop import train_loop

STRUCTURAL = ("lora", "mask")  # treatments that replace modules: trained on a copy


def plan_for(model: nn.Module, treatments: list[str], strategy: str = "split") -> Plan:
    bmap = find_blocks(model)
    blocks = tuple(BlockPlan(i, f"{bmap.path}.{i}", t) for i, t in enumerate(treatments))
    return Plan(strategy, fingerprint(model), blocks, dict(DEFAULT_MODULES))


@contextmanager
def restored(model: nn.Module) -> Iterator[None]:
    """Put back what a plan and a training run change: trainable weights, flags, grads, mode.

    Everything is snapshotted lazily: only tensors that end up trainable can have moved, so
    only those are copied (after the plan is applied, via `snapshot`).
    """
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    saved: dict[str, torch.Tensor] = {}

    def snapshot() -> None:
        saved.update({n: p.detach().clone() for n, p in params.items() if p.requires_grad})

    try:
        yield snapshot
    finally:
        with torch.no_grad():
            for n, p in params.items():
                if n in saved:
                    p.copy_(saved[n])
                p.grad = None
                p.requires_grad_(flags[n])
        model.train(was_training)


def train_split(model: nn.Module, treatments: list[str], *args, **kwargs) -> dict:
    """`train_plan` for the plan that trains the blocks `treatments` names (nothing else)."""
    return train_plan(model, plan_for(model, treatments), *args, **kwargs)


def train_plan(
    model: nn.Module,
    plan: Plan,
    train_data: dict[str, torch.Tensor],
    heldout: dict[str, torch.Tensor] | None,
    task: str,
    tc,
    seed: int,
    eval_batch_size: int | None = None,
    after: Callable[[nn.Module], None] | None = None,
) -> dict:
    """Train `plan` (a strategy's, as `lfdist select` wrote it) with the run's recipe `tc` (a
    TrainConfig) and `seed`: its PEFT treatments at their own lr (the plan's lr_scale, as a
    real run resolves it) and lisa's re-drawing.

    Returns quality (evaluate()'s dict on `heldout`, or None), losses (per step), step_times,
    median_step_s (the median after the first step, which pays for warm-up), trainable params.
    """
    from lfdist.engines.base import with_treatment_lrs

    tc = replace(tc, engine="single", nproc=1, seed=seed, save_every=0, log_every=0)
    tc = with_treatment_lrs(tc, plan.options.get("lr_scale"))
    world = World(0, 1, 0, torch.device("cpu"))
    lisa = plan.strategy == "lisa"
    # lora/mask replace modules, and a lisa run may train any block: those train a copy.
    copied = lisa or any(t in STRUCTURAL for t in plan.treatments)
    target = copy.deepcopy(model) if copied else model
    with restored(target) as snapshot, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout draws: the same seed gives the same run
        applied = apply_plan(target, plan, check_fingerprint=False)
        if not copied:
            snapshot()
        redraw = None
        if lisa:
            from lfdist.train.redraw import LisaSchedule

            redraw = LisaSchedule(plan)
        engine = build_engine("single", target, None, tc, world)
        feeder = StepFeeder(train_data, tc.batch_size, tc.grad_accum, 1, 0, seed)
        result = train_loop(
            engine, feeder, tc, world, 0, save=lambda step: None, log=_quiet, redraw=redraw
        )
        quality = None
        if heldout is not None and len(heldout.get("input_ids", [])):
            quality = evaluate(engine.model, heldout, task, eval_batch_size or tc.batch_size)
        if after is not None:  # e.g. critical measures how far each block moved
            after(target)
        del engine  # drops the optimizer state before the weights are put back
    times = result["step_times"]
    return {
        "treatments": list(plan.treatments),
        "seed": seed,
        "quality": quality,
        "losses": [result["losses"][s] for s in sorted(result["losses"])],
        "step_times": times,
        "median_step_s": statistics.median(times[1:] if len(times) > 1 else times),
        "trainable_params": applied.trainable,
        "lr": {"full": tc.lr, **{t: getattr(tc, f"lr_{t}") for t in ("lora", "bias", "mask")}},
    }


def _quiet(_: str) -> None:
    pass
