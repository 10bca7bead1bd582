"""`random`: n blocks drawn uniformly without replacement from a seeded generator."""

from __future__ import annotations

import random

from lfdist.errors import UserError
from lfdist.select.base import Choice, Context, count_option
from lfdist.select.registry import register_strategy


@register_strategy("random")
def random_blocks(ctx: Context, n: int | None = None, seed: int = 0) -> Choice:
    L = ctx.n_blocks
    n = count_option("n", n, L, (L + 1) // 2)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"option seed={seed!r} must be an integer")
    drawn = random.Random(seed).sample(range(L), n)  # stdlib: the same draw on every platform
    treatments = ["full" if i in drawn else "frozen" for i in range(L)]
    # The draw order is the preference order: a budget drops the last drawn first.
    return Choice(treatments, drawn, options={"n": n, "seed": seed})
