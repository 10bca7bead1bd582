"""Filling a model built on the meta device from its safetensors files, for the engines whose
layout torch.distributed.checkpoint knows: FSDP2's DTensor shards and whole replicas (DDP, a
single process, ZeRO-1/2). FSDP1 fills one unit at a time (engines/fsdp.py), ZeRO-3 its
partitions (engines/zero3_fill.py).
"""

from __future__ import annotations

import torch
from torch import nn


def fill_from_files(filler, model: nn.Module, device) -> None:
    """Make the meta-device model real on `device` and fill it. What the files hold goes
    through the stock loader (torch.distributed.checkpoint's Hugging Face reader, which reads
    each tensor's slice this rank holds and casts it to the parameter's dtype): FSDP2's shards
    (after fully_shard, every rank reads the rows of its own shards only) and whole replicas
    (DDP, ZeRO-1/2) alike. The rest (LoRA adapters, mask scores, a fresh head) is cut from the
    filler's own values."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load
    from torch.distributed.tensor import DTensor

    tied = _shared_slots(model)
    model.to_empty(device=device)
    for slots in tied:  # to_empty makes a new Parameter per module: tie them again
        module, attr = slots[0]
        for other, name in slots[1:]:
            other._parameters[name] = module._parameters[attr]
    from_files, rest, seen = {}, [], set()
    for module in model.modules():
        filler.buffers(module, device)
        for attr, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            key = filler.key(module, attr)
            if key is None:
                rest.append((module, attr, p))
            else:
                from_files[key] = p
    with torch.no_grad():
        load(from_files, storage_reader=HuggingFaceStorageReader(filler.reader.folder))
        for module, attr, p in rest:
            if isinstance(p, DTensor):
                local = p.to_local()
                local.copy_(filler.value(module, attr, _local_rows(p)).to(local.dtype))
            else:
                p.copy_(filler.value(module, attr).to(p.dtype))


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
