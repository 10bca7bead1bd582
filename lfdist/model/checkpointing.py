"""Activation checkpointing on the trainable blocks only, non-reentrant.

Frozen blocks below the boundary keep no activations for backward anyway (nothing there
requires grad), so checkpointing them would only add recompute. Non-reentrant checkpointing
works with frozen inputs; the reentrant kind would need enable_input_require_grads, which
would pull backward down through every frozen block.
"""

from __future__ import annotations

from torch import nn

from lfdist.model.blocks import find_blocks


def checkpoint_trainable_blocks(model: nn.Module) -> list[int]:
    """Wrap each block that has a trainable parameter; returns their indices."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )

    blocks = find_blocks(model).blocks(model)
    wrapped = []
    for i, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()):
            blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            wrapped.append(i)
    return wrapped
