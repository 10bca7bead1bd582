"""Engine adapters: the only code that knows ZeRO stages, FSDP units and partitioned shapes.

Each engine module exposes `build(source, cfg, world) -> Engine` (see base.Engine). `source` is
a lfdist.model.source.ModelSource carrying the plan: the engine builds it on the meta device,
shards it, and fills what its rank holds in its own layout: fill.fill_from_files through the
stock DCP loader (FSDP2 shards, DDP and ZeRO-1/2 replicas), FSDP1 one unit at a time, and
zero3_fill for ZeRO-3 partitions, all from the values of lfdist.model.materialize's Filler. An already built nn.Module is accepted too (in-process training of a
loaded model) and wrapped as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lfdist.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from lfdist.config import TrainConfig
    from lfdist.engines.base import Engine, World
    from lfdist.model.source import ModelSource


def build_engine(
    name: str, source: ModelSource | nn.Module, cfg: TrainConfig, world: World
) -> Engine:
    """The engine `name` over the model `source` names, materialized on this rank."""
    if name in ("ddp", "single"):
        from lfdist.engines.ddp import build
    elif name in ("fsdp2", "fsdp1"):
        from lfdist.engines.fsdp import build
    elif name == "deepspeed":
        from lfdist.engines.deepspeed import build
    else:
        raise UserError(f"unknown engine {name!r}; use ddp, fsdp1, fsdp2, deepspeed or single")
    return build(source, cfg, world)
