"""Turn a model built on the meta device into real tensors, each rank filling only what it holds.

`prepare(source, plan)` builds the skeleton and applies the plan (requires_grad, treatments);
the job adds what it needs before sharding (lfdist.train.recipe: tracer, activation
checkpointing, prefix cache); the engine then shards it and fills it through the `Filler`
here, in the engine's own layout:

- FSDP2's shards and DDP / ZeRO-1/2 replicas (lfdist.engines.fill): what the files hold
  through torch.distributed.checkpoint's Hugging Face reader, the rest from `Filler.value`;
- FSDP1's `param_init_fn` (lfdist.engines.fill.unit_filler): the same, one module at a time;
- ZeRO-3 partitions (lfdist.engines.zero3_fill).

Values come from the safetensors files; LoRA adapters (drawn by peft from the plan's seed,
kept on the CPU while their base layer is on meta) and buffers (computed by the constructors)
are kept from the skeleton; mask scores are derived from their weight as inject_masks does;
parameters a checkpoint lacks (a task head on a base model) get the model's own init, seeded.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lfdist.model.treatments import SCORES


@dataclass
class Unsharded:
    """A model before its engine shards it: on the meta device with its `filler` (or real, with
    filler None), the plan applied (`applied` counts what trains; None for a module handed in
    as it is). The job may change the module (tracer, activation checkpointing, prefix cache)
    before it hands this to an engine's shard()."""

    model: nn.Module
    filler: Filler | None
    plan: Any  # lfdist.plan.Plan or None
    applied: Any  # lfdist.model.apply.Applied or None
    dtype: str | None  # the source's dtype; None: read from the module


def prepare(x, plan=None) -> Unsharded:
    """A built nn.Module passes through (filler None, plan as given); a ModelSource is built on
    meta (or whole, with its debug switch) with `plan` applied."""
    if isinstance(x, nn.Module):
        return Unsharded(x, None, plan, None, None)
    from lfdist.model.apply import apply_plan

    if x.whole:
        model = x.load_whole()
        return Unsharded(model, None, plan, apply_plan(model, plan), x.dtype)
    model = x.skeleton()
    with _adapters_stay_real():
        applied = apply_plan(model, plan)
    # the filler takes the names now, before the job or the engine wraps any module
    return Unsharded(model, Filler(model, x), plan, applied, x.dtype)


@contextlib.contextmanager
def _adapters_stay_real():
    """peft moves new adapters to their base layer's device; on meta their seeded values would
    be lost, so they stay on the CPU (cast to the base layer's dtype) until the engine places
    them. Nothing else moves a module to meta while a plan is applied."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    move_adapter = BaseTunerLayer._move_adapter_to_device_of_base_layer
    module_to = nn.Module.to

    def move(self, adapter_name, device=None):
        return move_adapter(self, adapter_name, device=torch.device("cpu"))

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and device.type == "meta":
            return module_to(self, dtype=dtype) if dtype is not None else self
        return module_to(self, *args, **kwargs)

    BaseTunerLayer._move_adapter_to_device_of_base_layer = move
    nn.Module.to = to
    try:
        yield
    finally:
        BaseTunerLayer._move_adapter_to_device_of_base_layer = move_adapter
        nn.Module.to = module_to


def _candidates(name: str, prefix: str) -> list[str]:
    """Checkpoint keys that can hold parameter `name` (peft's base_layer, base-model prefix)."""
    plain = name.replace(".base_layer.", ".")
    out = [plain]
    if prefix and plain.startswith(prefix + "."):
        out.append(plain[len(prefix) + 1 :])
    elif prefix:
        out.append(f"{prefix}.{plain}")
    return out


def checkpoint_names(model: nn.Module) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Each distinct parameter's first name -> (names a checkpoint may give it, tied aliases
    included; its shape)."""
    prefix = getattr(model, "base_model_prefix", "")
    groups: dict[int, list[str]] = {}
    shapes = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
        shapes[id(p)] = tuple(p.shape)
    return {
        names[0]: (tuple(k for n in names for k in _candidates(n, prefix)), shapes[i])
        for i, names in groups.items()
    }


def locate(model: nn.Module, index) -> dict[str, tuple[str | None, tuple[int, ...]]]:
    """Each distinct parameter's first name -> (the checkpoint key holding it or None, shape).

    Checkpoint keys go through transformers' own renamings first (GPT-NeoX's embed_out is
    lm_head, old LayerNorm.gamma is .weight), as from_pretrained applies them."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        renames = [
            t
            for t in get_model_conversion_mapping(model, add_legacy=True)
            if isinstance(t, WeightRenaming)
        ]
    except ImportError:  # an older transformers: names are as saved
        renames = []
    model_side = {}
    for key in index:
        renamed = key
        for t in renames:
            renamed = t.rename_source_key(renamed)[0]
        model_side.setdefault(renamed, key)
        model_side.setdefault(key, key)
    return {
        name: (next((model_side[k] for k in keys if k in model_side), None), shape)
        for name, (keys, shape) in checkpoint_names(model).items()
    }


