"""The prepared GPU check: measured memory and step time next to the cost model, one device.

For SmolLM2-135M and a generated 1.1B Llama (TinyLlama's shape, seeded random weights) in
bf16: full fine-tuning against a plan training the top quarter of blocks, each with and
without activation checkpointing. Per run, one process, one device:

- parameters, gradients and AdamW states walked tensor by tensor; activations saved for
  backward through saved-tensor hooks (runs without checkpointing: checkpointed blocks keep
  their tensors out of the hooks' sight);
- peak memory: `torch.cuda.max_memory_allocated` over the timed steps on a GPU, the
  process's peak RSS on CPU (coarse: it includes the interpreter and libraries);
- median step time after warm-up;

each next to `lfdist.cost.predict` for engine `single` (nothing sharded) in pure bf16, the
precision this loop trains in: `torch.optim.AdamW(foreach=False)` on bf16 trainable parameters.
On a GPU each run is its own process, so each peak is that run's alone. lfdist's own engines in
their default precision are measured by benchmarks/gpu/run.sh (benchmarks/speed/run.py --gpu).
`--tiny` runs tiny:llama for two steps on the CPU (the default CPU test suite runs it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any

from lfdist.errors import UserError

# TinyLlama-1.1B's architecture: 1,100,048,384 parameters
GENERATED_1B = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
    tie_word_embeddings=False,
)  # fmt: skip
# name -> (source, micro-batch, sequence length)
GPU_MODELS = {
    "SmolLM2-135M": ("pkg:smollm2-135m", 8, 1024),
    "Llama-1.1B (generated)": ("generated:1b", 4, 1024),
}
TINY_MODELS = {"tiny:llama": ("tiny:llama", 2, 32)}
WARMUP, STEPS, TINY_STEPS = 2, 8, 2


def _build(source: str, device: str):
    import torch

    if source == "generated:1b":
        import transformers

        torch.manual_seed(0)
        with torch.device(device):
            return transformers.AutoModelForCausalLM.from_config(
                transformers.LlamaConfig(**GENERATED_1B), dtype=torch.bfloat16
            )
    from lfdist.model.specs import load_model

    return load_model(source, dtype="bfloat16").model.to(device)


def _plans(n_blocks: int) -> dict[str, list[str]]:
    quarter = max(1, n_blocks // 4)
    return {
        "full": ["full"] * n_blocks,
        "top quarter": ["frozen"] * (n_blocks - quarter) + ["full"] * quarter,
    }


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _saved_activation_bytes(model, ids) -> int:
    """Bytes saved for backward by one forward, parameters excluded."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    return sum(seen.values())


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_one(source, treatments, ckpt, batch, seq, device, steps) -> dict[str, Any]:
    """Train one plan for warm-up + `steps` steps; what it held and how long a step took."""
    import torch

    from lfdist.model.apply import apply_plan
    from lfdist.model.checkpointing import checkpoint_trainable_blocks
    from lfdist.model.info import model_info
    from lfdist.train.measure import make_plan_for

    model = _build(source, device)
    info = model_info(model, "lm")
    apply_plan(model, make_plan_for(model, treatments, "bench-gpu"))
    model.config.use_cache = False
    model.train()
    if ckpt:
        checkpoint_trainable_blocks(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, foreach=False)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, info["vocab_size"], (batch, seq), generator=gen).to(device)
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    times, walked = [], {}

    def train_step(walk: bool = False):
        loss = model(input_ids=ids, labels=ids).loss  # the output (and its logits) dropped here
        loss.backward()
        if walk:
            walked["grads"] = _nbytes(p.grad for p in trainable)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for step in range(WARMUP + steps):
        if step == WARMUP and cuda:  # optimizer states exist from here on
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        train_step(walk=step == WARMUP)
        sync()
        if step >= WARMUP:
            times.append(time.perf_counter() - t0)
    walked["params"] = _nbytes(model.parameters())
    walked["optimizer"] = _nbytes(
        s for p in trainable for s in opt.state[p].values() if s.dim() > 0
    )
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss()
    walked["activations"] = None if ckpt else _saved_activation_bytes(model, ids)
    return {
        "info": info,
        "measured": walked,
        "peak_bytes": peak,
        "peak_kind": "cuda max_memory_allocated" if cuda else "process peak RSS",
        "step_s_median": statistics.median(times),
    }


