"""Benchmarks behind `lfdist bench`: results as JSON + Markdown + PNG with versions and hardware."""

from __future__ import annotations

from lfdist.errors import UserError


def run_bench(kind: str, out: str, tiny: bool = True) -> str:
    if kind == "memory":
        from lfdist.bench.memory import run
    elif kind == "probe":
        from lfdist.bench.probe import run
    elif kind == "quality":
        raise UserError(
            "bench quality (the oracle sweep of SPEC section 6) is not built yet; "
            "bench memory and bench probe are"
        )
    else:
        raise UserError(f"unknown benchmark {kind!r}; use memory, quality or probe")
    return run(out, tiny=tiny)
