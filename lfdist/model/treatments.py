"""The structural treatments `lora` and `mask`, applied in place before any engine wraps the model.

- `lora` (SPAFIT's top stratum): LoRA on the block's attention projections through peft
  (`inject_adapter_in_model` with `layers_to_transform`), plus the block's biases (norm weights
  on bias-free models, the `bias` treatment's rule). Base weights stay frozen.
- `mask` (Radiya-Dixit & Wang 2020): every nn.Linear / Conv1D weight of the block is multiplied
  by a learned binary mask. The mask zeroes the `sparsity` share of the weight with the lowest
  real-valued scores (exactly that many); scores train through a straight-through estimator,
  the weights themselves are frozen. Parameter names of the weights do not change: the module's
  class is swapped for a masked subclass and a `mask_scores` parameter is added beside `weight`.

Settings come from `plan.options` (LORA_DEFAULTS, MASK_DEFAULTS). Plain nn.Module changes, so
DDP, FSDP2 and DeepSpeed see ordinary parameters.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lfdist.errors import UserError
from lfdist.plan import Plan

LORA_DEFAULTS = {
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "lora_targets": None,
    "lora_seed": 0,
}
MASK_DEFAULTS = {"sparsity": 0.1}
# Learning rate of each treatment as a multiple of train.lr (full fine-tuning's): select_plan
# writes these into a plan's options as lr_scale, and train.lr_lora / lr_bias / lr_mask override
# them with absolute values (lfdist.engines.base.treatment_lrs). Peers' practice:
# - lora 10x: LoRA (Hu et al. 2021) and the peft/QLoRA recipes train adapters at 1e-4..2e-4 where
#   full fine-tuning of the same models uses 1e-5..2e-5, about 10x.
# - bias 10x: BitFit (Ben Zaken et al. 2022) swept 1e-4..1e-3 for biases against 2e-5..5e-5 for
#   full BERT fine-tuning.
# - mask 100x: movement pruning (Sanh et al. 2020) trains its mask scores at 1e-2 beside weights
#   at 3e-5; our scores start near 1 (|w| / mean |w|), so small steps would never reorder them.
LR_SCALE = {"full": 1.0, "lora": 10.0, "bias": 10.0, "mask": 100.0}
SCORES = "mask_scores"
_ATTENTION_HINTS = ("attn", "attention")
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # big-endian bit order, as numpy.packbits


def _option(plan: Plan, defaults: dict, key: str):
    value = plan.options.get(key)
    return defaults[key] if value is None else value


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def _is_projection(m: nn.Module) -> bool:
    """A dense linear map with a floating-point weight (quantized layers are left alone)."""
    conv1d = _conv1d_type()
    dense = isinstance(m, nn.Linear) or (conv1d is not None and type(m) is conv1d)
    return dense and m.weight.is_floating_point()


# ---------------------------------------------------------------- lora


def attention_projections(block: nn.Module) -> list[str]:
    """Names (relative to the block) of the linear maps inside the block's attention module.

    q/k/v/o on Llama-style models, c_attn/c_proj on GPT-2, query_key_value/dense on NeoX and
    Falcon, attention.self.query/key/value and attention.output.dense on BERT.
    """
    return [
        n
        for n, m in block.named_modules()
        if n and _is_projection(m) and any(h in n.lower() for h in _ATTENTION_HINTS)
    ]


def inject_lora(model: nn.Module, path: str, indices: list[int], plan: Plan) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    blocks = model.get_submodule(path)
    targets = _option(plan, LORA_DEFAULTS, "lora_targets") or attention_projections(
        blocks[indices[0]]
    )
    if not targets:
        raise UserError(
            f"lora: found no attention projection in block {indices[0]} of {type(model).__name__}; "
            "name them in the plan's options as lora_targets: [q_proj, v_proj]"
        )
    conv1d = _conv1d_type()
    fan_in_fan_out = any(
        conv1d is not None and type(m) is conv1d
        for n, m in blocks[indices[0]].named_modules()
        if n in targets
    )
    config = LoraConfig(
        r=int(_option(plan, LORA_DEFAULTS, "lora_rank")),
        lora_alpha=float(_option(plan, LORA_DEFAULTS, "lora_alpha")),
        lora_dropout=float(_option(plan, LORA_DEFAULTS, "lora_dropout")),
        target_modules=list(targets),
        layers_to_transform=list(indices),
        layers_pattern=path.split(".")[-1],
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
    )
    device = next(model.parameters()).device
    # Every rank must draw the same A matrices: FSDP2 does not broadcast from rank 0.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(_option(plan, LORA_DEFAULTS, "lora_seed")))
        try:
            inject_adapter_in_model(config, model)
        except ValueError as e:
            raise UserError(
                f"lora: peft could not inject adapters ({str(e).splitlines()[0]}); "
                "set lora_targets in the plan's options"
            ) from None
    if hasattr(model, "peft_config"):  # peft's bookkeeping: not a module, not needed here
        del model.peft_config


# ---------------------------------------------------------------- mask


class _StraightThrough(torch.autograd.Function):
    """Binary mask zeroing the `n_zero` lowest scores; the backward passes the gradient through."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, n_zero: int) -> torch.Tensor:
        mask = torch.ones_like(scores)
        if n_zero:
            lowest = scores.detach().flatten().argsort(stable=True)[:n_zero]
            mask.view(-1)[lowest] = 0
        return mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def binary_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    return _StraightThrough.apply(scores, round(sparsity * scores.numel()))


