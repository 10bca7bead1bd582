"""LISA's draw (Pan et al. 2024): which blocks train at a step, a pure function of the plan.

The `lisa` strategy writes the plan (lfdist.select.lisa), the training loop re-draws from it
(lfdist.train.redraw): both read the draw here, so every rank and every resumed run draws
the same blocks with no communication. Stdlib only.
"""

from __future__ import annotations

import random


def lisa_blocks(n_blocks: int, n: int, period: int, seed: int, step: int) -> list[int]:
    """The blocks that train at `step` (sorted): a fresh seeded draw every `period` steps."""
    draw = random.Random(seed * 1_000_003 + step // period)  # stdlib: same on every platform
    return sorted(draw.sample(range(n_blocks), n))


def lisa_treatments(treatments: list[str], options: dict, step: int) -> list[str]:
    """The plan's treatments for `step` of a lisa run (`options`: the plan's n, period, seed);
    what a training loop that re-draws applies at every multiple of the period."""
    L = len(treatments)
    drawn = lisa_blocks(L, options["n"], options["period"], options["seed"], step)
    return ["full" if i in drawn else "frozen" for i in range(L)]
