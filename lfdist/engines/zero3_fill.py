"""ZeRO-3's fill: the model partitioned module by module, each rank reading only its partition.

The filler (lfdist.model.materialize.Filler) gives the values; the layout here is DeepSpeed's
(a flat split of each parameter, zero padding), and zero.Init's broadcast of rank 0's values
is skipped, so no rank reads, converts or receives a whole tensor.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from lfdist.engines.fill import make_empty


def fill_partitioned(
    filler, model: nn.Module, device, ds_config: dict, before_partition=None
) -> None:
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
                filler.buffers(module, device)
                continue
            if before_partition is not None:
                filler.fill_module(module, device, done)
                filled.update(done)
                before_partition(module)
            else:  # allocated, not written: zero.Init (no broadcast) copies this rank's part
                make_empty(filler, module, device, done)
            if any(p is not None for p in module._parameters.values()):
                deepspeed.zero.Init(module=module, config_dict_or_path=ds_config)
            for attr, p in module._parameters.items():
                if p is not None and id(p) not in filled:
                    filled.add(id(p))
                    _fill_partition(filler, module, attr, p, rank, world)


def _fill_partition(filler, module: nn.Module, attr: str, p, rank: int, world: int) -> None:
    """This rank's flat elements [rank x size, (rank + 1) x size) of the parameter, read
    as the row range that covers them (DeepSpeed's layout: a flat split, zero padding)."""
    part = p.ds_tensor
    size = part.ds_numel
    if size * world != p.ds_numel_aligned:
        raise RuntimeError(
            f"ZeRO-3 partition of {filler.name(module, attr)}: {size} x {world} ranks != "
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
            flat = filler.value(module, attr, rows).reshape(-1)
            lo = start - r0 * row if shape else 0
            part[: stop - start].copy_(flat[lo : lo + stop - start].to(part.dtype))


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


@contextlib.contextmanager
def _partition_without_broadcast():
    """zero.Init broadcasts rank 0's values of each parameter before partitioning it, so every
    rank would hold the whole tensor once; here every rank fills its own partition from the
    files afterwards, so the broadcast is skipped (DeepSpeed's own steps otherwise).

    A patch of DeepSpeed's Init, restored on exit: DeepSpeed has no switch for partitioning
    without the broadcast (its `module=` path always broadcasts), so it stays."""
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
