"""Turn a model built on the meta device into real tensors, each rank filling only what it holds.

`prepare(source)` builds the skeleton, applies the plan (requires_grad, treatments) and the
job's setup (tracer, activation checkpointing, prefix cache); the engine then shards it and
calls one `Filler` method:

- `replicate`: DDP / ZeRO-1/2 replicas, each tensor read once straight in the training dtype;
- `module_init`: FSDP1's `param_init_fn`, one unit at a time before it is flattened and sharded;
- `sharded`: FSDP2 after `fully_shard`, each rank reading only the rows of its DTensor shards
  (`safe_open(...).get_slice`): no rank ever holds a whole tensor it does not own;
- `partition`: ZeRO-3, one module at a time partitioned by `deepspeed.zero.Init`, then each
  rank reads the rows that hold its own partition (zero.Init's broadcast skipped).

Values come from the safetensors files; LoRA adapters (drawn by peft from the plan's seed,
kept on the CPU while their base layer is on meta) and buffers (computed by the constructors)
are kept from the skeleton; mask scores are derived from their weight as inject_masks does;
parameters a checkpoint lacks (a task head on a base model) get the model's own init, seeded.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from lfdist.model.treatments import SCORES


def prepare(x):
    """(model, filler): a built nn.Module passes through (filler None); a ModelSource is built
    on meta (or whole, with its debug switch) with the plan and its setup applied."""
    if isinstance(x, nn.Module):
        return x, None
    from lfdist.model.apply import apply_plan

    if x.whole:
        model = x.load_whole()
        applied = apply_plan(model, x.plan)
        filler = None
    else:
        model = x.skeleton()
        with _adapters_stay_real():
            applied = apply_plan(model, x.plan)
        filler = Filler(model, x)  # names are taken before setup wraps any module
    if x.setup is not None:
        x.setup(model, applied)
    return model, filler


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
        # Names are mapped to checkpoint keys now, before setup and sharding wrap any module.
        self.reader = Reader(source.weights_folder())
        located = locate(model, self.reader.index)
        self._keys = {name: key for name, (key, _) in located.items()}
        for module in model.modules():
            for attr, _ in module.named_parameters(recurse=False):
                name = self._name(module, attr)
                if attr != SCORES and name not in self.keep and self._keys.get(name) is None:
                    self.keep[name] = self._initialized(module, attr)

    def _name(self, module: nn.Module, attr: str) -> str:
        prefix = self.qualname[id(module)]
        name = f"{prefix}.{attr}" if prefix else attr
        return self.alias.get(name, name)

    def value(self, module: nn.Module, attr: str, rows=None) -> torch.Tensor:
        """The parameter `attr` of `module` (pre-wrap names), all of it or `rows` of dim 0."""
        name = self._name(module, attr)
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

    def _initialized(self, module: nn.Module, attr: str) -> torch.Tensor:
        """A parameter the checkpoint lacks (a task head): the model's init, seeded (the same on
        every rank)."""
        tmp = copy.deepcopy(module).to_empty(device="cpu", recurse=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.source.seed)
            self.model._init_weights(tmp)
        return getattr(tmp, attr).detach()

    def _buffers(self, module: nn.Module, device) -> None:
        for attr, b in list(module._buffers.items()):
            name = self._name(module, attr)
            if b is not None and name in self.keep:
                module._buffers[attr] = self.keep[name].to(device)

    def _module(self, module: nn.Module, device, done: dict) -> None:
        """Every direct parameter of `module` made real and filled (tied ones shared)."""
        with torch.no_grad():
            for attr, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in done:
                    value = self.value(module, attr).to(device=device, dtype=p.dtype)
                    done[id(p)] = nn.Parameter(value, requires_grad=p.requires_grad)
                module._parameters[attr] = done[id(p)]
        self._buffers(module, device)

    def replicate(self, model: nn.Module, device) -> None:
        done = {}
        for module in model.modules():
            self._module(module, device, done)

    def module_init(self, device):
        """FSDP1's param_init_fn: it calls it per module of a unit before flattening that unit."""
        done = {}
        return lambda module: self._module(module, device, done)

    def sharded(self, model: nn.Module, device) -> None:
        """FSDP2, after fully_shard: every rank reads the rows of its own shards only."""
        from torch.distributed.tensor import DTensor

        model.to_empty(device=device)
        seen = set()
        with torch.no_grad():
            for module in model.modules():
                self._buffers(module, device)
                for attr, p in module._parameters.items():
                    if p is None or id(p) in seen:
                        continue
                    seen.add(id(p))
                    if isinstance(p, DTensor):
                        local = p.to_local()
                        rows = _local_rows(p)
                        local.copy_(self.value(module, attr, rows).to(local.dtype))
                    else:
                        p.copy_(self.value(module, attr).to(p.dtype))

    def partition(self, model: nn.Module, device, ds_config: dict, before_partition=None) -> None:
        """ZeRO-3: one module at a time (children first) partitioned by zero.Init, then each
        rank fills its own partition from the rows of the files that hold it: no rank reads,
        converts or receives a whole tensor. With `before_partition(module)` (frozen weights
        kept whole, out of ZeRO-3) a module is made real first, since it keeps some whole."""
        import deepspeed

        done, filled = {}, set()
        rank, world = _rank_world()
        with _partition_without_broadcast():
            for module in reversed(list(model.modules())):
                if not any(p.is_meta for p in module._parameters.values() if p is not None):
                    self._buffers(module, device)
                    continue
                if before_partition is not None:
                    self._module(module, device, done)
                    filled.update(done)
                    before_partition(module)
                else:
                    self._empty(module, device, done)
                if any(p is not None for p in module._parameters.values()):
                    deepspeed.zero.Init(module=module, config_dict_or_path=ds_config)
                for attr, p in module._parameters.items():
                    if p is not None and id(p) not in filled:
                        filled.add(id(p))
                        self._fill_partition(module, attr, p, rank, world)

    def _empty(self, module: nn.Module, device, done: dict) -> None:
        """Every direct parameter of `module` allocated, not written: untouched pages are not
        resident, and zero.Init (without its broadcast) copies only this rank's part."""
        for attr, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                empty = torch.empty(p.shape, dtype=p.dtype, device=device)
                done[id(p)] = nn.Parameter(empty, requires_grad=p.requires_grad)
            module._parameters[attr] = done[id(p)]
        self._buffers(module, device)

    def _fill_partition(self, module: nn.Module, attr: str, p, rank: int, world: int) -> None:
        """This rank's flat elements [rank x size, (rank + 1) x size) of the parameter, read
        as the row range that covers them (DeepSpeed's layout: a flat split, zero padding)."""
        part = p.ds_tensor
        size = part.ds_numel
        if size * world != p.ds_numel_aligned:
            raise RuntimeError(
                f"ZeRO-3 partition of {self._name(module, attr)}: {size} x {world} ranks != "
                f"{p.ds_numel_aligned} elements; a layout this loader does not know"
            )
        start, stop = rank * size, min(p.ds_numel, (rank + 1) * size)
        with torch.no_grad():
            part.zero_()
            if stop > start:
                shape = tuple(p.ds_shape)
                row = math.prod(shape[1:]) if len(shape) > 1 else 1
                r0, r1 = start // row, -(-stop // row)
                rows = (r0, r1) if shape else None
                flat = self.value(module, attr, rows).reshape(-1)
                lo = start - r0 * row if shape else 0
                part[: stop - start].copy_(flat[lo : lo + stop - start].to(part.dtype))


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


@contextlib.contextmanager
def _partition_without_broadcast():
    """zero.Init broadcasts rank 0's values of each parameter before partitioning it, so every
    rank would hold the whole tensor once; here every rank fills its own partition from the
    files afterwards, so the broadcast is skipped (DeepSpeed's own steps otherwise)."""
    from deepspeed.runtime.zero.partition_parameters import Init

    original = getattr(Init, "_zero_init_param", None)
    if original is None:  # another DeepSpeed: its own broadcast stays, results are the same
        yield
        return

    def partition_only(self, param):
        self._convert_to_deepspeed_param(param)
        param.partition()

    Init._zero_init_param = partition_only
    try:
        yield
    finally:
        Init._zero_init_param = original


def _local_rows(p) -> tuple[int, int] | None:
    """Rows [start, stop) of dim 0 that this rank's shard of DTensor `p` holds."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if all(isinstance(pl, Replicate) for pl in p.placements):
        return None
    if not all(
        isinstance(pl, Shard | Replicate) and getattr(pl, "dim", 0) == 0 for pl in p.placements
    ):
        raise NotImplementedError(f"loading a DTensor sharded as {p.placements}")
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if not shape:
        return None
    return offset[0], offset[0] + shape[0]
