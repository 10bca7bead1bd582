"""Find the ordered transformer blocks of a Hugging Face model and group everything else.

A short table names the block list per architecture; anything else falls back to the
largest ModuleList of identical modules. Parameters outside the blocks fall into three
groups a plan can treat: embeddings, final_norm (everything after the blocks that is not
the head), head.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from torch import nn

from lfdist.errors import UserError
from lfdist.plan import Fingerprint

# model_type -> attribute name of the block ModuleList (searched by suffix under the model).
BLOCK_LISTS = {
    "gpt2": "h",
    "llama": "layers",
    "mistral": "layers",
    "mixtral": "layers",
    "qwen2": "layers",
    "qwen3": "layers",
    "gemma": "layers",
    "gemma2": "layers",
    "phi": "layers",
    "phi3": "layers",
    "opt": "layers",
    "gpt_neox": "layers",
    "falcon": "h",
    "bert": "layer",
    "roberta": "layer",
    "mpnet": "layer",
}
HEAD_NAMES = {"lm_head", "score", "classifier", "pooler", "cls", "embed_out", "qa_outputs"}


@dataclass(frozen=True)
class BlockMap:
    path: str  # dotted name of the ModuleList, e.g. "model.layers"
    n_blocks: int

    def block_of(self, param_name: str) -> int | None:
        prefix = self.path + "."
        if not param_name.startswith(prefix):
            return None
        return int(param_name[len(prefix) :].split(".", 1)[0])

    def group_of(self, param_name: str) -> str:
        """embeddings | final_norm | head for a parameter outside the blocks."""
        parts = param_name.split(".")[:-1]
        if any(p in HEAD_NAMES for p in parts):
            return "head"
        if any("embed" in p or p in ("wte", "wpe") for p in parts):
            return "embeddings"
        return "final_norm"

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.path)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model) if not hasattr(model, "config") else model


def find_blocks(model: nn.Module) -> BlockMap:
    model = _unwrap(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    attr = BLOCK_LISTS.get(model_type)
    if attr is not None:
        named = [(n, m) for n, m in lists if n.split(".")[-1] == attr]
        if named:
            name, mods = min(named, key=lambda nm: nm[0].count("."))
            return BlockMap(name, len(mods))
    # Fallback: the largest list of modules that all share one class.
    uniform = [(n, m) for n, m in lists if len({type(c) for c in m}) == 1 and _has_params(m)]
    if not uniform:
        raise UserError(
            f"cannot find the transformer blocks of {type(model).__name__} (model_type={model_type!r}); "
            "add its block list to lfdist.model.blocks.BLOCK_LISTS"
        )
    name, mods = max(
        uniform, key=lambda nm: (sum(p.numel() for p in nm[1].parameters()), -nm[0].count("."))
    )
    return BlockMap(name, len(mods))


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def fingerprint(model: nn.Module) -> Fingerprint:
    model = _unwrap(model)
    bmap = find_blocks(model)
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}\n".encode())
    return Fingerprint(type(model).__name__, bmap.n_blocks, h.hexdigest())


def block_param_counts(model: nn.Module) -> tuple[list[int], dict[str, int]]:
    """Parameter elements per block and per non-block group (tied weights counted once)."""
    bmap = find_blocks(model)
    per_block = [0] * bmap.n_blocks
    groups = {"embeddings": 0, "final_norm": 0, "head": 0}
    for name, p in _unwrap(model).named_parameters():
        i = bmap.block_of(name)
        if i is None:
            groups[bmap.group_of(name)] += p.numel()
        else:
            per_block[i] += p.numel()
    return per_block, groups