def rows(tiny: bool) -> Iterator[dict[str, Any]]:
    """One row per model x plan x checkpointing, as each run finishes. On a GPU a model that
    cannot load or a run that fails is recorded and skipped, so one bad run costs no others."""
    import torch

    device = "cpu" if tiny else "cuda"
    if not tiny and not torch.cuda.is_available():
        raise SystemExit("bench gpu: no CUDA device; run with --tiny on a CPU")
    steps = TINY_STEPS if tiny else STEPS
    for name, (source, batch, seq) in (TINY_MODELS if tiny else GPU_MODELS).items():
        try:
            plans = _plans(_n_blocks(source))
        except (UserError, ImportError, OSError) as e:  # e.g. SmolLM2's package is absent
            yield {"model": name, "skipped": str(e)}
            continue
        for plan, treatments in plans.items():
            for ckpt in (False, True):
                args = (name, source, batch, seq, plan, treatments, ckpt, device, steps)
                try:
                    yield _row(*args) if tiny else _row_in_own_process(args)
                except Exception as e:  # noqa: BLE001 - a one-shot GPU run keeps what it has
                    if tiny:
                        raise
                    yield {"model": name, "skipped": f"{plan}, AC {ckpt}: {e!r}"[:500]}


def _row_in_own_process(args: tuple) -> dict[str, Any]:
    """One row in a fresh process: max_memory_allocated then counts that run alone (in one
    process every later row's peak carried the earlier runs' memory: 2.0x-3.8x the plain
    loop's, issue 15)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_row, args)


def _release(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _row(name, source, batch, seq, plan, treatments, ckpt, device, steps) -> dict[str, Any]:
    from lfdist.cost import predict
    from lfdist.plan import default_modules

    m = measure_one(source, treatments, ckpt, batch, seq, device, steps)
    _release(device)  # the run's model and optimizer are garbage now: give their memory back
    p = predict(
        m["info"],
        treatments,
        default_modules(m["info"]),
        engine="single",
        world_size=1,
        dtype="bfloat16",
        precision="bf16",  # this loop holds everything in bf16 (pure)
        batch_size=batch,
        seq_len=seq,
        activation_checkpointing=ckpt,
    )
    return {
        "model": name,
        "params_total": m["info"]["total_params"],
        "n_blocks": m["info"]["n_blocks"],
        "plan": plan,
        "trainable_blocks": treatments.count("full"),
        "activation_checkpointing": ckpt,
        "batch_size": batch,
        "seq_len": seq,
        "device": device,
        "predicted": p["bytes"],
        "measured": m["measured"],
        "peak_bytes": m["peak_bytes"],
        "peak_kind": m["peak_kind"],
        "step_s_median": m["step_s_median"],
        "predicted_flops_fraction": p["flops_fraction"],
    }


def _n_blocks(source: str) -> int:
    if source == "generated:1b":
        return GENERATED_1B["num_hidden_layers"]
    from lfdist.model.source import ModelSource

    return ModelSource(source).config().num_hidden_layers


def run(out_dir: str, tiny: bool = False) -> str:
    from lfdist.bench.gpu_table import card, markdown
    from lfdist.bench.record import environment, write_result

    result = {
        "kind": "cpu smoke test (--tiny)" if tiny else "measured on a GPU",
        "card": card(),
        "environment": environment(),
        "settings": {"warmup_steps": WARMUP, "steps": TINY_STEPS if tiny else STEPS},
        "rows": [],
    }
    name = "tiny_cpu" if tiny else "gpu"
    md = ""
    for row in rows(tiny):  # rewritten after every run: a timeout keeps what finished
        result["rows"].append(row)
        md = write_result(out_dir, name, result, markdown(result["rows"], tiny))
        print(f"{row['model']}: {row.get('plan', row.get('skipped'))}", flush=True)
    return md


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="measured memory and step time vs the cost model")
    parser.add_argument("--tiny", action="store_true", help="tiny:llama, two steps, on the CPU")
    parser.add_argument(
        "--out", default=None, help="default: benchmarks/gpu (a temp folder with --tiny)"
    )
    args = parser.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = args.out or (
        os.path.join("/tmp", "lfdist-gpu-tiny")
        if args.tiny
        else os.path.join(root, "benchmarks", "gpu")
    )
    print(f"wrote {run(out, tiny=args.tiny)}")


if __name__ == "__main__":
    main()
