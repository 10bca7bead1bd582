"""Apply a plan to a model: set requires_grad per block and per non-block group.

Runs before any engine wraps the model, so FSDP units and ZeRO partitions see the final
trainable set. Never calls enable_input_require_grads: with embeddings frozen, autograd
records nothing below the lowest trainable block, which is what truncates backward.
The `lora` and `mask` treatments first change the blocks' modules (lfdist.model.treatments).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from lfdist.errors import UserError
from lfdist.model.blocks import find_blocks, fingerprint
from lfdist.plan import Plan

log = logging.getLogger(__name__)

# Norm weights stand in for biases on bias-free models (Llama family), as in SPAFIT's docs.
_NORM_HINTS = ("norm", "ln_", "layernorm")


@dataclass(frozen=True)
class Applied:
    trainable: int
    frozen: int
    trainable_names: tuple[str, ...]

    @property
    def fraction(self) -> float:
        return self.trainable / max(1, self.trainable + self.frozen)


def bias_like(block: nn.Module) -> set[str]:
    names = {n for n, _ in block.named_parameters() if n.endswith("bias")}
    if not names:
        names = {n for n, _ in block.named_parameters() if any(h in n.lower() for h in _NORM_HINTS)}
    return names


def apply_plan(model: nn.Module, plan: Plan, check_fingerprint: bool = True) -> Applied:
    """Freeze and unfreeze parameters of `model` as `plan` says. Returns the counts."""
    if check_fingerprint:
        plan.check_model(fingerprint(model))
    bmap = find_blocks(model)
    blocks = bmap.blocks(model)
    structural = {}  # block -> local names the lora / mask treatments train
    if {b.treatment for b in plan.blocks} & {"lora", "mask"}:
        from lfdist.model.treatments import apply_treatments

        structural = apply_treatments(model, plan, bmap.path)
    bias_sets = {b.index: bias_like(blocks[b.index]) for b in plan.blocks if b.treatment == "bias"}
    trainable, frozen, names = 0, 0, []
    for name, p in model.named_parameters():
        i = bmap.block_of(name)
        if i is None:
            on = plan.modules.get(bmap.group_of(name), "frozen") == "full"
        else:
            t = plan.blocks[i].treatment
            local = name[len(bmap.path) + 1 :].split(".", 1)[1]
            on = (
                t == "full"
                or (t == "bias" and local in bias_sets[i])
                or local in structural.get(i, ())
            )
        p.requires_grad_(on)
        if on:
            trainable += p.numel()
            names.append(name)
        else:
            frozen += p.numel()
    if trainable == 0:
        raise UserError(
            "the plan trains no parameter at all; pick a strategy or budget that trains a block"
        )
    if plan.modules.get("embeddings") == "full":
        log.warning(
            "the plan trains the embeddings: backward runs through every block and the "
            "embedding gradient is as large as the embedding matrix"
        )
    return Applied(trainable, frozen, tuple(names))
