"""Engine adapters: the only code that knows ZeRO stages, FSDP units and partitioned shapes.

Each engine module exposes `build(model, cfg, world) -> Engine` (see base.Engine).
"""

from __future__ import annotations

from lfdist.errors import UserError


def build_engine(name: str, model, cfg, world):
    if name in ("ddp", "single"):
        from lfdist.engines.ddp import build
    elif name in ("fsdp2", "fsdp1"):
        from lfdist.engines.fsdp import build
    elif name == "deepspeed":
        from lfdist.engines.deepspeed import build
    else:
        raise UserError(f"unknown engine {name!r}; use ddp, fsdp1, fsdp2, deepspeed or single")
    return build(model, cfg, world)
