"""`all`: full fine-tuning, the reference every saving is measured against."""

from __future__ import annotations

from lfdist.select.base import Choice, Context, top_blocks
from lfdist.select.registry import register_strategy


@register_strategy("all")
def all_blocks(ctx: Context) -> Choice:
    # Under a budget, freeze from the bottom: a frozen prefix is what saves backward compute.
    return top_blocks(ctx.n_blocks, ctx.n_blocks)
