"""What training measures about itself: backward reach, memory, step times."""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn


class BackwardTracer:
    """Records which blocks backward actually runs through.

    A forward hook attaches a gradient hook to each block's output when it requires grad;
    the gradient hook fires only if autograd really propagates through that block. Blocks
    below the boundary never get one, because nothing there requires grad.
    """

    def __init__(self, blocks: nn.ModuleList):
        self.reached: set[int] = set()
        self.enabled = True
        self._handles = [
            b.register_forward_hook(self._forward_hook(i)) for i, b in enumerate(blocks)
        ]

    def _forward_hook(self, index: int):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple | list) else output
            if self.enabled and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(lambda grad: self.reached.add(index))

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def available_memory_bytes() -> int | None:
    """Linux's MemAvailable (free + reclaimable page cache); None where it is not reported."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_memory_bytes(device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        return {"cuda_max_allocated": torch.cuda.max_memory_allocated(device)}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss": rss_kib * (1 if sys.platform == "darwin" else 1024)}


def make_plan_for(model: nn.Module, treatments: list[str], strategy: str):
    """A plan with given block treatments for `model` (benchmarks and tests build these)."""
    from lfdist.model.blocks import find_blocks, fingerprint
    from lfdist.plan import BlockPlan, Plan

    bmap = find_blocks(model)
    blocks = tuple(BlockPlan(i, f"{bmap.path}.{i}", t) for i, t in enumerate(treatments))
    return Plan(strategy=strategy, fingerprint=fingerprint(model), blocks=blocks)