def masked_weight(module: nn.Module) -> torch.Tensor:
    # d(loss)/d(scores) = d(loss)/d(W ⊙ m) ⊙ W: the weight is frozen, so only scores get a gradient.
    return module.weight * binary_mask(getattr(module, SCORES), module.mask_sparsity)


class MaskedLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, masked_weight(self), self.bias)


_MASKED_CONV1D: list[type] = []


def _masked_conv1d() -> type:
    if not _MASKED_CONV1D:

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), masked_weight(self))
            return out.view(*x.shape[:-1], self.nf)

        _MASKED_CONV1D.append(type("MaskedConv1D", (_conv1d_type(),), {"forward": forward}))
    return _MASKED_CONV1D[0]


def _masked_class(m: nn.Module) -> type:
    return MaskedLinear if isinstance(m, nn.Linear) else _masked_conv1d()


def inject_masks(block: nn.Module, sparsity: float) -> list[str]:
    """Mask every projection weight of `block`; returns the new score parameters' local names."""
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"mask sparsity={sparsity!r} must be in [0, 1); e.g. --option sparsity=0.9")
    names = []
    for name, m in list(block.named_modules()):
        if not _is_projection(m):
            continue
        w = m.weight.detach()
        # Magnitude initialization: the first mask keeps the largest pre-trained weights.
        scores = w.abs() / w.abs().mean().clamp_min(torch.finfo(w.dtype).tiny)
        m.__class__ = _masked_class(m)
        m.mask_sparsity = float(sparsity)
        m.register_parameter(SCORES, nn.Parameter(scores.clone()))
        names.append(f"{name}.{SCORES}" if name else SCORES)
    if not names:
        raise UserError(
            f"mask: block {type(block).__name__} has no nn.Linear or Conv1D weight to mask"
        )
    return names


