"""The small interface every engine adapter implements, and helpers they share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Engine(Protocol):
    """One training step is: `micro_step(batch)` per micro-batch, then `optimizer_step()`."""

    name: str
    model: nn.Module  # the wrapped module; call it for forward

    def micro_step(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns the unscaled loss (detached)."""

    def optimizer_step(self) -> None:
        """Clip, step optimizer and scheduler, zero gradients."""

    def local_counts(self) -> dict[str, int]:
        """Elements this rank holds: trainable/frozen params, grads, optimizer states."""

    def full_trainable_state(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) trainable weights by original name; collective, every rank calls."""

    def full_frozen_state(self) -> dict[str, torch.Tensor]:
        """Full frozen weights by original name; collective. Tests compare them bit for bit."""

    def comm_volume(self) -> dict | None:
        """Calls and bytes per collective since the start, where the engine counts them; else None."""

    def save(self, folder: str) -> None:
        """Write trainable weights, optimizer and scheduler state (collective)."""

    def load(self, folder: str) -> None:
        """Read what save() wrote (collective)."""


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    # Never hand an optimizer an all-frozen group: ZeRO-1/2 crash on it.
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params: list[nn.Parameter], cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, total = cfg.warmup_steps, cfg.steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        # Cosine decay to 10% of the peak over the remaining steps.
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def local_numel(t: torch.Tensor) -> int:
    """Elements this rank stores (DTensor shards count their local part)."""
    to_local = getattr(t, "to_local", None)
    return to_local().numel() if to_local is not None else t.numel()


def optimizer_state_counts(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Elements and bytes of optimizer state on this rank (the step counters excluded)."""
    out = {"optimizer_state_elements": 0, "optimizer_state_bytes": 0}
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != "step" and isinstance(value, torch.Tensor):
                out["optimizer_state_elements"] += local_numel(value)
                out["optimizer_state_bytes"] += local_numel(value) * value.element_size()
    return out


def param_counts(model: nn.Module) -> dict[str, int]:
    """Elements and bytes of parameters and gradients on this rank, walking the tensors."""
    counts = dict.fromkeys(
        ("trainable_params", "frozen_params", "grad_elements", "param_bytes", "grad_bytes"), 0
    )
    for p in model.parameters():
        key = "trainable_params" if p.requires_grad else "frozen_params"
        counts[key] += local_numel(p)
        counts["param_bytes"] += local_numel(p) * p.element_size()
        if p.grad is not None:
            counts["grad_elements"] += local_numel(p.grad)
            counts["grad_bytes"] += local_numel(p.grad) * p.grad.element_size()
    return counts


def clean_name(name: str) -> str:
    """Original parameter name from a wrapped one (DDP, FSDP1, checkpoint wrappers)."""
    for junk in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(junk, "")
    return name.removeprefix("module.")  # DDP and DeepSpeed wrap the model as .module


def micro_forward(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    out = model(**batch)
    return out.loss
