"""FSDP2 (`fully_shard` per block, then the root) and FSDP1 (one unit per block).

The plan is applied before wrapping, so each block unit is all-frozen or all-trainable.
The model arrives on the meta device; it is sharded first and then each rank fills only the
shards it holds through the stock torch.distributed.checkpoint loader (lfdist.engines.fill):
FSDP2 after sharding (each rank reads its rows), FSDP1 one unit at a time before it flattens it.
FSDP1 refuses mixed units (its flat parameters cannot mix requires_grad cleanly).
"""

from __future__ import annotations

import functools
import logging

from torch import nn

from lfdist.engines.base import compile_blocks, keep_trainable_in, run_precision
from lfdist.engines.fill import fill_from_files, unit_filler
from lfdist.engines.native import NativeEngine
from lfdist.errors import UserError
from lfdist.model.blocks import find_blocks

log = logging.getLogger(__name__)


def _mixed_units(blocks: nn.ModuleList) -> list[int]:
    return [i for i, b in enumerate(blocks) if len({p.requires_grad for p in b.parameters()}) > 1]


def _fsdp2(model: nn.Module, world, filler=None, precision=None) -> nn.Module:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(world.device.type, (world.world_size,))
    # Mixed precision: every unit all-gathers in the compute dtype (a no-op for frozen units
    # already stored in it) and reduce-scatters trainable gradients in fp32 into the fp32
    # shards (torchtitan's recipe).
    mp = MixedPrecisionPolicy()
    if precision is not None and precision.mixed:
        mp = MixedPrecisionPolicy(
            param_dtype=getattr(torch, precision.compute), reduce_dtype=torch.float32
        )
    # Embeddings and an untied LM head are units of their own (as torchtitan does): gathered
    # only while used, not for the whole step as part of the root.
    for module in _outside_units(model):
        fully_shard(module, mesh=mesh, mp_policy=mp)
    for block in find_blocks(model).blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if filler is not None:  # sharded on meta: each rank now reads the rows of its shards
        fill_from_files(filler, model, world.device)
    return model


def _outside_units(model: nn.Module) -> list[nn.Module]:
    bmap = find_blocks(model)
    tied = _tied_param_ids(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    units = [
        m
        for n, m in model.named_modules()
        if isinstance(m, nn.Embedding) and bmap.block_of(n + ".weight") is None
    ]
    units += [head] if isinstance(head, nn.Linear) else []
    return [m for m in units if not any(id(p) in tied for p in m.parameters())]


def _fsdp1(model: nn.Module, world, filler=None) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    bmap = find_blocks(model)
    blocks = bmap.blocks(model)
    mixed = _mixed_units(blocks)
    if mixed:
        raise UserError(
            f"fsdp1 cannot shard block {mixed[0]}: it mixes frozen and trainable parameters; "
            "use --engine fsdp2 for bias/partial treatments"
        )
    # Units: every block, every embedding outside the blocks, and the root with the rest.
    units = {id(b) for b in blocks}
    tied = _tied_param_ids(model)
    units |= {
        id(m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Embedding)
        and bmap.block_of(n + ".weight") is None
        and id(m.weight) not in tied
    }
    root_params = _root_params(model, units)
    if len({p.requires_grad for p in root_params}) > 1:
        if not tied:
            raise UserError(
                "fsdp1 cannot shard the root unit: the modules outside the blocks mix frozen and "
                "trainable parameters; use --engine fsdp2"
            )
        # A tied embedding cannot be its own FSDP1 unit (the head shares it), so the root
        # unit mixes it with the trainable head/norm: FSDP1 then keeps a zero gradient for it.
        log.warning(
            "fsdp1: tied embeddings share the root unit with trainable modules; "
            "fsdp2 avoids the extra gradient memory"
        )
    if len({p.dtype for p in root_params}) > 1:
        # A flat parameter holds one dtype: a frozen tied embedding in the root unit is kept in
        # fp32 next to the trainable masters there (fsdp2 keeps it in the model's dtype).
        for p in root_params:
            p.data = p.data.float()
    policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: id(m) in units)
    # An explicit device (CPU included) is what lets FSDP1 run on CPU with gloo.
    # On meta, FSDP1 calls param_init_fn per module of a unit before flattening and sharding
    # it: one unit is whole at a time, never the model.
    init = unit_filler(filler, world.device) if filler is not None else None
    return FSDP(
        model,
        auto_wrap_policy=policy,
        use_orig_params=True,
        device_id=world.device,
        param_init_fn=init,
    )


def _tied_param_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def _root_params(model: nn.Module, units: set[int]) -> list[nn.Parameter]:
    inside = {id(p) for m in model.modules() if id(m) in units for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in inside]


def shard(u, cfg, world):
    """`u` (lfdist.model.materialize.Unsharded, on meta unless whole: frozen and trainable set
    first) sharded into FSDP units and filled where this rank holds them."""
    precision = run_precision(u, cfg)
    model = u.model
    keep_trainable_in(model, precision, u.plan)  # fp32 masters, on meta
    compile_blocks(model, cfg.compile)
    if u.filler is None:
        model = model.to(world.device)
    if cfg.engine == "fsdp2":
        wrapped = _fsdp2(model, world, u.filler, precision)
    else:
        wrapped = _fsdp1(model, world, u.filler)
    return NativeEngine(cfg.engine, wrapped, cfg, world, precision)
