"""Frozen-prefix activation cache: the frozen prefix is a fixed function of the input, so its
output per training example is computed once (first epoch) and replayed afterwards, skipping
the prefix forward. The embeddings still run (cheap); blocks below the boundary do not.

Bounded: the whole cache must fit `max_bytes` of host memory on every rank (each rank keeps
every example, since epochs reshuffle examples across ranks), checked before training starts.
With `spill_dir` the cache is a memory-mapped file per rank in that folder instead (created
and unlinked at once, so nothing is left behind even if the rank is killed): the kernel pages
it out to disk, so it may exceed host memory; it must fit the folder's free space.
Exact as long as the prefix is deterministic (no dropout active in frozen blocks).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
from torch import nn

from lfdist.errors import UserError
from lfdist.train.collective import all_ranks_agree
from lfdist.train.measure import available_memory_bytes

DISK_MARGIN = 2**30  # free space a spill leaves on its disk


class _Cache:
    def __init__(self, store: torch.Tensor, spilled: bool = False):
        # [n_examples, seq, hidden]; the pages of a row become resident (or are written to the
        # spill file) only when that example is recorded.
        self.store = store
        self.filled = torch.zeros(store.shape[0], dtype=torch.bool)
        self.spilled = spilled
        self.indices: torch.Tensor | None = None
        self.replaying = False
        self.active = False  # off outside training steps (evaluation runs the prefix normally)
        self.tuple_len = 0  # the block output's structure: 0 = a bare tensor
        self.hits = 0
        self.misses = 0

    def select(self, indices: torch.Tensor) -> None:
        self.active = True
        self.indices = indices
        self.replaying = all_ranks_agree(bool(self.filled[indices.cpu()].all()))
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
            out = cache.store[cache.indices.cpu()]
            return cache.pack(out.to(hidden_states.device, hidden_states.dtype))
        out = self.block(hidden_states, *args, **kwargs)
        if not cache.active:
            return out
        hidden = out[0] if isinstance(out, tuple) else out
        cache.tuple_len = len(out) if isinstance(out, tuple) else 0
        rows, indices = _gather(hidden.detach(), cache.indices.to(hidden.device))
        cache.store[indices] = rows.to(cache.store.dtype)
        cache.filled[indices] = True
        return out


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


def check_spill_dir(spill_dir: str) -> None:
    """The launcher checks this before out/ exists; the ranks again before they map the file."""
    if not os.path.isdir(spill_dir):
        raise UserError(f"train.cache_spill_dir {spill_dir!r} is not a folder; create it")


def _spill_store(folder: str, shape: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """A tensor backed by a new file in `folder`, unlinked as soon as it is mapped."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    fd, path = tempfile.mkstemp(prefix=f"lfdist-prefix-cache-rank{rank}-", dir=folder)
    os.close(fd)
    try:
        n = shape[0] * shape[1] * shape[2]
        return torch.from_file(path, shared=True, size=n, dtype=dtype).view(shape)
    finally:
        os.unlink(path)  # the mapping keeps the pages; the name goes now


def install_prefix_cache(
    blocks: nn.ModuleList,
    boundary: int,
    n_examples: int,
    seq_len: int,
    hidden: int,
    dtype: torch.dtype,
    max_bytes: int,
    spill_dir: str | None = None,
) -> _Cache:
    """Wrap blocks 0..boundary-1 (all frozen) so the cache can skip them. Call before sharding."""
    if boundary < 1:
        raise UserError("--cache-frozen-prefix needs a frozen prefix; this plan trains block 0")
    if any(p.requires_grad for b in list(blocks)[:boundary] for p in b.parameters()):
        raise UserError("--cache-frozen-prefix needs every block below the boundary frozen")
    shape = (n_examples, seq_len, hidden)
    need = n_examples * seq_len * hidden * torch.empty((), dtype=dtype).element_size()
    if spill_dir is not None:
        check_spill_dir(spill_dir)
        free = shutil.disk_usage(spill_dir).free
        if need + DISK_MARGIN > free:
            raise UserError(
                f"the frozen-prefix cache needs {need / 2**30:.2f} GiB on every rank but "
                f"{spill_dir!r} has {free / 2**30:.2f} GiB free (1 GiB is left spare); use "
                "another train.cache_spill_dir or fewer examples (data.max_examples)"
            )
        cache = _Cache(_spill_store(spill_dir, shape, dtype), spilled=True)
    else:
        if need > max_bytes:
            raise UserError(
                f"the frozen-prefix cache needs {need / 2**30:.2f} GiB for {n_examples} examples "
                f"but train.cache_max_gib allows {max_bytes / 2**30:.2f}; raise it, set "
                "train.cache_spill_dir (a memory-mapped file on disk) or drop --cache-frozen-prefix"
            )
        free = available_memory_bytes()
        if free is not None and need > free // 2:  # a raised cap still must not take the node down
            raise UserError(
                f"the frozen-prefix cache needs {need / 2**30:.2f} GiB on every rank but this "
                f"machine has {free / 2**30:.2f} GiB available; set train.cache_spill_dir (a "
                "memory-mapped file on disk), use fewer examples (data.max_examples) or drop "
                "--cache-frozen-prefix"
            )
        cache = _Cache(torch.empty(shape, dtype=dtype))
    for i in range(boundary):
        blocks[i] = (_Last if i == boundary - 1 else _Skip)(blocks[i], cache)
    return cache
