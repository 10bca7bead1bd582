"""Predicted per-rank memory of Llama-3.1-8B and 70B plans at cluster scale (no weights).

Every number here is the cost model's prediction (lfdist.cost) on the model built from its
architecture-only config on the meta device; nothing is measured. Plans: full fine-tuning
and the top 50%, 25% and 10% of blocks (embeddings frozen, final norm and head trained, as
lfdist's plans default). Engines: ZeRO-2, ZeRO-3, FSDP2; 8-512 GPUs; bf16-mixed (lfdist's default for bf16); with and without
activation checkpointing of the trainable blocks. "Fewest GPUs" is the smallest world size
(1, 2, 4, then whole 8-GPU nodes) whose per-rank prediction fits an 80 GB card.
"""

from __future__ import annotations

import os
from typing import Any

MODELS = {
    "Llama-3.1-8B": "configs/models/llama-3.1-8b.json",
    "Llama-3.1-70B": "configs/models/llama-3.1-70b.json",
}
PLANS = {"full": 1.0, "top 50%": 0.5, "top 25%": 0.25, "top 10%": 0.1}
ENGINES = {"ZeRO-2": ("deepspeed", 2), "ZeRO-3": ("deepspeed", 3), "FSDP2": ("fsdp2", 0)}
WORLD_SIZES = (8, 16, 64, 512)
SEQ_LEN, BATCH, DTYPE = 4096, 1, "bfloat16"
# An 80 GB card shows torch 79.1 GiB; ~7 GiB go to the CUDA context, NCCL buffers and allocator
# fragmentation, none of which the cost model counts.
GPU_GIB = 72.0
PARTS = ("params", "grads", "optimizer", "activations", "transient")


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rows(models: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per model x plan x engine x activation checkpointing."""
    from lfdist.cost import GIB, predict
    from lfdist.model.info import meta_model_info
    from lfdist.plan import default_modules
    from lfdist.plan_cost import fewest_gpus, top_fraction

    out = []
    for model, path in (models or MODELS).items():
        info = meta_model_info(path if os.path.isabs(path) else os.path.join(_root(), path))
        modules = default_modules(info)
        for plan, fraction in PLANS.items():
            treatments = top_fraction(info["n_blocks"], fraction)
            for engine_name, (engine, stage) in ENGINES.items():
                for ckpt in (False, True):
                    kw = dict(
                        engine=engine,
                        zero_stage=stage,
                        dtype=DTYPE,
                        batch_size=BATCH,
                        seq_len=SEQ_LEN,
                        activation_checkpointing=ckpt,
                    )
                    per_w = {}
                    for w in WORLD_SIZES:
                        p = predict(info, treatments, modules, world_size=w, **kw)
                        per_w[str(w)] = {k: p["bytes"][k] / GIB for k in (*PARTS, "total")}
                    out.append(
                        {
                            "model": model,
                            "params_total": info["total_params"],
                            "plan": plan,
                            "trainable_blocks": treatments.count("full"),
                            "n_blocks": info["n_blocks"],
                            "trainable_params": p["params_trainable"],
                            "engine": engine_name,
                            "activation_checkpointing": ckpt,
                            "gib_per_rank": per_w,
                            "flops_fraction": p["flops_fraction"],
                            "fewest_80gb_gpus": fewest_gpus(
                                info, treatments, modules, GPU_GIB, **kw
                            ),
                        }
                    )
    return out


def _fewest(w: int | None) -> str:
    return "none" if w is None else str(w)


def markdown(table: list[dict[str, Any]]) -> str:
    lines = [
        "**Predicted by the cost model (lfdist.cost), not measured.** Per-rank GiB for bf16-mixed "
        f"training, micro-batch {BATCH} x {SEQ_LEN} tokens per rank, AdamW; 'fewest GPUs' = "
        f"smallest world size (1, 2, 4, then multiples of 8) whose per-rank total fits "
        f"{GPU_GIB:g} GiB of an 80 GB card ('none': activations or replicated state alone "
        "exceed it at any size). AC = activation checkpointing of the trainable blocks.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in table):
        mine = [r for r in table if r["model"] == model]
        lines += [
            f"### {model} ({mine[0]['params_total'] / 1e9:.2f}B parameters, "
            f"{mine[0]['n_blocks']} blocks)",
            "",
            "| plan | blocks trained | engine | AC | "
            + " | ".join(f"{w} GPUs" for w in WORLD_SIZES)
            + " | fewest 80 GB GPUs | FLOPs vs full |",
            "|---|---:|---|---|" + "---:|" * len(WORLD_SIZES) + "---:|---:|",
        ]
        for r in mine:
            cells = " | ".join(f"{r['gib_per_rank'][str(w)]['total']:.1f}" for w in WORLD_SIZES)
            lines.append(
                f"| {r['plan']} | {r['trainable_blocks']}/{r['n_blocks']} | {r['engine']} | "
                f"{'on' if r['activation_checkpointing'] else 'off'} | {cells} | "
                f"{_fewest(r['fewest_80gb_gpus'])} | {100 * r['flops_fraction']:.0f}% |"
            )
        lines.append("")
    lines += _breakdown(table, 64)
    return "\n".join(lines)


def _breakdown(table: list[dict[str, Any]], w: int) -> list[str]:
    """Where the bytes go at one world size, activation checkpointing on."""
    lines = [
        f"### Per-rank breakdown at {w} GPUs, activation checkpointing on (GiB)",
        "",
        "| model | plan | engine | " + " | ".join(PARTS) + " | total |",
        "|---|---|---|" + "---:|" * (len(PARTS) + 1),
    ]
    for r in table:
        if not r["activation_checkpointing"]:
            continue
        g = r["gib_per_rank"][str(w)]
        cells = " | ".join(f"{g[k]:.2f}" for k in (*PARTS, "total"))
        lines.append(f"| {r['model']} | {r['plan']} | {r['engine']} | {cells} |")
    return lines + [""]


def plot(table: list[dict[str, Any]], path: str) -> None:
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(r["model"] for r in table))
    fig = Figure(figsize=(6 * len(ENGINES), 4.2 * len(models)))
    axes = fig.subplots(len(models), len(ENGINES), squeeze=False)
    for i, model in enumerate(models):
        for j, engine in enumerate(ENGINES):
            ax = axes[i][j]
            for r in table:
                if r["model"] != model or r["engine"] != engine:
                    continue
                ys = [r["gib_per_rank"][str(w)]["total"] for w in WORLD_SIZES]
                style = "-" if r["activation_checkpointing"] else ":"
                label = f"{r['plan']}{' +AC' if r['activation_checkpointing'] else ''}"
                color = f"C{list(PLANS).index(r['plan'])}"  # one colour per plan
                ax.plot(WORLD_SIZES, ys, style, color=color, marker="o", label=label)
            ax.axhline(GPU_GIB, color="red", linewidth=1)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(WORLD_SIZES, [str(w) for w in WORLD_SIZES])
            ax.set_title(f"{model}, {engine} (predicted)")
            ax.set_xlabel("GPUs")
            ax.set_ylabel("GiB per rank")
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle(
        f"Predicted per-rank memory, bf16-mixed, {BATCH} x {SEQ_LEN} tokens per rank; red: {GPU_GIB:g} GiB"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def run(out_dir: str) -> str:
    from lfdist.bench.record import write_result

    table = rows()
    result = {
        "kind": "predicted",
        "source": "lfdist.cost (analytic cost model) on meta-device models; nothing measured",
        "settings": {
            "dtype": DTYPE,
            "precision": "bf16-mixed (the default for bf16 models)",
            "seq_len": SEQ_LEN,
            "micro_batch_per_rank": BATCH,
            "world_sizes": list(WORLD_SIZES),
            "gpu_gib_usable": GPU_GIB,
            "models": MODELS,
            "plans": PLANS,
        },
        "rows": table,
    }
    md = write_result(out_dir, "scale", result, markdown(table), verb="Computed")
    plot(table, os.path.join(out_dir, "scale.png"))
    return md
