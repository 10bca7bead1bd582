"""Weights of a Hugging Face model loaded block by block from its safetensors files.

`StreamedModel` builds the model as the ranks do (lfdist.model.source.ModelSource.skeleton:
parameters on the meta device, buffers such as rotary frequencies real) and reads the
safetensors files with the ranks' reader (lfdist.model.materialize.Reader). It loads and drops
parameters by group: the non-block ones the probe needs (embeddings, final norm, and for a
causal LM the head) or one block. Tied parameters (a head
sharing the embedding matrix) are loaded once and set in every module that holds them.
"""

from __future__ import annotations

import torch
from torch import nn

from lfdist.errors import UserError
from lfdist.model.blocks import BlockMap, find_blocks
from lfdist.model.materialize import Reader, initialized
from lfdist.model.source import fresh_head

# The non-block parameter groups a probe reads: the logit lens needs the head, a classifier's
# centroid features only the final norm. Evaluation runs the model's own head (EVAL_GROUPS).
RESIDENT_GROUPS = {
    "lm": ("embeddings", "final_norm", "head"),
    "classify": ("embeddings", "final_norm"),
}
EVAL_GROUPS = ("embeddings", "final_norm", "head")


class StreamedModel:
    """A meta-device model whose parameters are loaded and dropped by group or by block."""

    def __init__(self, source, device, groups: tuple[str, ...] | None = None):
        """`source`: the run's lfdist.model.source.ModelSource; `groups`: the non-block
        parameter groups load(None) loads (RESIDENT_GROUPS[task] when None)."""
        model = source.skeleton().eval()  # parameters on meta, buffers (rotary) real
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False  # a KV cache would keep every block's keys and values
        self.model, self.task, self.device = model, source.task, torch.device(device)
        self.groups = groups or RESIDENT_GROUPS[source.task]
        self.seed = source.seed  # a head the checkpoint lacks gets the model's seeded init
        self.bmap: BlockMap = find_blocks(model)
        # the ranks' safetensors reader (memory-mapped); tiny models are written once first,
        # hub ids fetched (weights and config only)
        self.ckpt = Reader(source.weights_folder())
        self._slots = self._tied_slots()

    def _tied_slots(self) -> dict[str, tuple[list[tuple[nn.Module, str]], str]]:
        """name -> (every (module, attribute) holding that parameter, its checkpoint key)."""
        by_id: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(name)
        out = {}
        for names in by_id.values():
            key = next(
                (k for n in names for k in self._candidates(n) if k in self.ckpt.index), None
            )
            slots = []
            for n in names:
                parent, _, attr = n.rpartition(".")
                slots.append((self.model.get_submodule(parent), attr))
            out[names[0]] = (slots, key)
        return out

    def _candidates(self, name: str) -> list[str]:
        prefix = getattr(self.model, "base_model_prefix", "") + "."
        return [name, name.removeprefix(prefix), prefix + name]

    def _names(self, block: int | None) -> list[str]:
        if block is not None:
            return [n for n in self._slots if self.bmap.block_of(n) == block]
        return [
            n
            for n in self._slots
            if self.bmap.block_of(n) is None and self.bmap.group_of(n) in self.groups
        ]

    def load(self, block: int | None = None) -> None:
        """Load block `block`'s parameters, or with None the non-block ones the probe needs."""
        names = self._names(block)
        fresh = [n for n in names if self._fresh_head(n)]
        missing = [n for n in names if self._slots[n][1] is None and n not in fresh]
        if missing:
            raise UserError(
                f"the checkpoint has no tensor for parameter {missing[0]!r}; layer streaming needs "
                "a folder saved by save_pretrained for this architecture"
            )
        tensors = self._read([self._slots[n][1] for n in names if n not in fresh])
        for n in names:
            slots, key = self._slots[n]
            like = getattr(*slots[0])
            value = (
                tensors[key] if n not in fresh else initialized(self.model, *slots[0], self.seed)
            )
            p = nn.Parameter(value.to(self.device, like.dtype), requires_grad=False)
            for module, attr in slots:
                module._parameters[attr] = p
        if block is None:
            self._load_buffers()

    def _fresh_head(self, name: str) -> bool:
        return self._slots[name][1] is None and fresh_head(self.task, name)

    def _load_buffers(self) -> None:
        # Buffers are built at init (rotary frequencies); a checkpoint's saved copy wins.
        for name, buf in list(self.model.named_buffers()):
            key = next((k for k in self._candidates(name) if k in self.ckpt.index), None)
            parent, _, attr = name.rpartition(".")
            module = self.model.get_submodule(parent)
            value = self._read([key])[key].to(buf.dtype) if key else buf.to(self.device)
            module._buffers[attr] = value

    def _read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        return {k: self.ckpt.get(k).to(self.device) for k in keys}

    def drop(self, block: int) -> None:
        for n in self._names(block):
            slots, _ = self._slots[n]
            like = getattr(*slots[0])
            meta = nn.Parameter(
                torch.empty(like.shape, dtype=like.dtype, device="meta"), requires_grad=False
            )
            for module, attr in slots:
                module._parameters[attr] = meta
        if self.device.type == "cpu":
            _trim()

    def resident_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if not p.is_meta)

    def group_bytes(self) -> dict[str, int]:
        """Bytes of each block and of the resident non-block parameters, from the shapes."""
        blocks = [0] * self.bmap.n_blocks
        resident = 0
        for n, (slots, _) in self._slots.items():
            p = getattr(*slots[0])
            size = p.numel() * p.element_size()
            i = self.bmap.block_of(n)
            if i is not None:
                blocks[i] += size
            elif self.bmap.group_of(n) in self.groups:
                resident += size
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {"max_block": max(blocks), "non_block_resident": resident, "total": total}


def _trim() -> None:
    """Hand the freed block back to the OS. glibc raises its mmap threshold after the first
    large free, so later blocks (and their fp32 -> bf16 copies) come from the heap and stay
    resident once freed: on a generated 1.1B Llama the streamed probe's RssAnon grew by about
    70 MB a block without this (measured). malloc_trim changes nothing for the rest of the
    process, unlike fixing the threshold (train.cpu_lean_malloc)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
