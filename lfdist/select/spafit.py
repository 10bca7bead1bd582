"""`spafit`: stratified progressive adaptation (Arora & Wang, arXiv 2405.00201).

Three contiguous strata by two cut points c1 <= c2: blocks 0..c1-1 frozen, c1..c2-1 `bias`
(BitFit; norm weights on bias-free models), c2..L-1 `lora` (LoRA on the attention projections
plus the block's biases, through peft). Cut points are block counts or fractions of L, or come
from `salf` (`cuts=salf`: c1 = salf's split, c2 halfway through the blocks it trains).
"""

from __future__ import annotations

import math
from typing import Any

from lfdist.errors import UserError
from lfdist.model.treatments import LORA_DEFAULTS, check_lora_options
from lfdist.select.base import Choice, Context
from lfdist.select.registry import register_strategy

DEFAULT_CUTS = (1 / 3, 2 / 3)


def cut_point(value: Any, n_blocks: int) -> int:
    """A block count (int 0..L) or a fraction of L (float in [0, 1], rounded half up)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"spafit cut {value!r} must be a block count or a fraction in [0, 1]")
    if isinstance(value, int):
        if not 0 <= value <= n_blocks:
            raise UserError(f"spafit cut {value} must be a block count in 0..{n_blocks}")
        return value
    if not 0.0 <= value <= 1.0:
        raise UserError(f"spafit cut {value!r} must be a fraction in [0, 1] or a block count")
    return math.floor(value * n_blocks + 0.5)


def _parse_cuts(cuts: Any) -> list:
    if isinstance(cuts, str):  # "2,5" or "0.25,0.75" from the command line
        try:
            cuts = [float(x) if "." in x else int(x) for x in cuts.split(",")]
        except ValueError:
            cuts = None
    if not isinstance(cuts, (list, tuple)) or len(cuts) != 2:
        raise UserError(
            "spafit cuts must be two cut points such as [2, 5] or [0.33, 0.67], or the word salf"
        )
    return list(cuts)


def resolve_cuts(ctx: Context, cuts: Any) -> tuple[int, int, dict]:
    """(c1, c2, extra scores) from the `cuts` option."""
    L = ctx.n_blocks
    if cuts == "salf":
        from lfdist.select.salf import salf

        picked = salf(ctx)
        k = picked.scores["split"]
        info = {"salf": {k2: picked.scores[k2] for k2 in ("estimator", "split", "gain")}}
        return k, k + (L - k) // 2, info
    c1, c2 = (cut_point(c, L) for c in _parse_cuts(DEFAULT_CUTS if cuts is None else cuts))
    if c1 > c2:
        raise UserError(f"spafit cuts {cuts!r} give c1={c1} > c2={c2}; list the lower cut first")
    return c1, c2, {}


@register_strategy("spafit")
def spafit(
    ctx: Context,
    cuts: Any = None,
    lora_rank: int = LORA_DEFAULTS["lora_rank"],
    lora_alpha: float = LORA_DEFAULTS["lora_alpha"],
    lora_dropout: float = LORA_DEFAULTS["lora_dropout"],
    lora_targets: list[str] | None = None,
) -> Choice:
    """cuts: [c1, c2] as block counts or fractions (default [1/3, 2/3]), or `salf`."""
    check_lora_options(lora_rank, lora_alpha, lora_dropout, lora_targets, who="spafit ")
    L = ctx.n_blocks
    c1, c2, extra = resolve_cuts(ctx, cuts)
    if c1 >= L:
        raise UserError(
            f"spafit cuts put every block in the frozen stratum (c1={c1}); lower the first cut"
        )
    treatments = ["frozen"] * c1 + ["bias"] * (c2 - c1) + ["lora"] * (L - c2)
    stratum = [1] * c1 + [2] * (c2 - c1) + [3] * (L - c2)
    return Choice(
        treatments,
        list(range(L - 1, c1 - 1, -1)),  # a budget drops the lowest trainable block first
        scores={"cuts": [c1, c2], "stratum": stratum, **extra},
        block_scores=[float(s) for s in stratum],
        options={"cuts": list(DEFAULT_CUTS) if cuts is None else cuts},
    )
