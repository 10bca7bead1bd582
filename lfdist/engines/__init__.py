"""Engine adapters: the only code that knows ZeRO stages, FSDP units and partitioned shapes.

`build_engine(name, source, plan, cfg, world)` is `shard(prepare(source, plan), cfg, world)`:
lfdist.model.materialize.prepare builds the lfdist.model.source.ModelSource on the meta device
with the plan applied; each engine module's `shard(unsharded, cfg, world) -> Engine` (see
base.Engine) wraps it and fills what its rank holds in its own layout: through the stock DCP
loader (engines/fill.py: FSDP2 shards, DDP and ZeRO-1/2 replicas, FSDP1 one unit at a time
before it flattens it) for what the files hold, with materialize's Filler for the rest, and
zero3_fill for ZeRO-3 partitions (rows read by the Filler's reader). An
already built nn.Module is accepted too (in-process training of a loaded model) and wrapped
as it is. A job that changes the module before sharding (the recipe's tracer, activation
checkpointing and prefix cache) calls prepare and shard_engine itself: data in, data out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lfdist.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from lfdist.config import TrainConfig
    from lfdist.engines.base import Engine, World
    from lfdist.model.materialize import Unsharded
    from lfdist.model.source import ModelSource
    from lfdist.plan import Plan


def build_engine(
    name: str, source: ModelSource | nn.Module, plan: Plan | None, cfg: TrainConfig, world: World
) -> Engine:
    """The engine `name` over the model `source` names with `plan` applied, materialized on
    this rank. A built nn.Module is taken as it is (its plan already applied, if any)."""
    from lfdist.model.materialize import prepare

    return shard_engine(name, prepare(source, plan), cfg, world)


def shard_engine(name: str, unsharded: Unsharded, cfg: TrainConfig, world: World) -> Engine:
    """The engine `name` over a prepared model (lfdist.model.materialize.prepare), for a job
    that changes the module between the plan and sharding (lfdist.train.recipe)."""
    if name in ("ddp", "single"):
        from lfdist.engines.ddp import shard
    elif name in ("fsdp2", "fsdp1"):
        from lfdist.engines.fsdp import shard
    elif name == "deepspeed":
        from lfdist.engines.deepspeed import shard
    else:
        raise UserError(f"unknown engine {name!r}; use ddp, fsdp1, fsdp2, deepspeed or single")
    return shard(unsharded, cfg, world)
