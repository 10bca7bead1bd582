"""`top`: train the last n blocks (LLaMA-Factory's freeze tuning, `freeze_trainable_layers`)."""

from __future__ import annotations

from lfdist.select.base import Choice, Context, count_option, top_blocks
from lfdist.select.registry import register_strategy


@register_strategy("top")
def top(ctx: Context, n: int | None = None) -> Choice:
    """n defaults to half the blocks (rounded up); LLaMA-Factory's own default is 2."""
    L = ctx.n_blocks
    n = count_option("n", n, L, (L + 1) // 2)
    c = top_blocks(L, n)
    return Choice(c.treatments, c.order, options={"n": n})
