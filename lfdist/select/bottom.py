"""`bottom`: train the first n blocks. A control: backward runs through the whole stack."""

from __future__ import annotations

from lfdist.select.base import Choice, Context, count_option
from lfdist.select.registry import register_strategy


@register_strategy("bottom")
def bottom(ctx: Context, n: int | None = None) -> Choice:
    L = ctx.n_blocks
    n = count_option("n", n, L, (L + 1) // 2)
    treatments = ["full"] * n + ["frozen"] * (L - n)
    return Choice(treatments, list(range(n)), options={"n": n})  # a budget drops the highest first