def _masked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if hasattr(m, SCORES)]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8 bytes, 8 entries per byte, first entry in the high bit."""
    flat = mask.detach().flatten().to(torch.uint8).cpu()
    flat = F.pad(flat, (0, (-flat.numel()) % 8))
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8)
    return (flat.view(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    flat = ((bits.to(torch.uint8)[:, None] >> shifts) & 1).flatten()
    numel = 1
    for s in shape:
        numel *= s
    return flat[:numel].view(shape).bool()


def export_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The task as bit masks: the weight's parameter name -> packed mask (1 bit per weight)."""
    out = {}
    with torch.no_grad():
        for name, m in _masked_modules(model):
            mask = binary_mask(getattr(m, SCORES), m.mask_sparsity)
            out[f"{name}.weight" if name else "weight"] = pack_bits(mask.bool())
    return out


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero, in place, the weights of a base model that `masks` (from export_masks) switch off."""
    params = dict(model.named_parameters())
    missing = sorted(set(masks) - set(params))
    if missing:
        raise UserError(
            f"mask for {missing[0]!r} names no parameter of this model; was it exported from another model?"
        )
    with torch.no_grad():
        for name, bits in masks.items():
            w = params[name]
            w.mul_(unpack_bits(bits, tuple(w.shape)).to(device=w.device, dtype=w.dtype))


# ---------------------------------------------------------------- plan entry points


def apply_treatments(model: nn.Module, plan: Plan, path: str) -> dict[int, set[str]]:
    """Inject LoRA adapters and masks where the plan says; per block, the block-local names of
    the parameters those treatments train (apply_plan sets requires_grad from them)."""
    from lfdist.model.apply import bias_like

    blocks = model.get_submodule(path)
    lora = [b.index for b in plan.blocks if b.treatment == "lora"]
    mask = [b.index for b in plan.blocks if b.treatment == "mask"]
    trains: dict[int, set[str]] = {}
    if lora:
        inject_lora(model, path, lora, plan)
        for i in lora:
            adapters = {n for n, _ in blocks[i].named_parameters() if ".lora_" in f".{n}"}
            if not adapters:
                raise UserError(
                    f"lora: no adapter landed in block {i}; set lora_targets in the plan's options"
                )
            trains[i] = adapters | bias_like(blocks[i])
    sparsity = float(_option(plan, MASK_DEFAULTS, "sparsity"))
    for i in mask:
        trains[i] = set(inject_masks(blocks[i], sparsity))
    return trains


def merge_treatments(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters and masks into plain weights, restoring the original module classes
    and parameter names (the model's fingerprint matches the base model again): for export."""
    with torch.no_grad():
        for _, m in _masked_modules(model):
            m.weight.mul_(binary_mask(getattr(m, SCORES), m.mask_sparsity))
            delattr(m, SCORES)
            del m.mask_sparsity
            m.__class__ = m.__class__.__mro__[1]
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, m in list(model.named_modules()):
        if isinstance(m, BaseTunerLayer) and hasattr(m, "base_layer"):
            m.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m.get_base_layer())
    return model


def check_engine_supports(plan: Plan, engine: str) -> None:
    """One-line UserError when `engine` cannot run `plan` (call before launching)."""
    if plan.strategy == "lisa" and engine in ("deepspeed", "fsdp1"):
        why = (
            "its optimizer partitions are fixed when the engine is built"
            if engine == "deepspeed"
            else "its flat parameters fix requires_grad when the units are built"
        )
        raise UserError(
            f"strategy lisa re-draws its trainable blocks every period, which "
            f"{'DeepSpeed' if engine == 'deepspeed' else 'FSDP1'} cannot do "
            f"({why}); use --engine ddp or fsdp2"
        )
    partial = sorted({t for t in plan.treatments if t in ("bias", "lora", "mask")})
    if engine == "fsdp1" and partial:
        raise UserError(
            f"fsdp1 cannot train the {partial[0]} treatment: its blocks mix frozen and trainable "
            "parameters in one FSDP1 unit; use --engine fsdp2"
        )


def check_lora_options(rank: Any, alpha: Any, dropout: Any, targets: Any, who: str = "") -> None:
    """LoRA's options as a plan stores them; `who` names the strategy in the message (spafit)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserError(f"{who}lora_rank={rank!r} must be a whole number >= 1, e.g. lora_rank=8")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise UserError(f"{who}lora_alpha={alpha!r} must be a number > 0, e.g. lora_alpha=16")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UserError(f"{who}lora_dropout={dropout!r} must be in [0, 1)")
    if targets is not None and (
        not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets)
    ):
        raise UserError(
            f"{who}lora_targets={targets!r} must be a list of module names, e.g. [q_proj, v_proj]"
        )
