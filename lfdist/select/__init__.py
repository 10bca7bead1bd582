"""Select: strategies turn probe statistics into a plan (one file per strategy).

`select_plan` is a pure function of the probe result, the strategy's options and the budget.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from lfdist.errors import UserError
from lfdist.plan import BlockPlan, Plan, default_modules
from lfdist.probe.result import ProbeResult
from lfdist.select import (  # noqa: F401  (register)
    all_blocks,
    bottom,
    critical,
    gradnorm,
    lisa,
    lora,
    mask,
    random_blocks,
    salf,
    spafit,
    top,
)
from lfdist.select.base import Choice, Context
from lfdist.select.budget import COST_KEYS, apply_budget, split_settings
from lfdist.select.registry import get_strategy

__all__ = ["select_plan", "Choice", "Context"]


def _strategy_options(fn) -> dict[str, Any]:
    params = list(inspect.signature(fn).parameters.values())[1:]  # skip ctx
    return {p.name: p.default for p in params}


def _plain(x: Any) -> Any:
    """Plain YAML-safe values: floats, ints, strings, lists, dicts."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def select_plan(
    probe: ProbeResult,
    strategy: str,
    budget: dict[str, float] | None = None,
    options: dict | None = None,
) -> Plan:
    """The plan `strategy` makes from `probe`, trimmed to `budget`, with predicted costs.

    options: the strategy's own options plus the costing keys (engine, zero_stage, world_size,
    dtype, batch_size, seq_len), which may also sit in `budget`.
    """
    fn = get_strategy(strategy)
    limits, cost, opts = split_settings(budget, options, probe.model_info, probe.data_info)
    known = _strategy_options(fn)
    unknown = sorted(set(opts) - set(known))
    if unknown:
        listed = ", ".join(known) or "none"
        raise UserError(
            f"strategy {strategy} has no option {unknown[0]!r}; its options: {listed} "
            f"(and {', '.join(COST_KEYS)} for costing)"
        )
    rank = {**known, **opts}.get("lora_rank")  # a strategy's LoRA rank sizes its adapters
    if rank is not None:
        cost = {**cost, "lora_rank": rank}
    modules = default_modules(probe.model_info)  # a tied head is marked so, not "full"
    ctx = Context(probe, modules, cost, limits)
    ctx.predict(["full"] * ctx.n_blocks)  # checks engine, dtype, world size before any work
    choice: Choice = fn(ctx, **opts)
    treatments = apply_budget(ctx, choice)
    names = probe.model_info["block_names"]
    scores = choice.block_scores or [None] * ctx.n_blocks
    blocks = tuple(
        BlockPlan(i, names[i], t, _plain(None if scores[i] is None else float(scores[i])))
        for i, t in enumerate(treatments)
    )
    resolved = {**known, **opts, **choice.options, **cost}
    # PEFT treatments train at their own lr (a multiple of train.lr, LR_SCALE);
    # the plan records it where it has such blocks, and editing it here changes the run.
    peft = sorted({t for t in treatments if t in ("bias", "lora", "mask")})
    if peft and "lr_scale" not in resolved:
        from lfdist.model.treatments import LR_SCALE

        resolved["lr_scale"] = {t: LR_SCALE[t] for t in peft}
    return Plan(
        strategy=strategy,
        fingerprint=probe.fingerprint,
        blocks=blocks,
        modules=modules,
        budget=_plain(dict(budget or {})),
        scores=_plain(choice.scores),
        predicted=_plain(ctx.predict(treatments)),
        options=_plain(resolved),
    )
