"""`lfdist bench memory`: predicted next to measured, plan against full fine-tuning.

Per engine (DDP, FSDP2, ZeRO-1/2/3; 2 ranks): gradient and optimizer-state bytes per rank as
the cost model predicts them and as the ranks hold them (walking the tensors). In one process:
training FLOPs of one step (FlopCounterMode) and activation bytes saved for backward
(saved-tensor hooks) against the cost model, and the step-time ratio.

Plans: a frozen prefix (3 of 8 blocks train), full fine-tuning, `lora` (LoRA rank 8 on every
block's attention projections, base weights frozen) and `lisa` (2 blocks drawn every 2 steps;
DDP and FSDP2 only, DeepSpeed refuses it). A lisa row measures its first step's draw (blocks 4
and 5 with seed 1; the run re-draws at step 2); the cost model predicts that draw.
"""

from __future__ import annotations

import os
import tempfile

# (engine, ZeRO stage, ZeRO-3 frozen prefix kept whole on every rank)
ENGINES = [
    ("ddp", 0, False),
    ("fsdp2", 0, False),
    ("deepspeed", 1, False),
    ("deepspeed", 2, False),
    ("deepspeed", 3, False),
    ("deepspeed", 3, True),
]
MODEL, DATA, SEQ, BATCH = "tiny:llama", "synthetic:lm:300", 64, 2


LISA = {"n": 2, "period": 2, "seed": 1}
LISA_ENGINES = ("ddp", "fsdp2")  # DeepSpeed cannot change its trainable set


def _plans(model) -> dict[str, list[str]]:
    from lfdist.lisa_draw import lisa_blocks

    n = len(model.model.layers)
    drawn = lisa_blocks(n, LISA["n"], LISA["period"], LISA["seed"], 0)
    return {
        "prefix": ["frozen"] * (n - 3) + ["full"] * 3,
        "full": ["full"] * n,
        "lora": ["lora"] * n,
        "lisa": ["full" if i in drawn else "frozen" for i in range(n)],
    }


def _plan(model, name: str, treatments: list[str]):
    from dataclasses import replace

    from lfdist.train.measure import make_plan_for

    plan = make_plan_for(model, treatments, name)
    return replace(plan, options=dict(LISA)) if name == "lisa" else plan


def _predict(info, treatments, engine, stage, dtype="float32"):
    from lfdist.cost import predict
    from lfdist.plan import DEFAULT_MODULES

    return predict(
        info,
        treatments,
        DEFAULT_MODULES,
        engine=engine,
        zero_stage=stage or 2,
        world_size=2,
        dtype=dtype,
        batch_size=BATCH,
        seq_len=SEQ,
    )


