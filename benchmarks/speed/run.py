"""One-rank step time of lfdist's engines next to a plain PyTorch loop, side by side in one run.

A generated Llama of about 25M parameters (seeded random weights, fp32 safetensors, the byte
tokenizer), full fine-tuning and the top quarter of blocks (embeddings frozen in both, as in
every lfdist plan). Each row is its own process, one after another on a quiet machine:

- `plain`: the loop a user already has (transformers model, `requires_grad_(False)` on the same
  frozen set, `torch.optim.AdamW(fused=True)` over the trainable parameters, clip at 1.0);
- `lfdist <engine>`: `lfdist train --nproc 1` through the real launcher (torchrun, or the
  deepspeed launcher), the median of its own step times (metrics.json) after the first steps.

Same micro-batch, sequence length, precision and number of steps everywhere. The ratio column
is lfdist's median step over the plain loop's for the same plan.

Run: python benchmarks/speed/run.py [--steps 30] [--out benchmarks/speed]
     python benchmarks/speed/run.py --tiny  (a smoke run: 4 steps, a 2-block model, /tmp)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

# ~25M parameters: 8 blocks of hidden 512 (GQA 8/4 heads), SwiGLU 1408, the byte vocabulary.
MODEL = dict(
    vocab_size=320,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    pad_token_id=256,
    bos_token_id=257,
    eos_token_id=258,
)
TINY_MODEL = dict(MODEL, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
BATCH, SEQ, SKIP = 4, 128, 3  # micro-batch, tokens per example, first steps left out
ENGINES = [
    ("ddp", []),
    ("fsdp1", []),
    ("fsdp2", []),
    ("deepspeed", ["--zero-stage", "2"]),
    ("deepspeed", ["--zero-stage", "3"]),
]


def generate(folder: str, config: dict) -> int:
    import torch
    import transformers

    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return -1
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    model.save_pretrained(folder)
    with open(os.path.join(folder, "lfdist_tokenizer.json"), "w") as f:
        f.write("{}")  # the byte tokenizer serves a generated model
    return sum(p.numel() for p in model.parameters())


def write_plans(folder: str, out: str) -> dict[str, str]:
    from lfdist.model.blocks import find_blocks
    from lfdist.model.source import ModelSource
    from lfdist.plan import BlockPlan, Plan, save_plan

    source = ModelSource(folder, dtype="float32")
    n = find_blocks(source.skeleton()).n_blocks
    quarter = max(1, n // 4)
    plans = {}
    for name, top in (("full", n), ("top quarter", quarter)):
        path = os.path.join(out, f"plan-{name.replace(' ', '-')}.yaml")
        bmap = find_blocks(source.skeleton())
        blocks = tuple(
            BlockPlan(i, f"{bmap.path}.{i}", "full" if i >= n - top else "frozen")
            for i in range(n)
        )
        modules = {"embeddings": "frozen", "final_norm": "full", "head": "full"}
        save_plan(Plan("top", source.fingerprint(), blocks, modules), path)
        plans[name] = path
    return plans


def plain_child(folder: str, plan_path: str, steps: int, precision: str) -> None:
    """The plain loop, in this process; prints its step times as JSON."""
    import torch
    import transformers

    from lfdist.plan import load_plan

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    plan = load_plan(plan_path)
    model.requires_grad_(False)
    layers = model.model.layers
    for b in plan.blocks:
        if b.treatment == "full":
            layers[b.index].requires_grad_(True)
    model.model.norm.requires_grad_(True)
    model.lm_head.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0, fused=True)
    g = torch.Generator().manual_seed(0)
    times, losses = [], []
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 256, (BATCH, SEQ), generator=g)
        t0 = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    print(json.dumps({"step_times": times, "losses": losses}))


def run_plain(folder: str, plan: str, steps: int, precision: str) -> list[float]:
    cmd = [sys.executable, __file__, "--plain-child", folder, plan, str(steps), precision]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["step_times"]


def run_lfdist(folder, plan, engine, extra, steps, out, precision) -> dict:
    cmd = [
        sys.executable, "-m", "lfdist.cli", "train", "--model", folder, "--data",
        f"synthetic:lm:{max(64, steps * BATCH)}", "--plan", plan, "--engine", engine,
        "--nproc", "1", "--steps", str(steps), "--out", out, "--overwrite", *extra,
        f"data.seq_len={SEQ}", f"train.batch_size={BATCH}", "train.eval_before=false",
        "train.save_final=false", f"train.precision={precision}", "train.log_every=0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[SKIP:] if len(times) > SKIP + 1 else times)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--plain-child"]:
        plain_child(argv[1], argv[2], int(argv[3]), argv[4])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--engines", default="ddp,fsdp1,fsdp2,zero2,zero3")
    args = ap.parse_args(argv)
    if args.tiny:
        args.steps, args.out = 4, tempfile.mkdtemp(prefix="lfdist-speed-")
    config = TINY_MODEL if args.tiny else MODEL
    cache = os.path.join(os.environ.get("LFDIST_CACHE", os.path.expanduser("~/.cache/lfdist")))
    tag = "tiny" if args.tiny else "25m"
    folder = os.path.join(cache, "generated", f"speed-llama-{tag}")
    generate(folder, config)
    work = tempfile.mkdtemp(prefix="lfdist-speed-runs-")
    plans = write_plans(folder, work)
    wanted = set(args.engines.split(","))
    rows = []
    for plan_name, plan in plans.items():
        plain = median_after_warmup(run_plain(folder, plan, args.steps, args.precision))
        rows.append({"plan": plan_name, "run": "plain loop", "median_step_s": plain, "ratio": 1.0})
        print(f"{plan_name:12s} plain loop        {plain:.4f} s", flush=True)
        for engine, extra in ENGINES:
            label = engine if engine != "deepspeed" else f"zero{extra[-1]}"
            if label not in wanted:
                continue
            out = os.path.join(work, f"{label}-{plan_name.replace(' ', '-')}")
            m = run_lfdist(folder, plan, engine, extra, args.steps, out, args.precision)
            step = median_after_warmup(m["step_times"])
            rows.append(
                {"plan": plan_name, "run": f"lfdist {label}", "median_step_s": step,
                 "ratio": step / plain, "final_loss": list(m["losses"].values())[-1]}
            )  # fmt: skip
            print(f"{plan_name:12s} lfdist {label:10s} {step:.4f} s  {step / plain:.2f}x", flush=True)
    report(rows, args, config)


def report(rows: list[dict], args, config: dict) -> None:
    import torch
    import transformers

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    meta = {
        "commit": commit,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "model": config,
        "batch": BATCH,
        "seq_len": SEQ,
        "steps": args.steps,
        "precision": args.precision,
        "median_after": SKIP,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "speed.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [
        "| plan | run | median step (s) | vs the plain loop, same plan |",
        "|---|---|---:|---:|",
    ]
    lines += [
        f"| {r['plan']} | {r['run']} | {r['median_step_s']:.4f} | {r['ratio']:.2f} |" for r in rows
    ]
    with open(os.path.join(args.out, "speed.md"), "w") as f:
        f.write(
            f"# One-rank step time, lfdist vs a plain loop (CPU)\n\n"
            f"Written by `python benchmarks/speed/run.py --steps {args.steps}` at commit "
            f"{commit}; torch {meta['torch']}, transformers {meta['transformers']}, "
            f"{meta['machine']}; {args.precision}, micro-batch {BATCH}, sequence {SEQ}, "
            f"median of steps {SKIP + 1}..{args.steps}.\n\n" + "\n".join(lines) + "\n"
        )
    print(f"wrote {args.out}/speed.json and speed.md")


if __name__ == "__main__":
    main(sys.argv[1:])
