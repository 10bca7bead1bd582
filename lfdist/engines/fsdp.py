"""FSDP2 (`fully_shard` per block, then the root) and FSDP1 (one unit per block).

The plan is applied before wrapping, so each block unit is all-frozen or all-trainable.
FSDP1 refuses mixed units (its flat parameters cannot mix requires_grad cleanly).
"""

from __future__ import annotations

import functools

from torch import nn

from lfdist.engines.native import NativeEngine
from lfdist.errors import UserError
from lfdist.model.blocks import find_blocks


def _mixed_units(blocks: nn.ModuleList) -> list[int]:
    return [i for i, b in enumerate(blocks) if len({p.requires_grad for p in b.parameters()}) > 1]


def _fsdp2(model: nn.Module, world) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(world.device.type, (world.world_size,))
    for block in find_blocks(model).blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp1(model: nn.Module, world) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    blocks = find_blocks(model).blocks(model)
    mixed = _mixed_units(blocks)
    if mixed:
        raise UserError(
            f"fsdp1 cannot shard block {mixed[0]}: it mixes frozen and trainable parameters; "
            "use --engine fsdp2 for bias/partial treatments"
        )
    block_ids = {id(b) for b in blocks}
    policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: id(m) in block_ids)
    device_id = world.device if world.device.type == "cuda" else None
    return FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=device_id,
                sync_module_states=False)


def build(model, cfg, world):
    model = model.to(world.device)
    wrapped = _fsdp2(model, world) if cfg.engine == "fsdp2" else _fsdp1(model, world)
    return NativeEngine(cfg.engine, wrapped, cfg, world)

