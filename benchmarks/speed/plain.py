"""The plain PyTorch loop the speed benchmark measures lfdist against (one process, one device).

What a user already has: the transformers model (SDPA attention), `requires_grad_(False)` on the
same frozen set as the plan, fused AdamW over the trainable parameters at the same lr and cosine
schedule, gradient clipping at 1.0. Precision `fp32` or `bf16` (weights, gradients and AdamW
states in that dtype: pure), or `autocast` (fp32 weights, bf16 compute). The batches are the
ones `lfdist train` feeds (same data, order and seed), so the losses compare.

Usage (benchmarks/speed/run.py calls it): python plain.py '{"folder": ..., "plan": ...,
"precision": ..., "batch": 4, "seq": 128, "steps": 30}'; prints one JSON line.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

# dtype the weights load in, and the precision the cost model prices the loop in
PRECISIONS = {
    "fp32": ("float32", "fp32", False),
    "bf16": ("bfloat16", "bf16", False),
    "autocast": ("float32", "bf16-mixed", True),
}


def data_spec(steps: int, batch: int) -> str:
    """The synthetic data every row of the benchmark reads (plain loop and lfdist alike)."""
    return f"synthetic:lm:{max(64, 2 * steps * batch)}"


def batches(folder: str, dtype: str, batch: int, seq: int, steps: int):
    """lfdist's own training batches for this model and data spec (what `lfdist train` reads)."""
    from lfdist.config import config_from_dict
    from lfdist.train.feed import StepFeeder
    from lfdist.train.prepare import prepare

    cfg = config_from_dict(
        {
            "model": {"spec": folder, "dtype": dtype},
            "data": {"spec": data_spec(steps, batch), "seq_len": seq},
        }
    )
    return StepFeeder(prepare(cfg).train, batch, 1, 1, 0, seed=0)


def main(args: dict) -> None:
    import torch
    import transformers

    from lfdist.cost import predict_plan
    from lfdist.model.info import meta_model_info
    from lfdist.plan import load_plan

    dtype, priced_as, autocast = PRECISIONS[args["precision"]]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = args["steps"]
    feeder = batches(args["folder"], dtype, args["batch"], args["seq"], steps)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args["folder"], dtype=getattr(torch, dtype)
    ).to(device)
    plan = load_plan(args["plan"])
    model.requires_grad_(False)
    for b in plan.blocks:
        model.model.layers[b.index].requires_grad_(b.treatment == "full")
    model.model.norm.requires_grad_(True)
    model.lm_head.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0, fused=True)
    cosine = lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    times, losses = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        for batch in feeder.micro_batches(step, device):
            with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                loss = model(**batch).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # the user's own logging: one host read per step
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    info = meta_model_info(args["folder"])
    predicted = predict_plan(
        info, plan, engine="single", world_size=1, dtype=dtype, precision=priced_as,
        batch_size=args["batch"], seq_len=args["seq"],
    )  # fmt: skip
    print(
        json.dumps(
            {
                "step_times": times,
                "losses": losses,
                "peak_bytes": peak,
                "predicted": predicted,
                "precision": args["precision"],
            }
        )
    )


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
