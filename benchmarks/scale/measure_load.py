"""Measured: loading a generated >= 1B Llama on 2 CPU ranks, per-rank and launcher peak memory.

    python benchmarks/scale/measure_load.py [OUT_DIR] [--no-before]

Generates a Llama-style model of 1.10B parameters (TinyLlama's shape: 22 blocks, hidden 2048,
GQA 32/4 heads, vocab 32000, untied head) as SHARDED fp32 safetensors in a temporary folder,
random and seeded, written shard by shard (never whole in memory). Then, through the real
launcher (validate + torchrun / deepspeed), FSDP2 and ZeRO-3 train it for 2 steps in bf16
(seq 32, batch 1) with a plan that trains the top 2 blocks and the final norm (embeddings and
head frozen, so optimizer state does not hide the load). Each process's anonymous memory
(RssAnon in /proc/PID/status: memory-mapped file pages do not count) is polled every 50 ms:
the launching process, and each rank until its engine is built ("load") and over the run.

Side by side in the same run: lfdist's meta-device path ("sharded") and the old whole-model
load ("whole": every rank calls from_pretrained; `debug.load_whole`). The old launcher, which
loaded the model too, cannot be selected any more: its number (2.24 GiB) is quoted from issue 9.
Targets (issue 9): per rank < 0.6 x the model's bf16 bytes + 0.9 GiB; launcher < 1 GiB.
Results: load_1b.json, load_1b.md, load_1b.png next to this file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from lfdist.bench.gpu import GENERATED_1B  # noqa: E402
from lfdist.job import Job

GIB = 2**30
LAYERS_PER_SHARD = 2
# The same generated 1.1B architecture as the GPU benchmark, with the byte tokenizer's ids.
CONFIG = dict(
    **GENERATED_1B,
    pad_token_id=256,
    bos_token_id=257,
    eos_token_id=258,
)
QUOTED_BEFORE = {"fsdp2": 3.44, "zero3": 4.42, "launcher": 2.24}  # GiB, issue 9


def generate(folder: str, seed: int = 0) -> int:
    """Write the model shard by shard; returns its parameter count."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from lfdist.model.source import params_on_meta

    config = transformers.LlamaConfig(**CONFIG, dtype="float32")
    config.save_pretrained(folder)
    with open(os.path.join(folder, "lfdist_tokenizer.json"), "w") as f:
        f.write("{}")  # the byte tokenizer (ids < 320) serves a generated model
    with params_on_meta():
        skeleton = transformers.LlamaForCausalLM(config)
    shards: dict[str, list[tuple[str, tuple]]] = {}
    for name, p in skeleton.named_parameters():
        block = name.split(".")[2] if name.startswith("model.layers.") else None
        key = "rest" if block is None else f"layers-{int(block) // LAYERS_PER_SHARD:02d}"
        shards.setdefault(key, []).append((name, tuple(p.shape)))
    weight_map, total = {}, 0
    for i, (_, tensors) in enumerate(sorted(shards.items())):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        part = {}
        for name, shape in tensors:
            if name.endswith("norm.weight"):
                part[name] = torch.ones(shape)
            else:
                part[name] = torch.empty(shape).normal_(0.0, 0.02, generator=g)
            total += part[name].numel()
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        del part
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 4 * total}, "weight_map": weight_map}, f)
    return total


def write_plan(folder: str, path: str) -> None:
    from lfdist.model.blocks import find_blocks
    from lfdist.model.source import ModelSource
    from lfdist.plan import BlockPlan, Plan, save_plan

    source = ModelSource(folder, dtype="bfloat16")
    skeleton = source.skeleton()
    bmap = find_blocks(skeleton)
    n = bmap.n_blocks
    blocks = tuple(
        BlockPlan(i, f"{bmap.path}.{i}", "full" if i >= n - 2 else "frozen") for i in range(n)
    )
    modules = {"embeddings": "frozen", "final_norm": "full", "head": "frozen"}
    save_plan(Plan("top", source.fingerprint(), blocks, modules), path)


# No prefetch, and parameters re-gathered for backward (what FSDP2's reshard_after_forward
# does by default) instead of kept gathered from forward.
LEAN = {"stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": 0}
# zero3-lean-bf16 also runs with train.precision=bf16, which asks DeepSpeed for bf16 master
# weights, gradients and AdamW states (bf16_master_weights_and_grads, bf16_optimizer_states).
VARIANTS = {
    "zero3-lean": {"zero_optimization": LEAN},
    "zero3-lean-bf16": {"zero_optimization": LEAN},
}


