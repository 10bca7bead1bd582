"""Measured: the probe of a generated 1.1B Llama in bf16, per-process peak memory.

    python benchmarks/scale/measure_probe.py [OUT_DIR]

The same generated model as measure_load.py (TinyLlama's shape, 1.10B parameters, sharded fp32
safetensors in a temporary folder, random and seeded). `lfdist probe` runs it in bf16 (8
calibration examples of 32 tokens, batch 4) three ways, each in a process of its own:

- whole: the model loaded whole in the probing process (probe.stream_layers=false);
- streamed: one block resident at a time in that process (what `lfdist probe` now does by
  default where the whole model would take over half the memory available);
- ray, 2 workers, streamed: two Ray actors, each streaming its half of the examples.

Each process's anonymous memory (RssAnon in /proc/PID/status: memory-mapped file pages do not
count) is polled every 50 ms, for the probing process and every process it starts (Ray's
actors included). The probes' statistics must agree (same deviation trace). Target (issue 16):
per process < 0.6 x the model's bf16 bytes + 0.9 GiB, as training now loads it. About 1.5
minutes on 2 cores, 4.10 GiB of temporary disk.
Results: probe_1b.json and probe_1b.md next to this file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from measure_load import GIB, _rss_anon, generate  # noqa: E402

SETTINGS = {
    "whole": ["probe.stream_layers=false"],
    "streamed": ["--stream-layers"],
    "ray, 2 workers, streamed": ["--stream-layers", "--orchestrator", "ray", "--workers", "2"],
}


def measure(folder: str, out: str, extra: list[str]) -> dict:
    import psutil

    argv = [sys.executable, "-m", "lfdist.cli", "probe", "--model", folder]
    argv += ["--data", "synthetic:lm:16", "--seq-len", "32", "--samples", "8", "--out", out]
    argv += [*extra, "model.dtype=bfloat16", "probe.batch_size=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    peaks: dict[int, tuple[str, int]] = {}
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    top = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [top, *top.children(recursive=True)]
        except psutil.Error:
            tree = [top]
        for p in tree:
            anon = _rss_anon(p.pid)
            if anon is None or anon <= peaks.get(p.pid, ("", 0))[1]:
                continue
            try:
                name = " ".join(p.cmdline())[:120]
            except psutil.Error:
                name = peaks.get(p.pid, ("", 0))[0]
            peaks[p.pid] = (name, anon)
        time.sleep(0.05)
    reader.join(timeout=5)
    if proc.returncode != 0:
        raise RuntimeError(f"probe failed ({proc.returncode}):\n{''.join(lines[-20:])}")
    from lfdist.probe import load_probe

    deviation = list(load_probe(out).deviation)
    actors = [v for v in peaks.values() if "ProbeActor" in v[0]]
    return {
        "wall_s": time.monotonic() - t0,
        "probing_process_gib": peaks[proc.pid][1] / GIB,
        "actor_gib": [a[1] / GIB for a in actors],
        "peak_any_process_gib": max(v[1] for v in peaks.values()) / GIB,
        "deviation": deviation,
    }


def main(out_dir: str = HERE) -> str:
    from lfdist.bench.record import environment

    rows = {}
    with tempfile.TemporaryDirectory(prefix="lfdist-probe-1b-") as work:
        folder = os.path.join(work, "model")
        os.makedirs(folder)
        params = generate(folder)
        for name, extra in SETTINGS.items():
            print(f"probe: {name}", flush=True)
            rows[name] = measure(folder, os.path.join(work, f"{len(rows)}.json"), extra)
    bf16 = 2 * params / GIB
    target = 0.6 * bf16 + 0.9
    ref = rows["whole"]["deviation"]
    for r in rows.values():  # the same statistics, whichever way the model was held
        r["trace_max_abs_diff_vs_whole"] = max(abs(a - b) for a, b in zip(r["deviation"], ref))
    result = {
        "params": params,
        "bf16_model_gib": bf16,
        "target_per_process_gib": target,
        "rows": rows,
        "environment": environment(),
    }
    with open(os.path.join(out_dir, "probe_1b.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [
        "# Probing a generated 1.1B Llama in bf16: peak memory per process",
        "",
        f"Written by `measure_probe.py`. {params:,} parameters, {bf16:.2f} GiB in bf16; 8 "
        "calibration examples of 32 tokens. Peak anonymous memory (RssAnon, polled every "
        f"50 ms). Target per process: 0.6 x {bf16:.2f} + 0.9 = {target:.2f} GiB.",
        "",
        "| probe | probing process (GiB) | Ray actors (GiB) | within target | wall s "
        "| trace vs whole (max abs diff) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        actors = ", ".join(f"{a:.2f}" for a in r["actor_gib"]) or "-"
        worst = max([r["probing_process_gib"], *r["actor_gib"]])
        lines.append(
            f"| {name} | {r['probing_process_gib']:.2f} | {actors} | "
            f"{'yes' if worst < target else 'no'} | {r['wall_s']:.0f} | "
            f"{r['trace_max_abs_diff_vs_whole']:.2e} |"
        )
    lines.append("")
    md = os.path.join(out_dir, "probe_1b.md")
    with open(md, "w") as f:
        f.write("\n".join(lines))
    return md


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
