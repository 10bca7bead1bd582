"""Probe throughput with 1 and 2 Ray workers, and the probe's cost against a fine-tuning run.

Usage: lfdist bench probe --tiny --out DIR     (or: python benchmarks/probe/run.py [--full])

Measured on one machine, side by side in one run:
- in-process probe (run_probe, one process, one thread) as the reference;
- Ray data-sharded probe with 1 and 2 CPU workers (one core each, on a local Ray of that many
  CPUs): `compute` is the slowest
  shard's forward pass (what sharding divides), `wall` the whole ray_probe call (data, actor
  start, model load, merge) on an already running Ray;
- 2-rank FSDP2 full fine-tuning (torchrun) on the same model and data: median step time;
  the probe's cost = probe time / (N x step time) for a run of N steps.
Each probe setting is repeated and the median kept. Results: probe.json, probe.md, probe.png.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

TINY = {
    "model": "tiny:llama",
    "task": "lm",
    "data": "synthetic:lm:1500",
    "seq_len": 128,
    "samples": 1024,
    "batch_size": 16,
    "train_batch": 8,
}
FULL = {
    "model": "pkg:smollm2-135m",
    "task": "lm",
    "data": "pkg:python-docs",
    "seq_len": 256,
    "samples": 128,
    "batch_size": 8,
    "train_batch": 4,
}
REPEATS = 3
RUN_STEPS = (100, 1000)  # fine-tuning runs the probe is priced against


def environment() -> dict:
    from lfdist.bench.record import environment as shared

    env = shared()
    dirty = subprocess.run(
        ["git", "-C", os.path.dirname(os.path.abspath(__file__)), "status", "--porcelain"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    env["uncommitted_changes"] = bool(dirty)
    return env


_BURN = "import time; t = time.perf_counter(); x = 0\nfor i in range(20_000_000): x += i\nprint(time.perf_counter() - t)"


def cpu_parallelism() -> float:
    """How much faster 2 CPU-bound processes finish than 1 does twice: 2.0 on two idle cores.
    The machine may be shared; this says how many cores the workers really had."""

    def burn(k: int) -> float:
        procs = [
            subprocess.Popen([sys.executable, "-c", _BURN], stdout=subprocess.PIPE, text=True)
            for _ in range(k)
        ]
        return max(float(p.communicate()[0]) for p in procs)

    return round(2 * burn(1) / burn(2), 2)


def _config(p: dict, **probe):
    from lfdist.config import config_from_dict

    return config_from_dict(
        {
            "model": {"spec": p["model"], "task": p["task"]},
            "data": {"spec": p["data"], "seq_len": p["seq_len"]},
            "probe": {"samples": p["samples"], "batch_size": p["batch_size"], **probe},
            "train": {
                "engine": "fsdp2",
                "nproc": 2,
                "steps": 12,
                "batch_size": p["train_batch"],
                "lr": 1e-4,
            },
        }
    )


def _median_row(name: str, runs: list[dict], samples: int) -> dict:
    compute = statistics.median(r["compute_s"] for r in runs)
    wall = statistics.median(r["wall_s"] for r in runs)
    return {
        "setting": name,
        "samples": samples,
        "compute_s": compute,
        "wall_s": wall,
        "compute_ex_per_s": samples / compute,
        "wall_ex_per_s": samples / wall,
        "runs": runs,
    }


def measure_probes(p: dict) -> tuple[list[dict], object]:
    from lfdist.orchestrate.cluster import start, stop
    from lfdist.orchestrate.probe import ray_probe
    from lfdist.probe import run_probe
    from lfdist.train.prepare import prepare

    cfg = _config(p)
    prepared = prepare(cfg)
    runs, result = [], None
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        result = run_probe(
            prepared.loaded.model,
            prepared.train,
            p["task"],
            batch_size=p["batch_size"],
            samples=p["samples"],
            progress=False,
        )
        runs.append({"compute_s": result.timings["forward_s"], "wall_s": time.perf_counter() - t0})
    rows = [_median_row("in-process", runs, result.stats.examples)]
    for workers in (1, 2):
        # A local Ray of `workers` CPUs: each actor gets one core (one thread), as each would
        # get one GPU; the ratio is then the data-parallel scaling.
        t0 = time.perf_counter()
        started = start(num_cpus=workers)
        ray_start_s = time.perf_counter() - t0
        try:
            runs = []
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                r = ray_probe(_config(p, orchestrator="ray", workers=workers), progress=False)
                runs.append(
                    {"compute_s": r.timings["forward_s"], "wall_s": time.perf_counter() - t0}
                )
        finally:
            stop(started)
        name = f"ray, {workers} worker{'s' if workers > 1 else ''}"
        rows.append({**_median_row(name, runs, r.stats.examples), "ray_start_s": ray_start_s})
    return rows, result


def measure_training(p: dict, probe_result, workdir: str) -> dict:
    from lfdist.job import Job
    from lfdist.launch.run import launch_training
    from lfdist.plan import save_plan
    from lfdist.select import select_plan

    plan_path = os.path.join(workdir, "plan-all.yaml")
    save_plan(select_plan(probe_result, "all"), plan_path)
    m = launch_training(Job(_config(p), plan_path, os.path.join(workdir, "train"), evaluate=False))
    steps = m["step_times"][2:]  # after warm-up
    return {
        "engine": "fsdp2",
        "world_size": 2,
        "plan": "all (full fine-tuning)",
        "batch_per_rank": p["train_batch"],
        "seq_len": p["seq_len"],
        "median_step_s": statistics.median(steps),
        "step_times": m["step_times"],
    }


def _markdown(rows: list[dict], train: dict, p: dict, env: dict) -> str:
    hw = env["hardware"]
    head = (
        f"Measured {env['date']} at commit {env['commit']}"
        f"{' (with uncommitted changes)' if env['uncommitted_changes'] else ''} on {hw['cpu']} "
        f"({hw['cpu_count']} cores, {hw['memory_gib']} GiB); "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
        + f". Load average before/after: {env['load_before']} / {env['load_after']}; "
        f"2 CPU-bound processes ran {env['cpu_parallelism_before']}x / "
        f"{env['cpu_parallelism_after']}x as fast as 1 (2.0 = two free cores).\n\n"
        f"Model {p['model']}, data {p['data']}, {p['samples']} probe samples of {p['seq_len']} "
        f"tokens, batch {p['batch_size']}; median of {REPEATS} runs.\n\n"
    )
    one = next(r for r in rows if r["setting"] == "ray, 1 worker")
    lines = [
        "| setting | compute s | ex/s (compute) | wall s | ex/s (wall) | speed-up vs 1 worker (compute / wall) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['compute_s']:.3f} | {r['compute_ex_per_s']:.1f} | {r['wall_s']:.2f} "
            f"| {r['wall_ex_per_s']:.1f} | {one['compute_s'] / r['compute_s']:.2f} / "
            f"{one['wall_s'] / r['wall_s']:.2f} |"
        )
    step = train["median_step_s"]
    lines += [
        "",
        f"Fine-tuning: {train['engine']}, {train['world_size']} ranks, {train['plan']}, batch "
        f"{train['batch_per_rank']} per rank: median step {step:.3f} s.",
        "",
        "| probe | = training steps | "
        + " | ".join(f"fraction of a {n}-step run" for n in RUN_STEPS)
        + " |",
        "|---|---:|" + "---:|" * len(RUN_STEPS),
    ]
    for r in rows:
        for kind in ("compute", "wall"):
            t = r[f"{kind}_s"]
            lines.append(
                f"| {r['setting']} ({kind}) | {t / step:.1f} | "
                + " | ".join(f"{t / (n * step):.2%}" for n in RUN_STEPS)
                + " |"
            )
    return head + "\n".join(lines) + "\n"


def _plot(rows: list[dict], train: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["setting"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(rows))
    a.bar([i - 0.2 for i in x], [r["compute_ex_per_s"] for r in rows], 0.4, label="compute")
    a.bar([i + 0.2 for i in x], [r["wall_ex_per_s"] for r in rows], 0.4, label="wall")
    a.set_xticks(list(x), names)
    a.set_ylabel("examples / s")
    a.set_title("probe throughput")
    a.legend()
    step = train["median_step_s"]
    b.bar(names, [r["wall_s"] / step for r in rows], label="wall")
    b.bar(names, [r["compute_s"] / step for r in rows], label="compute")
    b.set_ylabel("cost in fine-tuning steps")
    b.set_title(f"probe cost (1 step = {step:.3f} s, FSDP2 x2)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out_dir: str, tiny: bool = True) -> str:
    """Run the benchmark; writes probe.json, probe.md and probe.png into out_dir; returns the .md path."""
    # One thread per process everywhere (this process, the actors, the torchrun ranks): OpenMP
    # threads that spin on contended cores made a 2-thread probe ~10x slower than 1 thread here.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    p = TINY if tiny else FULL
    env = environment()
    env["load_before"] = [round(x, 2) for x in os.getloadavg()]
    env["cpu_parallelism_before"] = cpu_parallelism()
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lfdist-bench-probe-") as work:
        rows, result = measure_probes(p)
        train = measure_training(p, result, work)
    env["load_after"] = [round(x, 2) for x in os.getloadavg()]
    env["cpu_parallelism_after"] = cpu_parallelism()
    one, two = (
        next(r for r in rows if r["setting"] == s) for s in ("ray, 1 worker", "ray, 2 workers")
    )
    summary = {
        "speedup_2_over_1_workers": {
            "compute": one["compute_s"] / two["compute_s"],
            "wall": one["wall_s"] / two["wall_s"],
        },
        "probe_in_training_steps": {
            r["setting"]: r["wall_s"] / train["median_step_s"] for r in rows
        },
        "probe_fraction_of_run": {
            f"{n}_steps": {r["setting"]: r["wall_s"] / (n * train["median_step_s"]) for r in rows}
            for n in RUN_STEPS
        },
    }
    record = {
        "benchmark": "probe",
        "tiny": tiny,
        "setup": p,
        "repeats": REPEATS,
        "probe": rows,
        "training": train,
        "summary": summary,
        "environment": env,
    }
    with open(os.path.join(out_dir, "probe.json"), "w") as f:
        json.dump(record, f, indent=1)
    md = os.path.join(out_dir, "probe.md")
    with open(md, "w") as f:
        f.write(_markdown(rows, train, p, env))
    _plot(rows, train, os.path.join(out_dir, "probe.png"))
    return md
