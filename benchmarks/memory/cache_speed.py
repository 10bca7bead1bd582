"""The frozen-prefix activation cache's speed: epoch-2 step time with and without
`--cache-frozen-prefix`, per engine (FSDP2, DeepSpeed ZeRO-2; 2 ranks), next to the cost model's
limit for the plan.

    python benchmarks/memory/cache_speed.py            # SmolLM2 on python-docs (the measurement)
    python benchmarks/memory/cache_speed.py --tiny     # tiny llama, synthetic data (a quick check)

Every run goes through the real CLI (`lfdist probe`, `lfdist select --strategy top`,
`lfdist train`) and is read back from its metrics.json. The training set is capped
(data.max_examples) so that epoch 2 starts after a few steps: the cache records each example's
prefix output in epoch 1 and replays it from epoch 2 on, so only epoch 2's steps can show a gain.
The two runs of one engine run back to back, so the machine's load is alike for both.

The limit: with the cache, a step still runs the embeddings, the trainable blocks' forward and
backward and the head's; it skips only the frozen blocks' forward. If time followed FLOPs, the
cached step would take (plan FLOPs - the prefix's forward FLOPs) / plan FLOPs of the uncached one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINES = [("fsdp2", None), ("deepspeed", 2)]
SETUPS = {
    # model, data, trained top blocks, examples kept, seq_len, micro-batch per rank
    "smollm2": {
        "model": "pkg:smollm2-135m",
        "data": "pkg:python-docs",
        "top": 6,
        "max_examples": 64,
        "seq_len": 64,
        "batch_size": 2,
    },
    "tiny": {
        "model": "tiny:llama",
        "data": "synthetic:lm",
        "top": 3,
        "max_examples": 32,
        "seq_len": 64,
        "batch_size": 2,
    },
}
WORLD = 2
EPOCHS = 2


def _lfdist(*args: str) -> None:
    cmd = [os.path.join(os.path.dirname(sys.executable), "lfdist"), *args]  # the CLI as installed
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _plan(setup: dict, work: str) -> tuple[str, dict]:
    """Probe (a few samples: only the model's shape is used) and select the top blocks."""
    probe = os.path.join(work, "probe.json")
    plan = os.path.join(work, "plan.yaml")
    _lfdist(
        "probe", "--model", setup["model"], "--data", setup["data"],
        "--seq-len", "32", "--samples", "4", "--out", probe,
    )  # fmt: skip
    _lfdist(
        "select", "--probe", probe, "--strategy", "top",
        "--option", f"n={setup['top']}", "--out", plan,
    )  # fmt: skip
    with open(probe) as f:
        return plan, json.load(f)["model"]


def _train(setup: dict, plan: str, engine: str, stage, steps: int, cached: bool, out: str) -> dict:
    args = [
        "train", "--model", setup["model"], "--data", setup["data"],
        "--seq-len", str(setup["seq_len"]), "--plan", plan, "--engine", engine,
        "--nproc", str(WORLD), "--steps", str(steps), "--out", out,
    ]  # fmt: skip
    if stage:
        args += ["--zero-stage", str(stage)]
    if cached:
        args.append("--cache-frozen-prefix")
    args += [
        f"data.max_examples={setup['max_examples']}",
        f"train.batch_size={setup['batch_size']}",
        "train.eval_before=false",  # evaluation is not timed; keep it short
        "data.max_eval_examples=4",
    ]
    _lfdist(*args)
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def _limit(info: dict, plan_path: str, engine: str, stage, setup: dict) -> dict:
    """The cost model's FLOPs per rank and step: the plan's, full fine-tuning's, and what the
    cache leaves (the plan's minus the frozen prefix's forward)."""
    from lfdist.cost import predict_plan
    from lfdist.plan import load_plan

    plan = load_plan(plan_path)
    p = predict_plan(
        info,
        plan,
        engine=engine,
        zero_stage=stage or 2,
        world_size=WORLD,
        dtype=info.get("dtype", "float32"),
        batch_size=setup["batch_size"],
        seq_len=setup["seq_len"],
    )
    tokens = setup["batch_size"] * setup["seq_len"]
    prefix_fwd = 2.0 * tokens * sum(info["per_block_params"][: plan.boundary])
    cached = p["flops_per_step"] - prefix_fwd
    return {
        "boundary": plan.boundary,
        "flops_per_step": p["flops_per_step"],
        "flops_full_per_step": p["flops_full_per_step"],
        "flops_fraction": p["flops_fraction"],
        "flops_cached_per_step": cached,
        "cached_over_plan": cached / p["flops_per_step"],
        "cached_over_full": cached / p["flops_full_per_step"],
    }


def _epoch_medians(m: dict, steps_per_epoch: int) -> list[float]:
    times = m["step_times"]
    return [
        statistics.median(times[e * steps_per_epoch : (e + 1) * steps_per_epoch])
        for e in range(EPOCHS)
    ]


def _row(engine, stage, plain, cached, limit, steps_per_epoch) -> dict:
    p_med, c_med = _epoch_medians(plain, steps_per_epoch), _epoch_medians(cached, steps_per_epoch)
    keys = sorted(plain["losses"], key=int)
    diffs = [abs(plain["losses"][k] - cached["losses"][k]) for k in keys]
    return {
        "engine": engine + (f" ZeRO-{stage}" if stage else ""),
        "steps_per_epoch": steps_per_epoch,
        "epoch1_median_s": {"without": p_med[0], "with": c_med[0]},
        "epoch2_median_s": {"without": p_med[1], "with": c_med[1]},
        "epoch2_ratio": c_med[1] / p_med[1],
        "epoch1_ratio": c_med[0] / p_med[0],  # both run the prefix: recording cost + load drift
        "losses_equal": plain["losses"] == cached["losses"],
        "losses_max_abs_diff": max(diffs),
        "prefix_cache": cached["prefix_cache"],
        "step_times": {"without": plain["step_times"], "with": cached["step_times"]},
        "losses": {"without": plain["losses"], "with": cached["losses"]},
        "limit": limit,
    }


def _markdown(name: str, setup: dict, rows: list[dict]) -> str:
    lines = [
        f"## Frozen-prefix cache: epoch-2 step time ({setup['model']} on {setup['data']}, "
        f"plan `top` n={setup['top']}, {WORLD} ranks, fp32, seq_len {setup['seq_len']}, "
        f"micro-batch {setup['batch_size']} per rank, {setup['max_examples']} training examples)",
        "",
        "| engine | steps/epoch | epoch-2 median s without | with cache | ratio with/without "
        "| cost-model limit (cached/plan FLOPs) | epoch-1 ratio (recording + load) | losses equal "
        "(max abs diff) | cache hits / misses |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e2, pc = r["epoch2_median_s"], r["prefix_cache"]
        lines.append(
            f"| {r['engine']} | {r['steps_per_epoch']} | {e2['without']:.3f} | {e2['with']:.3f} | "
            f"{r['epoch2_ratio']:.3f} | {r['limit']['cached_over_plan']:.3f} | "
            f"{r['epoch1_ratio']:.3f} | {'yes' if r['losses_equal'] else 'no'} "
            f"({r['losses_max_abs_diff']:.2e}) | {pc['hits']} / {pc['misses']} |"
        )
    lim = rows[0]["limit"]
    lines += [
        "",
        f"Cost model (lfdist.cost.predict, per rank and step): the plan costs "
        f"{lim['flops_fraction']:.3f} of full fine-tuning's FLOPs; with the cache the frozen "
        f"prefix's forward (blocks 0-{lim['boundary'] - 1}) is skipped, leaving the trainable "
        f"blocks' forward and backward and the head's: {lim['cached_over_plan']:.3f} of the plan's "
        f"FLOPs, {lim['cached_over_full']:.3f} of full fine-tuning's. That is the limit of the "
        "ratio if step time followed FLOPs; the embeddings, the optimizer step, the collectives "
        "and the cache's own work (one all-reduce per step to agree on replaying, stacking the "
        "cached rows) are not in it.",
        "",
        f"Epoch 1 runs the prefix in both runs (the cached run also all-gathers and stores "
        f"its outputs) and epoch 2 replays; the medians are over each epoch's "
        f"{rows[0]['steps_per_epoch']} steps. The epoch-1 ratio is the recording's cost plus "
        "whatever the machine's load changed between the two runs: read the epoch-2 ratio "
        "against it. Hits and misses count examples per rank.",
        "",
        "The machine is a shared 2-core CPU (other jobs were running on it): the two runs of "
        "one engine ran back to back so their load was alike, but read the times as one "
        "sample each, not as a controlled benchmark.",
    ]
    if name == "tiny":
        lines.append(
            "\nTiny model: step times are dominated by overheads, not by the blocks' FLOPs."
        )
    return "\n".join(lines)


def _plot(rows: list[dict], path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax = fig.add_subplot(1, 2, 1)
    x = range(len(rows))
    ax.bar(
        [i - 0.2 for i in x], [r["epoch2_median_s"]["without"] for r in rows], 0.4, label="without"
    )
    ax.bar(
        [i + 0.2 for i in x], [r["epoch2_median_s"]["with"] for r in rows], 0.4, label="with cache"
    )
    ax.scatter(
        [i + 0.2 for i in x],
        [r["epoch2_median_s"]["without"] * r["limit"]["cached_over_plan"] for r in rows],
        marker="_",
        s=600,
        color="black",
        label="cost-model limit",
        zorder=3,
    )
    ax.set_xticks(list(x), [r["engine"] for r in rows])
    ax.set_ylabel("epoch-2 median step time (s)")
    ax.legend(fontsize=8)
    ax2 = fig.add_subplot(1, 2, 2)
    for r in rows:
        for key, style in (("without", "-"), ("with", "--")):
            ax2.plot(r["step_times"][key], style, label=f"{r['engine']} {key}")
    ax2.axvline(rows[0]["steps_per_epoch"] - 0.5, color="gray", lw=0.8)
    ax2.set_xlabel("step (line: epoch 2 starts)")
    ax2.set_ylabel("step time (s)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(name: str, out_dir: str) -> str:
    from lfdist.bench.record import write_result

    setup = SETUPS[name]
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", os.path.join(HERE, "..", "..", ".torch_extensions")
    )
    rows = []
    with tempfile.TemporaryDirectory() as work:
        plan, info = _plan(setup, work)
        steps_per_epoch = setup["max_examples"] // (WORLD * setup["batch_size"])
        for engine, stage in ENGINES:
            runs = {}
            for cached in (False, True):
                out = os.path.join(work, f"{engine}{stage or ''}-{'with' if cached else 'without'}")
                runs[cached] = _train(
                    setup, plan, engine, stage, EPOCHS * steps_per_epoch, cached, out
                )
            n = runs[False]["data"]["n_examples"]
            if n != setup["max_examples"]:  # too little data: the epochs would not line up
                raise RuntimeError(f"{n} training examples, expected {setup['max_examples']}")
            limit = _limit(info, plan, engine, stage, setup)
            rows.append(_row(engine, stage, runs[False], runs[True], limit, steps_per_epoch))
    os.makedirs(out_dir, exist_ok=True)
    stem = "cache_speed" if name == "smollm2" else f"cache_speed_{name}"
    _plot(rows, os.path.join(out_dir, f"{stem}.png"))
    result = {"setup": {**setup, "world_size": WORLD, "epochs": EPOCHS}, "rows": rows}
    return write_result(out_dir, stem, result, _markdown(name, setup, rows))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny llama on synthetic data (quick)")
    ap.add_argument("--out", default=HERE)
    a = ap.parse_args()
    print(run("tiny" if a.tiny else "smollm2", a.out))
