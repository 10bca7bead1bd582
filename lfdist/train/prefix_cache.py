"""Frozen-prefix activation cache: the frozen prefix is a fixed function of the input, so its
output per training example is computed once (first epoch) and replayed afterwards, skipping
the prefix forward. The embeddings still run (cheap); blocks below the boundary do not.

Bounded: the whole cache must fit `max_bytes` of host memory on every rank (each rank keeps
every example, since epochs reshuffle examples across ranks), checked before training starts.
Exact as long as the prefix is deterministic (no dropout active in frozen blocks).
"""

from __future__ import annotations

import torch
from torch import nn

from lfdist.errors import UserError


class _Cache:
    def __init__(self, n_examples: int):
        self.store: list[torch.Tensor | None] = [None] * n_examples
        self.indices: torch.Tensor | None = None
        self.replaying = False
        self.active = False  # off outside training steps (evaluation runs the prefix normally)
        self.tuple_len = 0  # the block output's structure: 0 = a bare tensor
        self.hits = 0
        self.misses = 0

    def select(self, indices: torch.Tensor) -> None:
        self.active = True
        self.indices = indices
        self.replaying = _all_ranks(all(self.store[i] is not None for i in indices.tolist()))
        if self.replaying:
            self.hits += len(indices)
        else:
            self.misses += len(indices)

    def off(self) -> None:
        self.active = self.replaying = False

    def pack(self, hidden: torch.Tensor):
        return (hidden,) + (None,) * (self.tuple_len - 1) if self.tuple_len else hidden


class _Skip(nn.Module):
    """A frozen block below the last one: passes its input through while replaying."""

    def __init__(self, block: nn.Module, cache: _Cache):
        super().__init__()
        self.block = block
        self.cache = cache

    def forward(self, hidden_states, *args, **kwargs):
        if self.cache.replaying:
            return self.cache.pack(hidden_states)
        return self.block(hidden_states, *args, **kwargs)


class _Last(_Skip):
    """The last frozen block: records its output per example, or replays it."""

    def forward(self, hidden_states, *args, **kwargs):
        cache = self.cache
        if cache.replaying:
            out = torch.stack([cache.store[i] for i in cache.indices.tolist()])
            return cache.pack(out.to(hidden_states.device, hidden_states.dtype))
        out = self.block(hidden_states, *args, **kwargs)
        if not cache.active:
            return out
        hidden = out[0] if isinstance(out, tuple) else out
        cache.tuple_len = len(out) if isinstance(out, tuple) else 0
        rows, indices = _gather(hidden.detach(), cache.indices.to(hidden.device))
        for row, i in zip(rows, indices.tolist()):
            cache.store[i] = row.clone()
        return out


def _all_ranks(flag: bool) -> bool:
    """True only if every rank says so: all ranks replay or record together (lockstep)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _gather(hidden: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank keeps every rank's prefix outputs: the next epoch reshuffles examples
    across ranks, so a rank must be able to replay an example another rank computed."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return hidden.cpu(), indices.cpu()
    n = dist.get_world_size()
    hs, ix = (
        [torch.empty_like(hidden) for _ in range(n)],
        [torch.empty_like(indices) for _ in range(n)],
    )
    dist.all_gather(hs, hidden.contiguous())
    dist.all_gather(ix, indices.contiguous())
    return torch.cat(hs).cpu(), torch.cat(ix).cpu()


def _comm_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def _available_bytes() -> int | None:
    """Linux's MemAvailable (free + reclaimable page cache); None where it is not reported."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def install_prefix_cache(
    blocks: nn.ModuleList,
    boundary: int,
    n_examples: int,
    seq_len: int,
    hidden: int,
    element_size: int,
    max_bytes: int,
) -> _Cache:
    """Wrap blocks 0..boundary-1 (all frozen) so the cache can skip them. Call before sharding."""
    if boundary < 1:
        raise UserError("--cache-frozen-prefix needs a frozen prefix; this plan trains block 0")
    if any(p.requires_grad for b in list(blocks)[:boundary] for p in b.parameters()):
        raise UserError("--cache-frozen-prefix needs every block below the boundary frozen")
    need = n_examples * seq_len * hidden * element_size
    if need > max_bytes:
        raise UserError(
            f"the frozen-prefix cache needs {need / 2**30:.2f} GiB for {n_examples} examples but "
            f"train.cache_max_gib allows {max_bytes / 2**30:.2f}; raise it or drop --cache-frozen-prefix"
        )
    free = _available_bytes()
    if free is not None and need > free // 2:  # a raised cap still must not take the node down
        raise UserError(
            f"the frozen-prefix cache needs {need / 2**30:.2f} GiB on every rank but this machine "
            f"has {free / 2**30:.2f} GiB available; use fewer examples (data.max_examples) or "
            "drop --cache-frozen-prefix"
        )
    cache = _Cache(n_examples)
    for i in range(boundary):
        blocks[i] = (_Last if i == boundary - 1 else _Skip)(blocks[i], cache)
    return cache
