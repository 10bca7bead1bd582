"""Weights of a Hugging Face model loaded block by block from its safetensors files.

`StreamedModel` builds the model on the meta device (buffers such as rotary frequencies stay
real), then loads and drops parameters by group: the non-block ones the probe needs
(embeddings, final norm, and for a causal LM the head) or one block. Tied parameters (a head
sharing the embedding matrix) are loaded once and set in every module that holds them.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from lfdist.errors import UserError
from lfdist.model.blocks import BlockMap, find_blocks

# The non-block parameter groups a probe reads: the logit lens needs the head, a classifier's
# centroid features only the final norm.
RESIDENT_GROUPS = {
    "lm": ("embeddings", "final_norm", "head"),
    "classify": ("embeddings", "final_norm"),
}


class SafetensorsFolder:
    """Tensor name -> file of a Hugging Face folder (sharded or not); loads named tensors."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                self.files = {
                    k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()
                }
        else:
            self.files = {}
            for name in sorted(os.listdir(folder)):
                if name.endswith(".safetensors"):
                    path = os.path.join(folder, name)
                    with safe_open(path, framework="pt") as f:
                        self.files.update(dict.fromkeys(f.keys(), path))
        if not self.files:
            raise UserError(
                f"layer streaming reads safetensors files, and {folder!r} has none; save the model "
                "with save_pretrained(safe_serialization=True) or turn off probe.stream_layers"
            )

    def load(self, keys: list[str], device) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        for path in sorted({self.files[k] for k in keys}):
            with safe_open(path, framework="pt", device=str(device)) as f:
                out.update({k: f.get_tensor(k) for k in keys if self.files[k] == path})
        return out


class StreamedModel:
    """A meta-device model whose parameters are loaded and dropped by group or by block."""

    def __init__(self, folder: str, task: str, num_labels: int, dtype: str, pad_token_id, device):
        import accelerate
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder)
        if task == "classify":
            config.num_labels = num_labels
        if hasattr(config, "use_cache"):
            config.use_cache = False  # a KV cache would keep every block's keys and values
        auto = (
            transformers.AutoModelForCausalLM
            if task == "lm"
            else transformers.AutoModelForSequenceClassification
        )
        with accelerate.init_empty_weights(include_buffers=False):  # buffers (rotary) stay real
            model = auto.from_config(config)
        model = model.to(getattr(torch, dtype)).eval()
        if task == "classify" and model.config.pad_token_id is None:
            model.config.pad_token_id = pad_token_id
        self.model, self.task, self.device = model, task, torch.device(device)
        self.bmap: BlockMap = find_blocks(model)
        self.ckpt = SafetensorsFolder(folder)
        self._slots = self._tied_slots()

    def _tied_slots(self) -> dict[str, tuple[list[tuple[nn.Module, str]], str]]:
        """name -> (every (module, attribute) holding that parameter, its checkpoint key)."""
        by_id: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(name)
        out = {}
        for names in by_id.values():
            key = next(
                (k for n in names for k in self._candidates(n) if k in self.ckpt.files), None
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
        groups = RESIDENT_GROUPS[self.task]
        return [
            n
            for n in self._slots
            if self.bmap.block_of(n) is None and self.bmap.group_of(n) in groups
        ]

    def load(self, block: int | None = None) -> None:
        """Load block `block`'s parameters, or with None the non-block ones the probe needs."""
        names = self._names(block)
        missing = [n for n in names if self._slots[n][1] is None]
        if missing:
            raise UserError(
                f"the checkpoint has no tensor for parameter {missing[0]!r}; layer streaming needs "
                "a folder saved by save_pretrained for this architecture"
            )
        tensors = self.ckpt.load([self._slots[n][1] for n in names], self.device)
        for n in names:
            slots, key = self._slots[n]
            like = getattr(*slots[0])
            p = nn.Parameter(tensors[key].to(like.dtype), requires_grad=False)
            for module, attr in slots:
                module._parameters[attr] = p
        if block is None:
            self._load_buffers()

    def _load_buffers(self) -> None:
        # Buffers are built at init (rotary frequencies); a checkpoint's saved copy wins.
        for name, buf in list(self.model.named_buffers()):
            key = next((k for k in self._candidates(name) if k in self.ckpt.files), None)
            parent, _, attr = name.rpartition(".")
            module = self.model.get_submodule(parent)
            value = (
                self.ckpt.load([key], self.device)[key].to(buf.dtype)
                if key
                else buf.to(self.device)
            )
            module._buffers[attr] = value

    def drop(self, block: int) -> None:
        for n in self._names(block):
            slots, _ = self._slots[n]
            like = getattr(*slots[0])
            meta = nn.Parameter(
                torch.empty(like.shape, dtype=like.dtype, device="meta"), requires_grad=False
            )
            for module, attr in slots:
                module._parameters[attr] = meta

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
            elif self.bmap.group_of(n) in RESIDENT_GROUPS[self.task]:
                resident += size
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {"max_block": max(blocks), "non_block_resident": resident, "total": total}
