"""Budgets (SPEC 2.5): parse them, and trim a strategy's choice until it fits.

Every budgeted quantity grows when a block is added, so the largest feasible prefix of the
strategy's preference order is the plan; when even its first block does not fit, the error
names the smallest value that would.
"""

from __future__ import annotations

import math
from typing import Any

from lfdist.errors import UserError
from lfdist.select.base import Choice, Context

BUDGET_KEYS = ("blocks", "params", "gib", "flops")
# How the plan is costed; accepted in the budget or in the options.
COST_KEYS = (
    "engine",
    "zero_stage",
    "world_size",
    "dtype",
    "precision",
    "batch_size",
    "seq_len",
    "activation_checkpointing",
)
COST_DEFAULTS = {"engine": "fsdp2", "zero_stage": 2, "world_size": 1, "batch_size": 4}


def split_settings(
    budget: dict | None, options: dict | None, model_info: dict, data_info: dict
) -> tuple[dict[str, float], dict[str, Any], dict[str, Any]]:
    """(limits, cost settings, strategy options) from the user's budget and options."""
    budget, options = dict(budget or {}), dict(options or {})
    unknown = sorted(set(budget) - set(BUDGET_KEYS) - set(COST_KEYS))
    if unknown:
        raise UserError(
            f"unknown budget key {unknown[0]!r}; budget keys: {', '.join(BUDGET_KEYS)} "
            f"(costed with {', '.join(COST_KEYS)})"
        )
    limits = {}
    for key in BUDGET_KEYS:
        if key in budget:
            value = budget.pop(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise UserError(
                    f"budget {key}={value!r} must be a number >= 0; e.g. --budget {key}="
                    f"{ {'blocks': 4, 'gib': 40}.get(key, 0.5) }"
                )
            limits[key] = float(value)
    cost = dict(
        COST_DEFAULTS,
        dtype=model_info.get("dtype") or "float32",
        seq_len=int(data_info.get("seq_len") or 512),
    )
    for key in COST_KEYS:
        for source in (budget, options):
            if key in source:
                cost[key] = source.pop(key)
    return limits, cost, options


def _ceil_sig(x: float, digits: int = 3) -> float:
    """Round up to `digits` significant digits, so the printed value is itself feasible."""
    if x <= 0:
        return x
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale - 1e-9) / scale


def infeasible(ctx: Context, first: list[str]) -> UserError:
    """The error for a budget that even the one-block plan `first` exceeds."""
    m = ctx.measures(first)
    parts = []
    for key, limit in ctx.limits.items():
        if m[key] > limit * (1 + 1e-12):
            need = int(m[key]) if key == "blocks" else _ceil_sig(m[key])
            parts.append(
                f"budget {key}={limit:g} is infeasible: the smallest plan that trains one "
                f"block needs {key}>={need:g}"
            )
    return UserError("; ".join(parts))


def apply_budget(ctx: Context, choice: Choice) -> list[str]:
    """The choice's treatments, trimmed in its preference order until the budget holds."""
    if not ctx.limits or ctx.fits(choice.treatments):
        return list(choice.treatments)
    frozen = ["frozen"] * ctx.n_blocks

    def keep(n: int) -> list[str]:
        ts = list(frozen)
        for i in choice.order[:n]:
            ts[i] = choice.treatments[i]
        return ts

    for n in range(len(choice.order) - 1, 0, -1):
        if ctx.fits(keep(n)):
            return keep(n)
    raise infeasible(ctx, keep(1))
