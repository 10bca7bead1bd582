"""`gradnorm`: train the n blocks with the largest ||grad|| / ||W|| on calibration data.

The probe records the per-block ratio from one backward pass (run_probe(gradnorm=True), i.e.
`lfdist probe` with gradnorm on); select only reads it.
"""

from __future__ import annotations

from lfdist.errors import UserError
from lfdist.select.base import Choice, Context, count_option
from lfdist.select.registry import register_strategy


@register_strategy("gradnorm")
def gradnorm(ctx: Context, n: int | None = None) -> Choice:
    ratio = ctx.probe.curves.get("gradnorm")
    if ratio is None:
        raise UserError(
            "strategy gradnorm needs gradient statistics the probe did not record; "
            "rerun `lfdist probe --gradnorm` (probe.gradnorm=true in a config)"
        )
    L = ctx.n_blocks
    n = count_option("n", n, L, (L + 1) // 2)
    # Largest ratio first; ties go to the deeper block, which is cheaper to train.
    ranked = sorted(range(L), key=lambda i: (-ratio[i], -i))
    chosen = ranked[:n]
    treatments = ["full" if i in chosen else "frozen" for i in range(L)]
    return Choice(
        treatments,
        chosen,
        scores={"gradnorm": list(ratio)},
        block_scores=list(ratio),
        options={"n": n},
    )
