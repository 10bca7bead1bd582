"""Benchmarks behind `lfdist bench`: results as JSON + Markdown + PNG with versions and hardware."""

from __future__ import annotations

from lfdist.errors import UserError


def run_bench(kind: str, out: str, tiny: bool = True, reuse: str | None = None) -> str:
    if reuse and kind != "quality":
        raise UserError(f"--reuse is for bench quality only, not bench {kind}; drop it")
    if kind == "memory":
        from lfdist.bench.memory import run
    elif kind == "probe":
        from lfdist.bench.probe import run
    elif kind == "quality":
        from lfdist.bench.quality import run as quality

        return quality(out, tiny=tiny, reuse=reuse)
    else:
        raise UserError(f"unknown benchmark {kind!r}; use memory, quality or probe")
    return run(out, tiny=tiny)
