"""`lisa`: layerwise importance sampling (Pan et al., "LISA", arXiv 2403.17919), a baseline.

n blocks drawn at random are trained for `period` steps, then a fresh draw replaces them. The
schedule is a pure function of (L, n, period, seed, step), so every rank and every resumed run
draws the same blocks; the plan's treatments mark the first period's blocks and its options carry
n, period and seed. The training loop applies the schedule (lfdist.train.redraw.LisaSchedule) on
DDP, FSDP2 and a single process; DeepSpeed (optimizer partitions fixed at build) and FSDP1 (flat
parameters) cannot change the trainable set, and `check_engine_supports` refuses them.
"""

from __future__ import annotations

from lfdist.errors import UserError
from lfdist.lisa_draw import lisa_blocks
from lfdist.select.base import Choice, Context, count_option
from lfdist.select.budget import infeasible
from lfdist.select.registry import register_strategy

DEFAULT_N = 2  # the paper's gamma = 2 sampled layers
DEFAULT_PERIOD = 20  # steps between draws (LMFlow's lisa_interval_steps example)
PREVIEW_PERIODS = 8  # periods listed in the plan's scores


def _costliest_fit(ctx: Context, n: int) -> bool:
    """Whether every draw of n blocks fits the budget: the lowest n (deepest backward, most
    activations) and the n largest (most parameters) bound all placements."""
    L = ctx.n_blocks
    sizes = ctx.probe.model_info["per_block_params"]
    largest = sorted(range(L), key=lambda i: (-sizes[i], i))[:n]
    plans = [
        ["full"] * n + ["frozen"] * (L - n),
        ["full" if i in largest else "frozen" for i in range(L)],
    ]
    return all(ctx.fits(p) for p in plans)


@register_strategy("lisa")
def lisa(ctx: Context, n: int | None = None, period: int = DEFAULT_PERIOD, seed: int = 0) -> Choice:
    """n: blocks per draw (default 2); period: steps between draws; seed: the schedule's seed.
    Under a budget n shrinks until every possible draw fits."""
    L = ctx.n_blocks
    n = count_option("n", n, L, min(DEFAULT_N, L))
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise UserError(f"lisa period={period!r} must be a whole number of steps >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"lisa seed={seed!r} must be an integer")
    if ctx.limits:
        while n > 1 and not _costliest_fit(ctx, n):
            n -= 1
        if not _costliest_fit(ctx, n):
            raise infeasible(ctx, ["full"] + ["frozen"] * (L - 1))
    first = lisa_blocks(L, n, period, seed, 0)
    treatments = ["full" if i in first else "frozen" for i in range(L)]
    preview = [lisa_blocks(L, n, period, seed, p * period) for p in range(PREVIEW_PERIODS)]
    return Choice(
        treatments,
        sorted(first, reverse=True),
        scores={"schedule": preview, "period": period},
        options={"n": n, "period": period, "seed": seed},
    )
