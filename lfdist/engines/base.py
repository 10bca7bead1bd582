"""The small interface every engine adapter implements, and helpers they share."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from lfdist.model.treatments import LR_SCALE
from lfdist.precision import Precision
from lfdist.precision import resolve as resolve_precision


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
    optimizer: torch.optim.Optimizer
    precision: Precision
    # True: optimizer_step(skip=...) skips a bad update on the device, so the loop reads a
    # step's health one step late; False: the loop reads it before every optimizer step.
    skips_bad_steps_on_device: bool

    def micro_step(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns the unscaled loss (detached)."""

    def optimizer_step(self, skip: torch.Tensor | None = None) -> torch.Tensor | None:
        """Clip, step optimizer and scheduler, zero gradients; returns the global gradient norm
        (a device tensor, never read here) or None. No update where `skip` (a device bool) or
        a non-finite norm says the step is bad."""

    def drop_gradients(self) -> None:
        """Forget the gradients of a step that will not be taken (a stop after backward)."""

    def retrain(self, wanted) -> list[str]:
        """Change the trainable set between steps (LISA); engines that cannot raise UserError."""

    def local_counts(self) -> dict[str, int]:
        """Elements this rank holds: trainable/frozen params, grads, optimizer states."""

    def full_trainable_state(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) trainable weights by original name; collective, every rank calls."""

    def full_frozen_state(self) -> dict[str, torch.Tensor]:
        """Full frozen weights by original name; collective. Tests compare them bit for bit."""

    def comm_volume(self) -> dict | None:
        """Calls and bytes per collective since the start, where the engine counts them; else None."""

    def trainable_shards(self) -> list[torch.Tensor]:
        """The trainable tensors, or this rank's parts of them, as this rank holds them."""

    def save(self, folder: str) -> None:
        """Each rank writes the trainable weights, optimizer and scheduler state it holds
        (collective; nothing gathered). Layouts: lfdist/engines/shards.py."""

    def load(self, folder: str) -> None:
        """Read what save() wrote (collective)."""


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    # Never hand an optimizer an all-frozen group: ZeRO-1/2 crash on it.
    return [p for p in model.parameters() if p.requires_grad]


TREATMENT_GROUPS = tuple(LR_SCALE)
_BLOCK_INDEX = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.3." -> the block's prefix


def treatment_lrs(cfg, scales: dict[str, float] | None = None) -> dict[str, float]:
    """Learning rate per treatment: train.lr_<t> where set, else train.lr x the plan's scale
    (`scales`, from its options) or LR_SCALE."""
    scales = {**LR_SCALE, **(scales or {})}
    out = {}
    for t in TREATMENT_GROUPS:
        explicit = getattr(cfg, f"lr_{t}", None) if t != "full" else None
        out[t] = float(explicit) if explicit is not None else cfg.lr * float(scales[t])
    return out


def with_treatment_lrs(cfg, scales: dict[str, float] | None = None):
    """`cfg` (a TrainConfig) with lr_lora / lr_bias / lr_mask resolved from a plan's lr_scale,
    so every engine builds the same groups from the config alone."""
    lrs = treatment_lrs(cfg, scales)
    return dataclasses.replace(cfg, **{f"lr_{t}": lrs[t] for t in TREATMENT_GROUPS if t != "full"})


def treatment_of_parameters(model: nn.Module) -> dict[str, str]:
    """The treatment group of every trainable parameter, read off the model itself (so every
    engine, wrapped or not, agrees): LoRA adapters and mask scores by name; the other trainable
    parameters of a block with LoRA are its biases (the lora treatment trains both); a block
    that trains only some of its parameters is a bias block; the rest is full fine-tuning."""
    named = [(clean_name(n), p) for n, p in model.named_parameters()]
    by_block: dict[str, list[tuple[str, bool]]] = {}
    for name, p in named:
        m = _BLOCK_INDEX.match(name)
        if m:
            by_block.setdefault(m.group(1), []).append((name, p.requires_grad))
    block_kind = {}
    for prefix, members in by_block.items():
        on = [n for n, g in members if g]
        if any(".lora_" in n for n in on):
            block_kind[prefix] = "lora"
        elif any(n.endswith("mask_scores") for n in on):
            block_kind[prefix] = "mask"
        elif on and len(on) < len(members):
            block_kind[prefix] = "bias"
        else:
            block_kind[prefix] = "full"
    out = {}
    for name, p in named:
        if p.requires_grad:
            m = _BLOCK_INDEX.match(name)
            out[name] = block_kind[m.group(1)] if m else "full"
    return out


