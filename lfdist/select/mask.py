"""`mask`: fine-tuning as sparsification (Radiya-Dixit & Wang, AISTATS 2020).

The chosen blocks get the `mask` treatment: a learned binary mask over their frozen pre-trained
projection weights (real-valued scores, straight-through estimator, `sparsity` of each weight
zeroed); the task is stored as bit masks (lfdist.model.treatments.export_masks).
"""

from __future__ import annotations

from typing import Any

from lfdist.errors import UserError
from lfdist.model.treatments import MASK_DEFAULTS
from lfdist.select.base import Choice, Context, count_option
from lfdist.select.registry import register_strategy


def block_list(value: Any, n_blocks: int) -> list[int]:
    """Block indices from a list or a comma string ("1,4,7"), each in 0..L-1."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str):
        try:
            value = [int(x) for x in value.split(",") if x.strip()]
        except ValueError:
            value = None
    ok = (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_blocks for i in value)
    )
    if not ok or len(set(value)) != len(value):
        raise UserError(
            f"option blocks={value!r} must list distinct block indices in 0..{n_blocks - 1}"
        )
    return sorted(value)


@register_strategy("mask")
def mask(
    ctx: Context,
    blocks: Any = None,
    n: int | None = None,
    sparsity: float = MASK_DEFAULTS["sparsity"],
) -> Choice:
    """blocks: which blocks to mask; or n: the last n blocks (default: every block, as in the
    paper); sparsity: share of each masked weight set to zero."""
    L = ctx.n_blocks
    if blocks is not None and n is not None:
        raise UserError("strategy mask takes blocks or n, not both")
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, (int, float))
        or not 0 <= sparsity < 1
    ):
        raise UserError(f"mask sparsity={sparsity!r} must be a fraction in [0, 1)")
    if blocks is not None:
        chosen = block_list(blocks, L)
    else:
        n = count_option("n", n, L, L)
        chosen = list(range(L - n, L))
    treatments = ["mask" if i in chosen else "frozen" for i in range(L)]
    return Choice(
        treatments,
        sorted(chosen, reverse=True),  # a budget keeps the deepest (a frozen prefix skips backward)
        options={"n": len(chosen), "sparsity": float(sparsity)},
    )