def child(folder: str, plan: str, out: str, engine: str, whole: bool) -> None:
    """The launching process: validate, write the job, run the ranks (what `lfdist train` does)."""
    from lfdist.config import config_from_dict
    from lfdist.job import Debug
    from lfdist.launch.run import launch_training

    # As measured: freed FSDP/ZeRO buffers returned to the OS at once (train.cpu_lean_malloc),
    # bf16 weights, gradients and states on FSDP (what its torch AdamW kept before
    # bf16-mixed became the default) and DeepSpeed's default fp32 masters on ZeRO-3.
    train = {"nproc": 2, "steps": 2, "batch_size": 1, "lr": 1e-4, "warmup_steps": 0}
    mixed = engine in ("zero3", "zero3-lean")
    train.update(cpu_lean_malloc=True, precision="bf16-mixed" if mixed else "bf16")
    if engine.startswith("zero3"):
        train.update(engine="deepspeed", zero_stage=3)
        if engine in VARIANTS:  # the user's DeepSpeed config trading speed or fp32 for memory
            from lfdist.engines.deepspeed import TEMPLATES

            with open(TEMPLATES / "zero3.json") as f:
                ds = json.load(f)
            for section, values in VARIANTS[engine].items():
                ds.setdefault(section, {}).update(values)
            train["deepspeed_config"] = out + ".deepspeed.json"
            with open(train["deepspeed_config"], "w") as f:
                json.dump(ds, f)
    else:
        train.update(engine=engine)
    cfg = config_from_dict(
        {
            "model": {"spec": folder, "dtype": "bfloat16"},
            "data": {"spec": "synthetic:lm:16", "seq_len": 32},
            "train": train,
        }
    )
    metrics = launch_training(Job(cfg, plan, out, evaluate=False, debug=Debug(load_whole=whole)))
    print("LOSSES", json.dumps(metrics["losses"]), flush=True)


