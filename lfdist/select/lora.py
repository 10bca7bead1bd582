"""`lora`: LoRA on every block (Hu et al., arXiv 2106.09685), the PEFT default users would
otherwise pick, as a baseline at equal cost.

Every block gets the `lora` treatment: low-rank adapters on its attention projections through
peft (lfdist.model.treatments.inject_lora) plus the block's biases (norm weights on bias-free
models), the same treatment as SPAFIT's top stratum, so the cost model and the export path are
shared. Base weights stay frozen, so backward runs through every block (it must reach the
lowest adapter): LoRA saves optimizer and gradient memory, not backward compute. Adapters train
at their own learning rate (train.lr_lora; 10x train.lr by default, see lfdist.engines.base).
"""

from __future__ import annotations

from lfdist.model.treatments import LORA_DEFAULTS, check_lora_options
from lfdist.select.base import Choice, Context
from lfdist.select.registry import register_strategy


@register_strategy("lora")
def lora(
    ctx: Context,
    lora_rank: int = LORA_DEFAULTS["lora_rank"],
    lora_alpha: float = LORA_DEFAULTS["lora_alpha"],
    lora_dropout: float = LORA_DEFAULTS["lora_dropout"],
    lora_targets: list[str] | None = None,
) -> Choice:
    """lora_rank (default 8), lora_alpha (16), lora_dropout (0), lora_targets (the attention
    projections). Under a budget the lowest blocks lose their adapters first."""
    check_lora_options(lora_rank, lora_alpha, lora_dropout, lora_targets)
    L = ctx.n_blocks
    return Choice(
        ["lora"] * L,
        list(range(L - 1, -1, -1)),
        options={"lora_rank": lora_rank, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout},
    )