class Reader:
    """Tensors (or row ranges of them) from a folder's safetensors files, memory-mapped."""

    def __init__(self, folder: str):
        from lfdist.model.headers import read_index

        self.folder = folder
        self.index = read_index(folder)
        self._open = {}

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        from safetensors import safe_open

        path = self.index[key].file
        if path not in self._open:
            self._open[path] = safe_open(path, framework="pt", device="cpu")
        f = self._open[path]
        if rows is None or not self.index[key].shape:
            return f.get_tensor(key)
        return f.get_slice(key)[rows[0] : rows[1]]


class Filler:
    def __init__(self, model: nn.Module, source):
        self.source = source
        self.model = model
        self.qualname = {id(m): n for n, m in model.named_modules()}
        first = {id(p): n for n, p in model.named_parameters()}
        # any name of a tied parameter -> its first name
        self.alias = {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
        # What the skeleton already holds for real: buffers and LoRA adapters.
        self.keep = {
            n: t.detach().clone()
            for n, t in [*model.named_parameters(), *model.named_buffers()]
            if not t.is_meta
        }
        # Names are mapped to checkpoint keys now, before the job and sharding wrap any module.
        self.reader = Reader(source.weights_folder())
        located = locate(model, self.reader.index)
        self._keys = {name: key for name, (key, _) in located.items()}
        for module in model.modules():
            for attr, _ in module.named_parameters(recurse=False):
                name = self.name(module, attr)
                if attr != SCORES and name not in self.keep and self._keys.get(name) is None:
                    self.keep[name] = initialized(model, module, attr, source.seed)

    def name(self, module: nn.Module, attr: str) -> str:
        prefix = self.qualname[id(module)]
        name = f"{prefix}.{attr}" if prefix else attr
        return self.alias.get(name, name)

    def key(self, module: nn.Module, attr: str) -> str | None:
        """The checkpoint key whose tensor is this parameter as it is; None for what the filler
        keeps, derives or initializes itself (LoRA adapters, mask scores, a fresh head)."""
        name = self.name(module, attr)
        return None if name in self.keep else self._keys.get(name)

    def value(self, module: nn.Module, attr: str, rows=None) -> torch.Tensor:
        """The parameter `attr` of `module` (pre-wrap names), all of it or `rows` of dim 0."""
        name = self.name(module, attr)
        if name in self.keep:
            full = self.keep[name]
        else:
            key = self._keys.get(name)
            if key is not None:
                return self.reader.get(key, rows)
            if attr == SCORES:
                # inject_masks' magnitude init, from the whole weight (one matrix at a time).
                w = self.value(module, "weight").to(module.weight.dtype)
                full = w.abs() / w.abs().mean().clamp_min(torch.finfo(w.dtype).tiny)
            else:
                raise KeyError(f"no value for parameter {name!r}")
        return full if rows is None else full[rows[0] : rows[1]]

    def buffers(self, module: nn.Module, device) -> None:
        """`module`'s buffers as the skeleton computed them (or the checkpoint saved them)."""
        for attr, b in list(module._buffers.items()):
            name = self.name(module, attr)
            if b is not None and name in self.keep:
                module._buffers[attr] = self.keep[name].to(device)

    def fill_module(self, module: nn.Module, device, done: dict) -> None:
        """Every direct parameter of `module` made real and filled (tied ones shared)."""
        with torch.no_grad():
            for attr, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in done:
                    value = self.value(module, attr).to(device=device, dtype=p.dtype)
                    done[id(p)] = nn.Parameter(value, requires_grad=p.requires_grad)
                module._parameters[attr] = done[id(p)]
        self.buffers(module, device)


def initialized(model: nn.Module, module: nn.Module, attr: str, seed: int) -> torch.Tensor:
    """A parameter the checkpoint lacks (a task head on a base model): the model's own init,
    seeded, so every rank, the whole load and the streamed eval draw the same values."""
    tmp = copy.deepcopy(module).to_empty(device="cpu", recurse=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model._init_weights(tmp)
    return getattr(tmp, attr).detach()