def _rss_anon(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _is_rank(cmdline: list[str]) -> bool:
    """A rank runs `python -u? -m lfdist.launch.worker JOB`; torchrun and the deepspeed
    launcher carry the same words further down their own command lines."""
    args = [a for a in cmdline[1:] if a != "-u"]
    return args[:2] == ["-m", "lfdist.launch.worker"]


def _rank_trees(kids, kinds: dict) -> dict[int, list[int]]:
    """Each rank's process tree: the worker process and its descendants (the worker may run
    the rank in a child; forked helpers count too), keyed by the top worker's pid."""
    import psutil

    trees: dict[int, list[int]] = {}
    for kid in kids:
        try:
            if not kinds.get(kid.pid):  # before its exec, a rank shows its parent's cmdline
                kinds[kid.pid] = _is_rank(kid.cmdline())
            chain = [kid, *kid.parents()]
        except psutil.Error:
            continue
        tops = [p.pid for p in chain if kinds.get(p.pid)]
        if tops:
            trees.setdefault(tops[-1], []).append(kid.pid)
    return trees


def measure(folder: str, plan: str, out: str, engine: str, whole: bool) -> dict:
    import psutil

    argv = [sys.executable, __file__, "--child", folder, plan, out, engine, str(int(whole))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    first_step = {}
    lines = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if ": model materialized and wrapped in" in line and "t" not in first_step:
                first_step["t"] = time.monotonic()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    launcher_peak, ranks, kinds, start = 0, {}, {}, time.monotonic()
    while proc.poll() is None:
        launcher_peak = max(launcher_peak, _rss_anon(proc.pid) or 0)
        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        loading = "t" not in first_step
        for top, tree in _rank_trees(kids, kinds).items():
            rss = sum(_rss_anon(pid) or 0 for pid in tree)
            r = ranks.setdefault(top, {"load": 0, "run": 0})
            r["run"] = max(r["run"], rss)
            if loading:
                r["load"] = max(r["load"], rss)
        time.sleep(0.05)
    reader.join(timeout=5)
    losses = next((json.loads(x[7:]) for x in lines if x.startswith("LOSSES ")), None)
    if proc.returncode != 0 or losses is None:
        sys.stderr.write("".join(lines[-40:]))
        raise SystemExit(f"{engine} ({'whole' if whole else 'sharded'}) failed")
    return {
        "engine": engine,
        "path": "whole" if whole else "sharded",
        "launcher_peak_gib": launcher_peak / GIB,
        "rank_load_peak_gib": [r["load"] / GIB for r in ranks.values()],
        "rank_peak_gib": [r["run"] / GIB for r in ranks.values()],
        "seconds": time.monotonic() - start,
        "losses": losses,
    }


def report(rows: list[dict], n_params: int, out_dir: str) -> None:
    from lfdist.bench.record import write_result

    bf16_gib = 2 * n_params / GIB
    target_rank = 0.6 * bf16_gib + 0.9
    lines = [
        f"Generated Llama, {n_params:,} parameters: {4 * n_params / GIB:.2f} GiB of fp32 "
        f"safetensors ({CONFIG['num_hidden_layers']} blocks in "
        f"{-(-CONFIG['num_hidden_layers'] // LAYERS_PER_SHARD) + 1} files), {bf16_gib:.2f} GiB "
        "in bf16. 2 CPU ranks, gloo, bf16, seq 32, batch 1, 2 steps, plan: top 2 blocks + final "
        "norm. Peak RssAnon (anonymous memory; mmap-ed file pages excluded), polled every 50 ms.",
        "",
        f"Targets: per rank < 0.6 x {bf16_gib:.2f} + 0.9 = {target_rank:.2f} GiB; launcher < 1 GiB.",
        "",
        "| engine | load path | rank peak until the engine is built (GiB) | rank peak, load + 2 steps (GiB) "
        "| launcher peak (GiB) | rank target met | step-1 loss | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = max(r["rank_peak_gib"])
        lines.append(
            f"| {r['engine']} | {r['path']} | {max(r['rank_load_peak_gib']):.2f} | {peak:.2f} "
            f"| {r['launcher_peak_gib']:.2f} | {'yes' if peak < target_rank else 'no'} "
            f"| {r['losses']['0']:.4f} | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        f"zero3-lean: ZeRO-3 with the user's DeepSpeed config setting {LEAN} in "
        "zero_optimization (no prefetch; parameters gathered again for backward, as FSDP2 does "
        "by default): less memory, less overlap of communication with compute. By default "
        "every ZeRO-3 rank also holds DeepSpeed's fp32 master copy and fp32 AdamW states of its "
        "trainable partition (12 bytes per trained parameter), where FSDP2's torch AdamW keeps "
        "bf16 states for bf16 parameters (4 bytes) under train.precision=bf16, the precision "
        "the FSDP2 rows ran in; zero3-lean-bf16 runs ZeRO-3 with train.precision=bf16 too "
        "(DeepSpeed's bf16_master_weights_and_grads and bf16_optimizer_states). lfdist's "
        "default is bf16-mixed (fp32 masters and states for trainable parameters), and its "
        "template keeps DeepSpeed's other defaults. All rows set train.cpu_lean_malloc.",
        "",
        "Quoted, not measured here (issue 9, the code before this change): per-rank peak "
        f"{QUOTED_BEFORE['fsdp2']} GiB on FSDP2 and {QUOTED_BEFORE['zero3']} GiB on ZeRO-3; "
        f"the launcher {QUOTED_BEFORE['launcher']} GiB (it loaded the whole model to "
        "fingerprint it; it no longer can).",
    ]
    result = {
        "n_params": n_params,
        "config": CONFIG,
        "bf16_gib": bf16_gib,
        "targets_gib": {"rank": target_rank, "launcher": 1.0},
        "rows": rows,
        "quoted_before_gib": QUOTED_BEFORE,
    }
    write_result(out_dir, "load_1b", result, "\n".join(lines))
    _plot(rows, target_rank, os.path.join(out_dir, "load_1b.png"))


def _plot(rows: list[dict], target: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    labels = [f"{r['engine']}\n{r['path']}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [max(r["rank_peak_gib"]) for r in rows], 0.4, label="rank peak")
    ax.bar([x + 0.2 for x in xs], [r["launcher_peak_gib"] for r in rows], 0.4, label="launcher")
    ax.axhline(target, color="k", ls="--", lw=1, label=f"rank target {target:.2f} GiB")
    ax.axhline(1.0, color="gray", ls=":", lw=1, label="launcher target 1 GiB")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("peak RssAnon (GiB)")
    ax.set_title("Loading a 1.1B Llama on 2 CPU ranks (bf16)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
    if "--small" in argv:  # a quick check of the script itself, not a result
        CONFIG.update(hidden_size=256, intermediate_size=512, num_hidden_layers=4, vocab_size=1000)
        CONFIG.update(num_attention_heads=8, num_key_value_heads=2)
    out_dir = next((a for a in argv if not a.startswith("--")), os.path.dirname(__file__))
    before = "--no-before" not in argv
    with tempfile.TemporaryDirectory(prefix="lfdist-load-") as tmp:
        folder = os.path.join(tmp, "llama-1b")
        os.makedirs(folder)
        t = time.monotonic()
        n_params = generate(folder)
        print(f"generated {n_params:,} parameters in {time.monotonic() - t:.0f} s", flush=True)
        plan = os.path.join(tmp, "plan.yaml")
        write_plan(folder, plan)
        rows = []
        runs = [(e, w) for e in ("fsdp2", "zero3") for w in ((False, True) if before else (False,))]
        for engine, whole in runs + [(v, False) for v in VARIANTS]:
            out = os.path.join(tmp, f"run-{engine}-{int(whole)}")
            rows.append(measure(folder, plan, out, engine, whole))
            print(json.dumps(rows[-1]), flush=True)
    report(rows, n_params, os.path.abspath(out_dir))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        folder, plan, out, engine, whole = sys.argv[2:7]
        child(folder, plan, out, engine, bool(int(whole)))
    else:
        main(sys.argv[1:])
