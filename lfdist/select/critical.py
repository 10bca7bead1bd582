"""`critical`: train the blocks that move most in a short full fine-tune (Radiya-Dixit & Wang,
"How fine can fine-tuning be?", AISTATS 2020).

The probe's pilot (`run_critical`, probe.critical_steps) fine-tunes every block for S steps and
records per block the relative L1 change ||dW||_1 / ||W||_1 and the angular distance between W
and W'; select ranks blocks by one of them and trains the top m from the pre-trained weights.
"""

from __future__ import annotations

from lfdist.errors import UserError
from lfdist.select.base import Choice, Context, count_option
from lfdist.select.registry import register_strategy

METRICS = ("l1", "angular")


@register_strategy("critical")
def critical(ctx: Context, m: int | None = None, metric: str = "l1") -> Choice:
    """m: blocks to train (default a quarter of the blocks, at least 1); metric: l1 | angular."""
    record = ctx.probe.curves.get("critical")
    if record is None:
        raise UserError(
            "strategy critical needs the all-block pilot fine-tune the probe did not run; "
            "rerun `lfdist probe` with probe.critical_steps=50"
        )
    if metric not in METRICS:
        raise UserError(f"critical metric={metric!r} is unknown; use one of {', '.join(METRICS)}")
    L = ctx.n_blocks
    m = count_option("m", m, L, max(1, L // 4))
    change = [float(v) for v in record[metric]]
    if len(change) != L:
        raise UserError(
            f"the probe's critical record has {len(change)} blocks, the model {L}; rerun the probe"
        )
    ranked = sorted(range(L), key=lambda i: (-change[i], -i))  # ties: the deeper, cheaper block
    chosen = ranked[:m]
    treatments = ["full" if i in chosen else "frozen" for i in range(L)]
    return Choice(
        treatments,
        chosen,  # a budget drops the least-changed first
        scores={
            "critical_l1": list(record["l1"]),
            "critical_angular": list(record["angular"]),
            "critical_steps": record.get("steps"),
            "metric": metric,
        },
        block_scores=change,
        options={"m": m},
    )
