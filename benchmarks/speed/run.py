"""One-device step time of every lfdist engine next to a plain PyTorch loop, side by side.

A generated Llama (seeded random weights in safetensors, the byte tokenizer) is trained with
two plans, full fine-tuning and the top quarter of blocks (embeddings frozen in both, as in
every lfdist plan; final norm and head train). Every row is its own process, one after another:

- `plain ...`: the loop a user already has (benchmarks/speed/plain.py): transformers model,
  `requires_grad_(False)` on the same frozen set, fused AdamW over the trainable parameters,
  clipping at 1.0, SDPA; pure (weights in the run dtype) or autocast over fp32 weights;
- `lfdist <engine>`: `lfdist train --nproc 1` through the real launcher (torchrun, or the
  deepspeed launcher), in lfdist's default precision for the model (bf16-mixed for bf16).

Same data (lfdist's own batches, so losses compare), micro-batch, sequence length and steps.
Per row: median step time after the first steps, tokens/s, model-FLOPs utilisation on a GPU
(the cost model's FLOPs per step over the card's dense bf16 peak), peak memory (CUDA
max_memory_allocated on a GPU, peak RSS on a CPU) next to the cost model's prediction for that
run, and the mean training loss of the last 5 steps. `ratio` is lfdist's median step over the
plain loop's in the same precision and plan; `plan/full` is a plan's median over full
fine-tuning's on the same engine, next to the predicted FLOPs fraction.

Run:  python benchmarks/speed/run.py              CPU: 25M Llama, fp32, writes benchmarks/speed/
      bash benchmarks/gpu/run.sh                  one GPU: 1.1B Llama, bf16, writes benchmarks/gpu/
      python benchmarks/speed/run.py --tiny       a 2-block model, 4 steps (the test suite runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

_IDS = dict(pad_token_id=256, bos_token_id=257, eos_token_id=258, tie_word_embeddings=False)
# CPU: ~25M parameters, 8 blocks of hidden 512 (GQA 8/4 heads), SwiGLU 1408, the byte vocabulary.
CPU_MODEL = dict(
    _IDS, vocab_size=320, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
)  # fmt: skip
# GPU: TinyLlama-1.1B's shape (1,100,048,384 parameters), as issue 15's measurements.
GPU_MODEL = dict(
    _IDS, vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
)  # fmt: skip
TINY_MODEL = dict(CPU_MODEL, hidden_size=64, intermediate_size=128, num_hidden_layers=4)
MODES = {  # model, dtype on disk, micro-batch, sequence, steps, plain-loop precisions
    "cpu": (CPU_MODEL, "float32", 4, 128, 30, ["fp32"]),
    "gpu": (GPU_MODEL, "bfloat16", 4, 1024, 30, ["bf16", "autocast"]),
    "tiny": (TINY_MODEL, "float32", 2, 32, 4, ["fp32"]),
}
ENGINES = {"ddp": [], "fsdp1": [], "fsdp2": [], "zero2": ["2"], "zero3": ["3"]}
SKIP, LAST = 3, 5  # first steps left out of the median; steps averaged for the final loss
# Dense bf16 tensor-core peak, FLOP/s, by a substring of the device name (vendor data sheets).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def generate(folder: str, config: dict, dtype: str, device: str) -> None:
    """The model's safetensors folder, written once (seeded: same weights every time)."""
    import torch
    import transformers

    if os.path.isfile(os.path.join(folder, "config.json")):
        return
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    model.to(getattr(torch, dtype)).save_pretrained(tmp)
    with open(os.path.join(tmp, "lfdist_tokenizer.json"), "w") as f:
        f.write("{}")  # the byte tokenizer serves a generated model (ids < 320 are used)
    os.replace(tmp, folder)