def _distributed(info, plans, workdir) -> list[dict]:
    from lfdist.config import config_from_dict
    from lfdist.job import Job
    from lfdist.launch.run import launch_training
    from lfdist.model.tiny import build_tiny
    from lfdist.plan import save_plan

    rows = []
    for engine, stage, replicate in ENGINES:
        for name, treatments in plans.items():
            if replicate and name != "prefix":
                continue  # the frozen-prefix comparison
            if name == "lisa" and engine not in LISA_ENGINES:
                continue
            plan_path = os.path.join(workdir, f"{name}.yaml")
            if not os.path.exists(plan_path):
                save_plan(_plan(build_tiny("llama", "lm"), name, treatments), plan_path)
            cfg = config_from_dict(
                {
                    "model": {"spec": MODEL},
                    "data": {"spec": DATA, "seq_len": SEQ},
                    "train": {
                        "engine": engine,
                        "zero_stage": stage or 2,
                        "nproc": 2,
                        "steps": 3,
                        "batch_size": BATCH,
                        "lr": 1e-3,
                        "zero3_replicate_frozen": replicate,
                        "deepspeed_config": _comms_logged(stage, workdir)
                        if engine == "deepspeed"
                        else None,
                    },
                }
            )
            out = os.path.join(workdir, f"{engine}{stage or ''}{'r' if replicate else ''}-{name}")
            m = launch_training(Job(cfg, plan_path, out, evaluate=False))
            pred = _predict(info, treatments, engine, stage)
            r0 = m["per_rank"][0]
            rows.append(
                {
                    "engine": engine
                    + (f" ZeRO-{stage}" if stage else "")
                    + (" frozen replicated" if replicate else ""),
                    "plan": name,
                    "param_bytes": [r["after_step"]["param_bytes"] for r in m["per_rank"]],
                    "grad_bytes": [r["after_backward"]["grad_bytes"] for r in m["per_rank"]],
                    "optimizer_bytes": [
                        r["after_step"]["optimizer_state_bytes"] for r in m["per_rank"]
                    ],
                    "predicted_grad_bytes": pred["bytes"]["grads"],
                    "predicted_optimizer_bytes": pred["bytes"]["optimizer"],
                    "comms": m.get("comms"),
                    "median_step_s": sorted(m["step_times"][1:])[len(m["step_times"][1:]) // 2],
                    "extra": {
                        k: v
                        for k, v in r0["after_step"].items()
                        if k.endswith(("unpadded", "padding_elements", "master_weight_elements"))
                    },
                }
            )
    return rows


def _comms_logged(stage: int, workdir: str) -> str:
    """Our DeepSpeed template with DeepSpeed's comms logger on: collective bytes per rank."""
    import json

    from lfdist.engines.deepspeed import template

    path = os.path.join(workdir, f"zero{stage}-comms.json")
    with open(path, "w") as f:
        json.dump(
            {
                **template(stage),
                "comms_logger": {"enabled": True, "prof_all": True, "verbose": False},
            },
            f,
        )
    return path


def _in_process(info, plans) -> list[dict]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lfdist.model.apply import apply_plan
    from lfdist.model.tiny import build_tiny

    torch.manual_seed(0)
    ids = torch.randint(0, 256, (BATCH, SEQ))
    rows = []
    for name, treatments in plans.items():
        model = build_tiny("llama", "lm")
        apply_plan(model, _plan(model, name, treatments))
        saved: dict[tuple, int] = {}

        def pack(t, saved=saved):
            # A tensor saved by several ops is stored once: count each storage once; weights
            # saved for backward are parameters, not activations.
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                saved[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        with FlopCounterMode(display=False) as flops:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        pred = _predict(info, treatments, "single", 0)
        rows.append(
            {
                "plan": name,
                "flops": flops.get_total_flops(),
                "predicted_flops": pred["flops_per_step"],
                "activation_bytes": sum(saved.values()),
                "predicted_activation_bytes": pred["bytes"]["activations"],
            }
        )
    return rows


def _markdown(dist_rows, local_rows) -> str:
    lines = [
        "## Gradient and optimizer-state bytes per rank (2 ranks, fp32, tiny llama; prefix: 5 of 8 blocks frozen; lora: rank 8 on every block; lisa: the first draw of 2 blocks)",
        "",
        "| engine | plan | params held (rank 0 / 1) | grads measured (rank 0 / 1) | grads predicted | optimizer measured (rank 0 / 1) | optimizer predicted | median step s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in dist_rows:
        lines.append(
            f"| {r['engine']} | {r['plan']} | {r['param_bytes'][0]:,} / {r['param_bytes'][1]:,} | "
            f"{r['grad_bytes'][0]:,} / {r['grad_bytes'][1]:,} | "
            f"{int(r['predicted_grad_bytes']):,} | {r['optimizer_bytes'][0]:,} / {r['optimizer_bytes'][1]:,} | "
            f"{int(r['predicted_optimizer_bytes']):,} | {r['median_step_s']:.3f} |"
        )
    lines += [
        "",
        "## One training step in one process: FLOPs and activations saved for backward",
        "",
        "| plan | FLOPs measured | FLOPs predicted | activation bytes measured | activation bytes predicted |",
        "|---|---|---|---|---|",
    ]
    for r in local_rows:
        lines.append(
            f"| {r['plan']} | {r['flops']:,} | {int(r['predicted_flops']):,} | "
            f"{r['activation_bytes']:,} | {int(r['predicted_activation_bytes']):,} |"
        )
    by = {r["plan"]: r for r in local_rows}
    if {"prefix", "full"} <= set(by):
        lines += [
            "",
            f"Measured FLOPs ratio prefix/full: {by['prefix']['flops'] / by['full']['flops']:.3f}; "
            f"predicted: {by['prefix']['predicted_flops'] / by['full']['predicted_flops']:.3f}. "
            f"Activation bytes ratio measured: {by['prefix']['activation_bytes'] / by['full']['activation_bytes']:.3f}.",
        ]
    for name in ("lora", "lisa"):
        if {name, "full"} <= set(by):
            lines.append(
                f"FLOPs ratio {name}/full measured {by[name]['flops'] / by['full']['flops']:.3f}, "
                f"predicted {by[name]['predicted_flops'] / by['full']['predicted_flops']:.3f}."
            )
    comm_rows = [r for r in dist_rows if r.get("comms")]
    if comm_rows:
        lines += [
            "",
            "## DeepSpeed collectives over the whole run (3 steps, rank 0; DeepSpeed's comms logger)",
            "",
            "| engine | plan | all-gather bytes | all-gather calls | reduce-scatter bytes | all-reduce bytes |",
            "|---|---|---|---|---|---|",
        ]
        for r in comm_rows:
            c = r["comms"]

            def tot(prefixes, key, c=c):
                return sum(v[key] for op, v in c.items() if op.startswith(prefixes))

            lines.append(
                f"| {r['engine']} | {r['plan']} | {tot(('all_gather',), 'bytes'):,} | "
                f"{tot(('all_gather',), 'calls'):,} | {tot(('reduce_scatter',), 'bytes'):,} | "
                f"{tot(('all_reduce',), 'bytes'):,} |"
            )
    lines += [
        "",
        "Notes: measured gradients are read after the last backward of a step. ZeRO-1 reduces its "
        "full gradients at the boundary, so the full gradient (the prediction) exists only during "
        "backward; ZeRO-1/2 also keep the whole gradient tensor of every parameter that crosses a "
        "partition edge. Optimizer state includes DeepSpeed's fp32 master partition. 'Params held' "
        "under ZeRO-3 includes small persistent parameters; 'frozen replicated' keeps the frozen "
        "prefix whole on every rank, so it is never all-gathered.",
    ]
    return "\n".join(lines)


def _plot(dist_rows, path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4))
    ax = fig.add_subplot(1, 1, 1)
    labels = [f"{r['engine']}\n{r['plan']}" for r in dist_rows]
    x = range(len(dist_rows))
    ax.bar(
        [i - 0.2 for i in x],
        [sum(r["grad_bytes"][:1]) + r["optimizer_bytes"][0] for r in dist_rows],
        0.4,
        label="measured (rank 0)",
    )
    ax.bar(
        [i + 0.2 for i in x],
        [r["predicted_grad_bytes"] + r["predicted_optimizer_bytes"] for r in dist_rows],
        0.4,
        label="predicted",
    )
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("gradient + optimizer-state bytes per rank")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(out_dir: str, tiny: bool = True) -> str:
    from lfdist.bench.record import write_result
    from lfdist.model.info import model_info
    from lfdist.model.tiny import build_tiny

    model = build_tiny("llama", "lm")
    info = model_info(model, "lm")
    plans = _plans(model)
    with tempfile.TemporaryDirectory() as workdir:
        dist_rows = _distributed(info, plans, workdir)
    local_rows = _in_process(info, plans)
    os.makedirs(out_dir, exist_ok=True)
    _plot(dist_rows, os.path.join(out_dir, "memory.png"))
    result = {
        "setup": {
            "model": MODEL,
            "data": DATA,
            "seq_len": SEQ,
            "batch_size": BATCH,
            "world_size": 2,
        },
        "distributed": dist_rows,
        "in_process": local_rows,
    }
    return write_result(out_dir, "memory", result, _markdown(dist_rows, local_rows))
