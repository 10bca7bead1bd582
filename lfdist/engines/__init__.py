"""Engine adapters: the only code that knows ZeRO stages, FSDP units and partitioned shapes.

Each engine module exposes `build(source, cfg, world) -> Engine` (see base.Engine). `source` is
a lfdist.model.source.ModelSource carrying the plan: the engine builds it on the meta device and
materializes what its rank holds (lfdist.model.materialize). An already built nn.Module is
accepted too (in-process training of a loaded model) and wrapped as it is.
"""

from __future__ import annotations

from lfdist.errors import UserError


def build_engine(name: str, source, cfg, world):
    if name in ("ddp", "single"):
        from lfdist.engines.ddp import build
    elif name in ("fsdp2", "fsdp1"):
        from lfdist.engines.fsdp import build
    elif name == "deepspeed":
        from lfdist.engines.deepspeed import build
    else:
        raise UserError(f"unknown engine {name!r}; use ddp, fsdp1, fsdp2, deepspeed or single")
    return build(source, cfg, world)
