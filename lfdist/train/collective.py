"""The collectives the training code shares: every rank agreeing on one yes/no, every rank's
small Python object gathered, and one check that a rank's tensors are finite."""

from __future__ import annotations

import torch
import torch.distributed as dist


def comm_device() -> torch.device:
    """Where a small collective's tensor lives: the current GPU (NCCL), else the CPU (gloo)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ranks_agree(flag: bool) -> bool:
    """True only if every rank says True (a MIN all-reduce); this rank's own answer outside a
    process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank; [obj] outside a process group."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_finite(tensors) -> bool:
    """Every tensor finite (DTensors checked on their local shard: each rank its own part)."""
    for t in tensors:
        to_local = getattr(t, "to_local", None)
        local = (to_local() if to_local is not None else t).detach()
        if not bool(torch.isfinite(local).all()):
            return False
    return True
