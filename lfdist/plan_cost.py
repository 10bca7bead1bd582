"""`lfdist plan cost`: a plan's predicted per-rank memory and FLOPs from a config alone.

The model is built on the meta device (lfdist.model.info.meta_model_info), so Llama-3.1-70B costs seconds
and no weights are read. A plan is a plan.yaml (its fingerprint must match the config) or the
top fraction of blocks; every number is the cost model's prediction (lfdist.cost).
"""

from __future__ import annotations

import math
from typing import Any

from lfdist.cost import DEFAULT_LORA_RANK, GIB, predict
from lfdist.errors import UserError

# Whole 8-GPU nodes beyond one node: how clusters are rented.
WORLD_SIZES = (1, 2, 4, *range(8, 8 * 1024 + 1, 8))


def top_fraction(n_blocks: int, fraction: float) -> list[str]:
    """Train the top ceil(fraction·L) blocks (at least one), freeze the rest."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise UserError(f"--top {fraction!r} must be a fraction in (0, 1]")
    if not 0 < fraction <= 1:
        raise UserError(f"--top {fraction} must be a fraction in (0, 1]; 1 is full fine-tuning")
    n = max(1, math.ceil(fraction * n_blocks - 1e-9))
    return ["frozen"] * (n_blocks - n) + ["full"] * n


def fewest_gpus(
    info: dict[str, Any],
    treatments: list[str],
    modules: dict[str, str],
    gpu_gib: float,
    **settings,
) -> int | None:
    """The smallest world size in WORLD_SIZES whose per-rank prediction fits `gpu_gib`."""

    def fits(w):
        p = predict(info, treatments, modules, world_size=w, **settings)
        return p["bytes"]["total"] <= gpu_gib * GIB

    if not fits(WORLD_SIZES[-1]):  # per-rank bytes only fall as ranks are added
        return None
    return next(w for w in WORLD_SIZES if fits(w))


def plan_cost(
    model: str,
    plan_path: str | None = None,
    top: float | None = None,
    task: str = "lm",
    gpu_gib: float | None = None,
    **settings,
) -> dict[str, Any]:
    """Prediction for one plan on one engine setting, plus the fewest GPUs it fits on."""
    from lfdist.model.info import meta_model_info
    from lfdist.plan import Fingerprint, default_modules, load_plan

    if (plan_path is None) == (top is None):
        raise UserError("give exactly one of --plan FILE or --top FRACTION")
    plan = load_plan(plan_path) if plan_path else None  # bad plan files fail before the build
    info = meta_model_info(model, task)
    if plan is not None:
        plan.check_model(Fingerprint(**info["fingerprint"]))
        treatments, modules = plan.treatments, plan.modules
        rank = plan.options.get("lora_rank")
        settings.setdefault("lora_rank", DEFAULT_LORA_RANK if rank is None else rank)
    else:
        treatments, modules = top_fraction(info["n_blocks"], top), default_modules(info)
    p = predict(info, treatments, modules, **settings)
    if gpu_gib is not None:
        rest = {k: v for k, v in settings.items() if k != "world_size"}
        p["gpu_gib"] = gpu_gib
        p["fewest_gpus"] = fewest_gpus(info, treatments, modules, gpu_gib, **rest)
        p["fewest_gpus_full"] = fewest_gpus(
            info, ["full"] * len(treatments), modules, gpu_gib, **rest
        )
    p["model"] = model
    p["architecture"] = info["architecture"]
    p["n_blocks"] = info["n_blocks"]
    p["trainable_blocks"] = sum(t != "frozen" for t in treatments)
    p["treatments"] = treatments
    return p


def cost_table(p: dict[str, Any]) -> str:
    """The prediction as a few readable lines."""
    engine = p["engine"] + (f" ZeRO-{p['zero_stage']}" if p["zero_stage"] is not None else "")
    b = p["bytes"]
    lines = [
        f"{p['model']} ({p['architecture']}, {p['n_blocks']} blocks, "
        f"{p['params_total'] / 1e9:.2f}B parameters): predicted by the cost model, no weights read",
        f"plan: {p['trainable_blocks']} of {p['n_blocks']} blocks train, "
        f"{p['params_trainable'] / 1e9:.3f}B trainable parameters "
        f"({100 * p['trainable_fraction']:.1f}%)",
        f"{engine}, {p['world_size']} ranks, {p['dtype']} weights in {p['precision']} "
        f"({p['bytes_per_trainable_param']:g} B per trainable parameter with its gradient and "
        f"AdamW states, {p['bytes_per_frozen_param']:g} per frozen), batch {p['batch_size']} x "
        f"{p['seq_len']} tokens per rank, activation checkpointing "
        f"{'on' if p['activation_checkpointing'] else 'off'}",
        "per rank GiB: "
        + ", ".join(
            f"{k} {b[k] / GIB:.2f}"
            for k in ("params", "grads", "optimizer", "activations", "transient")
        ),
        f"total {p['gib_per_rank']:.2f} GiB per rank (full fine-tuning {p['gib_per_rank_full']:.2f}, "
        f"{100 * p['memory_fraction']:.0f}% of it)",
        f"FLOPs per step per rank: {p['flops_per_step']:.3e} "
        f"({100 * p['flops_fraction']:.0f}% of full fine-tuning's {p['flops_full_per_step']:.3e})",
    ]
    if "gpu_gib" in p:

        def fits(w):
            if w is None:  # activations and replicated state do not shrink with more ranks
                return f"none up to {WORLD_SIZES[-1]}"
            return f"{w} GPU" + ("s" if w > 1 else "")

        lines.append(
            f"fewest {p['gpu_gib']:g} GiB GPUs: {fits(p['fewest_gpus'])} "
            f"(full fine-tuning: {fits(p['fewest_gpus_full'])})"
        )
    return "\n".join(lines)


def add_cost_parser(plan_subparsers) -> None:
    """`lfdist plan cost ...` (argument definitions kept here so the CLI stays thin)."""
    from lfdist.cost import ENGINES

    c = plan_subparsers.add_parser(
        "cost", help="predicted per-rank memory and FLOPs from a config alone (no weights)"
    )
    c.add_argument(
        "--model", required=True, help="config.json, folder, tiny:<arch>, pkg:<name> or HF id"
    )
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--plan", default=None, help="plan.yaml made for this model")
    which.add_argument(
        "--top", type=float, default=None, help="train the top fraction of blocks (1 = all)"
    )
    c.add_argument("--task", choices=["lm", "classify"], default="lm")
    c.add_argument("--engine", choices=list(ENGINES), default="fsdp2")
    c.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None)
    c.add_argument("--world-size", type=int, default=8)
    c.add_argument("--seq-len", type=int, default=4096, help="tokens per example")
    c.add_argument("--batch-size", type=int, default=1, help="examples per rank per micro-step")
    c.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    c.add_argument(
        "--precision",
        choices=["auto", "bf16-mixed", "bf16", "fp16", "fp32"],
        default="auto",
        help="train.precision (auto: bf16-mixed for bf16, fp32 masters and AdamW states for "
        "trainable parameters only)",
    )
    c.add_argument("--activation-checkpointing", action="store_true")
    c.add_argument("--lora-rank", type=int, default=None, help="default: the plan's, else 8")
    c.add_argument(
        "--gpu-gib", type=float, default=None, help="also the fewest GPUs of this many GiB"
    )
    c.add_argument("--json", action="store_true", help="print the prediction as JSON")


def run_cli(args) -> str:
    import json

    if args.engine == "deepspeed" and args.zero_stage is None:
        raise UserError("--engine deepspeed needs --zero-stage 0, 1, 2 or 3")
    settings = dict(
        engine=args.engine,
        zero_stage=2 if args.zero_stage is None else args.zero_stage,
        world_size=args.world_size,
        dtype=args.dtype,
        precision=args.precision,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        activation_checkpointing=args.activation_checkpointing,
    )
    if args.lora_rank is not None:
        settings["lora_rank"] = args.lora_rank
    p = plan_cost(args.model, args.plan, args.top, args.task, args.gpu_gib, **settings)
    return json.dumps(p, indent=1) if args.json else cost_table(p)
