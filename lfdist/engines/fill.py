"""Filling a model built on the meta device from its safetensors files, through the stock
loader (torch.distributed.checkpoint's Hugging Face reader) for what the files hold and the
filler's own values for the rest (LoRA adapters, mask scores, a fresh head):

- `fill_from_files`: the whole model at once, in the layout torch.distributed.checkpoint knows:
  FSDP2's DTensor shards (each rank reads its rows) and whole replicas (DDP, a single process,
  ZeRO-1/2);
- `unit_filler`: FSDP1's param_init_fn, one module at a time before FSDP1 flattens its unit.

ZeRO-3 fills its partitions in engines/zero3_fill.py.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, load
from torch.distributed.tensor import DTensor


def fill_from_files(filler, model: nn.Module, device) -> None:
    """Make the meta-device model real on `device` and fill it. What the files hold goes
    through the stock loader (torch.distributed.checkpoint's Hugging Face reader, which reads
    each tensor's slice this rank holds and casts it to the parameter's dtype): FSDP2's shards
    (after fully_shard, every rank reads the rows of its own shards only) and whole replicas
    (DDP, ZeRO-1/2) alike. The rest (LoRA adapters, mask scores, a fresh head) is cut from the
    filler's own values."""
    tied = _shared_slots(model)
    model.to_empty(device=device)
    for slots in tied:  # to_empty makes a new Parameter per module: tie them again
        module, attr = slots[0]
        for other, name in slots[1:]:
            other._parameters[name] = module._parameters[attr]
    items, seen = [], set()
    for module in model.modules():
        filler.buffers(module, device)
        for attr, p in module._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                items.append((module, attr, p))
    _fill(filler, items, _Reader(filler.reader.folder))


def unit_filler(filler, device):
    """FSDP1's param_init_fn. FSDP1 calls it for each module of a unit (the unit's root first)
    before flattening that unit, so one unit is whole at a time, never the model. The first
    call makes the whole unit real on `device` (a tied parameter once, then shared) and fills
    it in one read without collectives (every rank reads the whole unit, which FSDP1 then
    shards); the calls for the unit's other modules find them done."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    done: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    reader, filled = _Reader(filler.reader.folder), set()

    def init(module: nn.Module) -> None:
        fresh, stack = [], [module]
        while stack:  # the unit: stop at the units already wrapped inside it
            m = stack.pop()
            stack += [c for c in m.children() if not isinstance(c, FullyShardedDataParallel)]
            if id(m) not in filled:
                filled.add(id(m))
                fresh += make_empty(filler, m, device, done)
        _fill(filler, fresh, reader, no_dist=True)

    return init


def make_empty(filler, module: nn.Module, device, done: dict) -> list:
    """Every direct parameter of `module` made real on `device`, allocated but not written
    (untouched pages are not resident), a tied one once and then shared; its buffers as the
    filler keeps them. Returns the (module, attr, parameter) made here. `done` maps id(meta) to
    (meta, real): holding the meta parameter keeps its id from being reused."""
    fresh = []
    for attr, p in list(module._parameters.items()):
        if p is None:
            continue
        if id(p) not in done:
            done[id(p)] = (p, nn.Parameter(torch.empty_like(p, device=device), p.requires_grad))
            fresh.append((module, attr, done[id(p)][1]))
        module._parameters[attr] = done[id(p)][1]
    filler.buffers(module, device)
    return fresh


def _fill(filler, items: list, reader, no_dist: bool = False) -> None:
    """Real (empty) parameters `items` ((module, attr, parameter)) filled: what the files hold
    through the stock loader, the rest from the filler's values (a DTensor's rows only)."""
    from_files, rest = {}, []
    for module, attr, p in items:
        key = filler.key(module, attr)
        if key is None:
            rest.append((module, attr, p))
        else:
            from_files[key] = p
    with torch.no_grad():
        if from_files or not no_dist:  # collective: every rank calls it, the same keys
            load(from_files, storage_reader=reader, no_dist=no_dist)
        for module, attr, p in rest:
            if isinstance(p, DTensor):
                local = p.to_local()
                local.copy_(filler.value(module, attr, _local_rows(p)).to(local.dtype))
            else:
                p.copy_(filler.value(module, attr).to(p.dtype))


class _Reader(HuggingFaceStorageReader):
    """The stock reader, reading the files' headers once for the many loads of one fill."""

    _headers = None

    def read_metadata(self):
        if self._headers is None:
            self._headers = super().read_metadata()
        return self._headers


def _shared_slots(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """(module, attribute) of every parameter that several modules hold (a tied head)."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                slots.setdefault(id(p), []).append((module, attr))
    return [s for s in slots.values() if len(s) > 1]


def _local_rows(p) -> tuple[int, int] | None:
    """Rows [start, stop) of dim 0 that this rank's shard of DTensor `p` holds, from the chunk
    DTensor describes for distributed checkpoints (its public protocol)."""
    from torch.distributed.tensor import Replicate, Shard

    if all(isinstance(pl, Replicate) for pl in p.placements):
        return None
    if not all(
        isinstance(pl, Shard | Replicate) and getattr(pl, "dim", 0) == 0 for pl in p.placements
    ):
        raise NotImplementedError(f"loading a DTensor sharded as {p.placements}")
    (chunk,) = p.__create_chunk_list__()
    if not len(chunk.sizes):  # a 0-d tensor has no rows to cut
        return None
    return chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0]