def param_groups(model: nn.Module, cfg, scales: dict[str, float] | None = None) -> list[dict]:
    """One optimizer group per treatment that trains something, each with its lr; never an
    all-frozen group (ZeRO-1/2 crash on one)."""
    kinds = treatment_of_parameters(model)
    lrs = treatment_lrs(cfg, scales)
    members: dict[str, list[nn.Parameter]] = {t: [] for t in TREATMENT_GROUPS}
    seen: set[int] = set()
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            members[kinds[clean_name(n)]].append(p)
    return [{"params": ps, "lr": lrs[t], "treatment": t} for t, ps in members.items() if ps]


def make_optimizer(model_or_params, cfg, scales=None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: one group per treatment (a module), or one group
    at train.lr (a list of parameters).

    Fused wherever torch has the kernel (CUDA and CPU, DTensors included): one kernel for all
    tensors, no temporaries the size of a tensor (the single-tensor loop's were +0.3 GiB per rank
    at the step on DeepSpeed's flat partitions of a 1.1B model), 1.5x faster than it on FSDP2's
    DTensors on an H200 (issue 15), and it can skip a bad step on the device (`found_inf`)."""
    if isinstance(model_or_params, nn.Module):
        groups = param_groups(model_or_params, cfg, scales)
    else:
        groups = [{"params": list(model_or_params), "lr": cfg.lr, "treatment": "full"}]
    devices = {p.device.type for g in groups for p in g["params"]}
    how = {"fused": True} if devices <= {"cuda", "cpu"} else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **how)


def run_precision(u, cfg) -> Precision:
    """The run's precision from its model dtype (the source's, else the module's most common
    float dtype) and train.precision. `u`: lfdist.model.materialize.Unsharded."""
    dtype = u.dtype
    if dtype is None:
        floats = [p.dtype for p in u.model.parameters() if p.is_floating_point()]
        dtype = str(max(set(floats), key=floats.count)).removeprefix("torch.") if floats else None
    return resolve_precision(dtype or "float32", getattr(cfg, "precision", "auto"))


def keep_trainable_in(model: nn.Module, precision: Precision, plan=None) -> int:
    """Trainable parameters held in the precision's master dtype (fp32 under bf16-mixed),
    frozen ones left as loaded; on the meta device too, before anything is materialized.
    A lisa plan may train any block later (and FSDP2 cannot change a shard's dtype), so every
    block parameter gets a master there. Returns how many parameters changed dtype."""
    dtype = getattr(torch, precision.trainable)
    lisa = plan is not None and getattr(plan, "strategy", None) == "lisa"
    in_block = _BLOCK_INDEX.match
    changed = 0
    for name, p in {id(p): (n, p) for n, p in model.named_parameters()}.values():
        trains = p.requires_grad or (lisa and in_block(clean_name(name)) is not None)
        if trains and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            changed += 1
    return changed


def optimizer_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The peak learning rate of each treatment group (what metrics.json reports)."""
    return {
        g.get("treatment", "full"): g.get("initial_lr", g["lr"]) for g in optimizer.param_groups
    }


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
    keys = ("trainable_params", "frozen_params", "grad_elements", "param_bytes", "grad_bytes")
    counts = dict.fromkeys((*keys, "trainable_param_bytes", "frozen_param_bytes"), 0)
    for p in model.parameters():
        key = "trainable_params" if p.requires_grad else "frozen_params"
        counts[key] += local_numel(p)
        counts["param_bytes"] += local_numel(p) * p.element_size()
        counts[key.replace("params", "param_bytes")] += local_numel(p) * p.element_size()
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


def compile_blocks(model: nn.Module, enabled: bool) -> int:
    """torch.compile each transformer block in place, before the engine wraps it (torchtitan
    compiles per block too: every block of one shape reuses one graph, and FSDP's hooks stay
    outside it). Returns how many blocks were compiled."""
    if not enabled:
        return 0
    from lfdist.model.blocks import find_blocks

    blocks = find_blocks(model).blocks(model)
    for block in blocks:
        block.compile()
    return len(blocks)
