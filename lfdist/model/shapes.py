"""Sizes the cost model needs that parameter counts alone do not give.

LoRA's adapters on a projection of shape (out, in) add r·(in + out) elements, and the mask
treatment adds one score per projection weight element; both depend on which modules of a
block are projections, which only the module tree knows. Works on `meta` models.
"""

from __future__ import annotations

from torch import nn

from lfdist.model.treatments import _is_projection, attention_projections


def lora_in_out(block: nn.Module) -> int:
    """Sum of in + out features over the projections LoRA targets by default in `block`."""
    targets = set(attention_projections(block))
    return sum(sum(m.weight.shape) for n, m in block.named_modules() if n in targets)


def projection_params(block: nn.Module) -> int:
    """Weight elements of every projection of `block`: what the mask treatment scores."""
    return sum(m.weight.numel() for _, m in block.named_modules() if _is_projection(m))