def write_plans(folder: str, dtype: str, out: str) -> dict[str, str]:
    from lfdist.model.blocks import find_blocks
    from lfdist.model.source import ModelSource
    from lfdist.plan import BlockPlan, Plan, save_plan

    source = ModelSource(folder, dtype=dtype)
    bmap = find_blocks(source.skeleton())
    n = bmap.n_blocks
    plans = {}
    for name, top in (("full", n), ("top quarter", max(1, n // 4))):
        blocks = tuple(
            BlockPlan(i, f"{bmap.path}.{i}", "full" if i >= n - top else "frozen") for i in range(n)
        )
        modules = {"embeddings": "frozen", "final_norm": "full", "head": "full"}
        plans[name] = os.path.join(out, f"plan-{name.replace(' ', '-')}.yaml")
        save_plan(Plan("top", source.fingerprint(), blocks, modules), plans[name])
    return plans


def lfdist_row(folder, dtype, plan, engine, mode, work) -> dict:
    from benchmarks.speed.plain import data_spec

    _, _, batch, seq, steps, _ = MODES[mode]
    out = os.path.join(work, f"{engine}-{os.path.basename(plan)[:-5]}")
    kind = ["--engine", "deepspeed", "--zero-stage", ENGINES[engine][0]] if engine[:4] == "zero" else ["--engine", engine]  # fmt: skip
    cmd = [
        sys.executable, "-m", "lfdist.cli", "train", "--model", folder, "--data",
        data_spec(steps, batch), "--plan", plan, *kind, "--nproc", "1",
        "--steps", str(steps), "--out", out, "--overwrite", f"data.seq_len={seq}",
        f"model.dtype={dtype}", f"train.batch_size={batch}", "train.eval_before=false",
        "train.save_final=false", "train.log_every=0",
    ]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        tail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1:]
        return {"error": f"exit {res.returncode}: {tail[0] if tail else ''}"[:400]}
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    memory = m["per_rank"][0]["memory"]
    return {
        "step_times": m["step_times"],
        "losses": [m["losses"][k] for k in sorted(m["losses"], key=int)],
        "peak_bytes": memory.get("cuda_max_allocated", memory.get("peak_rss")),
        "predicted": m["predicted_run"],
        "precision": m["precision"]["name"],
    }


def plain_row(folder, plan, precision, mode) -> dict:
    _, _, batch, seq, steps, _ = MODES[mode]
    args = dict(folder=folder, plan=plan, precision=precision, batch=batch, seq=seq, steps=steps)
    cmd = [sys.executable, os.path.join(HERE, "plain.py"), json.dumps(args)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        return {"error": f"exit {res.returncode}: {res.stderr.strip()[-400:]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def summarize(row: dict, batch: int, seq: int, peak_flops: float | None) -> dict:
    times = row.pop("step_times")
    step = statistics.median(times[SKIP:] if len(times) > SKIP + 1 else times)
    pred = row.get("predicted") or {}
    flops = pred.get("flops_per_step")
    row.update(
        median_step_s=step,
        tokens_per_s=batch * seq / step,
        mfu=flops / step / peak_flops if flops and peak_flops else None,
        final_loss=statistics.fmean(row["losses"][-LAST:]),
        predicted_gib=pred.get("gib_per_rank"),
        peak_gib=row["peak_bytes"] / 2**30 if row.get("peak_bytes") else None,
    )
    return row


def run(mode: str, out_dir: str, engines: list[str], cache: str) -> list[dict]:
    import torch

    config, dtype, batch, seq, steps, plain_precisions = MODES[mode]
    device = "cuda" if mode == "gpu" else "cpu"
    folder = os.path.join(cache, f"speed-llama-{mode}")
    generate(folder, config, dtype, device)
    work = tempfile.mkdtemp(prefix="lfdist-speed-")
    plans = write_plans(folder, dtype, work)
    name = torch.cuda.get_device_name(0) if device == "cuda" else ""
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    rows = []
    for plan_name, plan in plans.items():
        runs = [("plain", p) for p in plain_precisions] + [("lfdist", e) for e in engines]
        for kind, what in runs:
            if kind == "plain":
                measured = plain_row(folder, plan, what, mode)
            else:
                measured = lfdist_row(folder, dtype, plan, what, mode, work)
            row = {"plan": plan_name, "run": f"{kind} {what}", **measured}
            if "error" not in row:
                row = summarize(row, batch, seq, peak)
            rows.append(row)
            _print(row)
            write(rows, mode, out_dir)  # after every row: a timeout keeps what finished
    shutil.rmtree(work, ignore_errors=True)
    return rows


def _print(row: dict) -> None:
    if "error" in row:
        print(f"{row['plan']:12s} {row['run']:16s} failed: {row['error']}", flush=True)
    else:
        print(
            f"{row['plan']:12s} {row['run']:16s} {row['median_step_s']:.4f} s/step "
            f"loss {row['final_loss']:.4f}",
            flush=True,
        )


def write(rows: list[dict], mode: str, out_dir: str) -> None:
    from benchmarks.speed.report import write_report

    write_report(rows, mode, MODES[mode], out_dir)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="the 1.1B model on one CUDA device")
    ap.add_argument("--tiny", action="store_true", help="a 2-block model, 4 steps, CPU")
    ap.add_argument("--out", default=None)
    ap.add_argument("--engines", default=",".join(ENGINES))
    args = ap.parse_args(argv)
    mode = "gpu" if args.gpu else "tiny" if args.tiny else "cpu"
    engines = [e for e in args.engines.split(",") if e]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        raise SystemExit(f"unknown engine {unknown[0]}; use some of {', '.join(ENGINES)}")
    if any(e.startswith("zero") for e in engines) and not _has("deepspeed"):
        print("deepspeed is not installed: the ZeRO rows are left out (pip install it)")
        engines = [e for e in engines if not e.startswith("zero")]
    default_out = {"gpu": os.path.join(ROOT, "benchmarks", "gpu"), "cpu": HERE}
    out = args.out or default_out.get(mode) or tempfile.mkdtemp(prefix="lfdist-speed-tiny-")
    cache = os.path.join(
        os.environ.get("LFDIST_CACHE", os.path.expanduser("~/.cache/lfdist")), "generated"
    )
    run(mode, out, engines, cache)
    print(f"wrote {out}/speed-{mode}.json, .md and .png")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main(sys.argv[1:])
