"""DDP (and a single process): the reference engines. Frozen parameters are replicated."""

from __future__ import annotations

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lfdist.engines.base import compile_blocks, keep_trainable_in, run_precision
from lfdist.engines.fill import fill_from_files
from lfdist.engines.native import NativeEngine


def shard(u, cfg, world):
    """`u` (lfdist.model.materialize.Unsharded) filled on this rank's device and wrapped."""
    precision = run_precision(u, cfg)
    model = u.model
    keep_trainable_in(model, precision, u.plan)
    compile_blocks(model, cfg.compile)
    if u.filler is None:
        model = model.to(world.device)
    else:  # a replica by design: each tensor read once, in the training dtype, on the device
        fill_from_files(u.filler, model, world.device)
    if cfg.engine == "ddp" and dist.is_initialized() and world.world_size > 1:
        device_ids = [world.device.index] if world.device.type == "cuda" else None
        # DDP only registers hooks on parameters that require grad, so frozen blocks cost no
        # gradient buckets and no all-reduce.
        model = DistributedDataParallel(model, device_ids=device_ids)
    return NativeEngine(cfg.engine, model, cfg, world, precision)
