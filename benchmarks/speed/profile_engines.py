"""Where an engine's step time goes, at world size 1 on the CPU (issue 15): median step of each
engine and DeepSpeed config variant in-process, and torch.profiler's top operators by self CPU
time next to the plain `single` engine's.

Run: python benchmarks/speed/profile_engines.py   (after run.py has generated the 25M model; ~6 minutes)
Writes benchmarks/speed/profile-cpu.md and profile-cpu.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
VARIANTS = {  # name -> (engine, DeepSpeed zero_optimization changes)
    "single": ("single", None),
    "fsdp2": ("fsdp2", None),
    "zero2": ("zero2", {}),
    "zero2 reduce_bucket_size=5e8": ("zero2", {"reduce_bucket_size": 500_000_000}),
    "zero2 contiguous_gradients=false": ("zero2", {"contiguous_gradients": False}),
    "zero2 overlap_comm=true": ("zero2", {"overlap_comm": True}),
    "zero3": ("zero3", {}),
    "zero3 stage3_param_persistence_threshold=1e9": (
        "zero3",
        {"stage3_param_persistence_threshold": 10**9},
    ),
    "zero3 overlap_comm=false": ("zero3", {"overlap_comm": False}),
}
PROFILED = ("single", "fsdp2", "zero2", "zero3")


def child(name: str, folder: str, plan: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    import deepspeed
    import torch

    deepspeed.init_distributed("gloo")
    from lfdist.config import config_from_dict
    from lfdist.engines import build_engine
    from lfdist.engines.base import World
    from lfdist.engines.deepspeed import TEMPLATES
    from lfdist.model.source import ModelSource
    from lfdist.plan import load_plan

    engine, changes = VARIANTS[name]
    zero = engine.startswith("zero")
    train = {"engine": "deepspeed" if zero else engine, "nproc": 1, "batch_size": 4}
    if zero:
        train["zero_stage"] = int(engine[-1])
        with open(TEMPLATES / f"zero{engine[-1]}.json") as f:
            ds = json.load(f)
        ds["zero_optimization"].update(changes)
        train["deepspeed_config"] = out + ".ds.json"
        with open(train["deepspeed_config"], "w") as f:
            json.dump(ds, f)
    cfg = config_from_dict({"model": {"spec": folder}, "train": train})
    world = World(0, 1, 0, torch.device("cpu"))
    e = build_engine(cfg.train.engine, ModelSource(folder), load_plan(plan), cfg.train, world)
    ids = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step():
        e.micro_step(batch, 1.0)
        e.optimizer_step()

    for _ in range(3):
        step()
    times = []
    for _ in range(8):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    ops = {}
    if name in PROFILED:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(3):
                step()
        ops = {a.key: a.self_cpu_time_total / 3e3 for a in p.key_averages()}  # ms per step
    with open(out, "w") as f:
        json.dump({"median_s": statistics.median(times), "ops_ms_per_step": ops}, f)
    os._exit(0)


def main() -> None:
    sys.path.insert(0, ROOT)
    from benchmarks.speed.run import write_plans
    from lfdist.bench.record import write_result

    cache = os.environ.get("LFDIST_CACHE", os.path.expanduser("~/.cache/lfdist"))
    folder = os.path.join(cache, "generated", "speed-llama-cpu")
    if not os.path.isdir(folder):
        raise SystemExit("run benchmarks/speed/run.py first: it generates the 25M model")
    work = os.path.join("/tmp", f"lfdist-profile-{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    plan = write_plans(folder, "float32", work)["full"]
    rows = {}
    for name in VARIANTS:
        out = os.path.join(work, name.replace(" ", "_") + ".json")
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": str(os.cpu_count())}
        subprocess.run([sys.executable, __file__, "--child", name, folder, plan, out], env=env,
                       check=True, capture_output=True)  # fmt: skip
        with open(out) as f:
            rows[name] = json.load(f)
        print(f"{name:48s} {rows[name]['median_s']:.3f} s", flush=True)
    write_result(HERE, "profile-cpu", {"rows": rows}, markdown(rows))


def markdown(rows: dict) -> str:
    lines = [
        "25M Llama, full fine-tuning, fp32, 4 x 128 tokens, world size 1, in-process (the engine's",
        "micro_step + optimizer_step, no launcher); median of 8 steps after 3.\n",
        "| engine / variant | median step (s) | vs single |",
        "|---|---:|---:|",
    ]
    base = rows["single"]["median_s"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['median_s']:.3f} | {r['median_s'] / base:.2f} |")
    plain = rows["single"]["ops_ms_per_step"]
    lines += ["", "Self CPU ms per step, the operators that differ most from `single`:", ""]
    lines += [
        "| operator | single | " + " | ".join(PROFILED[1:]) + " |",
        "|---|" + "---:|" * len(PROFILED),
    ]
    keys = set().union(*(rows[n]["ops_ms_per_step"] for n in PROFILED))

    def excess(k):
        return max(rows[n]["ops_ms_per_step"].get(k, 0) - plain.get(k, 0) for n in PROFILED[1:])

    for k in sorted(keys, key=excess, reverse=True)[:10]:
        cells = [f"{rows[n]['ops_ms_per_step'].get(k, 0):.1f}" for n in PROFILED]
        lines.append(f"| `{k[:60]}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.path.insert(0, ROOT)
        child(*sys.argv[2:6])
    else:
        main()
