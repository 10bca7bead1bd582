"""`lfdist plan show`: a per-layer table and a PNG of deviation and gain per layer.

Reads only the plan (and, when given, the probe it came from); matplotlib loads lazily.
"""

from __future__ import annotations

import os
from typing import Any

from lfdist.errors import UserError
from lfdist.plan import head_treatment

COLORS = {
    "frozen": "#9e9e9e",
    "full": "#1f77b4",
    "bias": "#2ca02c",
    "lora": "#ff7f0e",
    "mask": "#9467bd",
}


def _curves(plan, probe) -> dict[str, Any]:
    """Per-layer curves from the plan's scores, completed from the probe."""
    curves = dict(plan.scores)
    if probe is not None:
        for key in ("deviation", "gradnorm"):
            if key not in curves and key in probe.curves:
                curves[key] = probe.curves[key]
    return curves


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.4g}"


def plan_table(plan, probe=None) -> str:
    """One row per block: index, name, treatment, params, and any score curves present."""
    curves = _curves(plan, probe)
    per_block = probe.model_info["per_block_params"] if probe is not None else None
    cols = ["#", "block", "treatment", "params"]
    extra = [k for k in ("gain", "gradnorm") if isinstance(curves.get(k), list)]
    has_dev = isinstance(curves.get("deviation"), list)
    cols += extra + (["d_out"] if has_dev else []) + ["score"]
    rows = []
    for b in plan.blocks:
        row = [str(b.index), b.name, b.treatment, _fmt(per_block[b.index]) if per_block else "-"]
        row += [_fmt(curves[k][b.index]) for k in extra]
        if has_dev:  # deviation of the block's output latent space, d_{i+1}
            row.append(_fmt(curves["deviation"][b.index + 1]))
        row.append(_fmt(b.score))
        rows.append(row)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines += _legend(extra, has_dev, plan.strategy)
    groups = ", ".join(f"{g} {t}" for g, t in plan.modules.items() if g != "head")
    lines.append(f"modules: {groups}; {head_treatment(plan.modules)}")
    lines.append(_totals(plan))
    if plan.strategy == "salf" and plan.scores:
        from lfdist.select.salf import explain

        lines += explain(plan.scores, plan.boundary, plan.budget)
    return "\n".join(lines)


def _legend(extra: list[str], has_dev: bool, strategy: str) -> list[str]:
    """What the score columns mean, once, in words (the table's only key)."""
    words = []
    if "gain" in extra:
        words.append(
            "gain = the share of the probe's loss fall (embeddings to output) that this block and "
            "every block above it carry; 1 at the bottom"
        )
    if "gradnorm" in extra:
        words.append("gradnorm = the block's gradient norm on the calibration data")
    if has_dev:
        words.append(
            "d_out = the loss read out of the block's output (the logit lens for language models, "
            "nearest class centroid for classifiers): lower is closer to the answer"
        )
    words.append(f"score = what {strategy} ranked the blocks by")
    return ["columns: " + "; ".join(words)]


def _totals(plan) -> str:
    n_train = len(plan.trainable_blocks)
    parts = [
        f"strategy {plan.strategy}: {n_train}/{len(plan.blocks)} blocks train, "
        f"backward stops at block {plan.boundary}"
    ]
    p = plan.predicted
    if p:
        parts.append(f"trainable {p['trainable_fraction']:.1%} of parameters")
        parts.append(
            f"predicted FLOPs {p['flops_fraction']:.1%} of full fine-tuning "
            f"(saves {1 - p['flops_fraction']:.1%})"
        )
        parts.append(
            f"memory {p['gib_per_rank']:.3g} GiB/rank vs {p['gib_per_rank_full']:.3g} "
            f"(saves {1 - p['memory_fraction']:.1%}, {p['engine']}"
            f"{'' if p.get('zero_stage') is None else ' ZeRO-' + str(p['zero_stage'])}"
            f" x{p['world_size']}, {_priced_in(p)})"
        )
    return "; ".join(parts)


def _priced_in(p: dict) -> str:
    """The precision the memory figure assumes, in words (plans from before it was recorded:
    the weights' dtype only)."""
    dtype = p.get("dtype", "float32")
    if "precision" not in p:
        return f"{dtype} weights"
    per = p.get("bytes_per_trainable_param")
    return (
        f"{dtype} weights, {p['precision']}: {per:g} B per trainable parameter, "
        f"{p.get('bytes_per_frozen_param', 0):g} per frozen"
    )


def plot_plan(plan, png_path: str, probe=None) -> str:
    """Deviation trace per latent space and gain (or score) per block, the split marked."""
    try:  # a bare Figure renders with Agg and leaves pyplot's global backend alone
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise UserError(
            "plotting needs matplotlib; pip install matplotlib (or lfdist[demo])"
        ) from None
    curves = _curves(plan, probe)
    L = len(plan.blocks)
    fig = Figure(figsize=(max(6, L * 0.3), 6))
    ax_d, ax_g = fig.subplots(2, 1, sharex=True)
    dev = curves.get("deviation")
    if isinstance(dev, list):
        # Latent space l sits between block l-1 and block l: plot it at x = l - 0.5.
        ax_d.plot([i - 0.5 for i in range(L + 1)], dev, marker="o", color="black")
        ax_d.set_ylabel("deviation d_l")
    else:
        ax_d.text(0.5, 0.5, "no deviation trace", ha="center", transform=ax_d.transAxes)
    key = next((k for k in ("gain", "gradnorm") if isinstance(curves.get(k), list)), None)
    if key:
        heights, label = curves[key], key
    elif any(b.score for b in plan.blocks):
        heights, label = [b.score or 0.0 for b in plan.blocks], "score"
    else:  # a strategy without scores (top, bottom, all): show what trains instead
        heights, label = [0.0 if b.treatment == "frozen" else 1.0 for b in plan.blocks], "trains"
    ax_g.bar(range(L), heights, color=[COLORS[b.treatment] for b in plan.blocks])
    ax_g.set_ylabel(label)
    ax_g.set_xlabel("block")
    for ax in (ax_d, ax_g):
        ax.axvline(plan.boundary - 0.5, color="red", linestyle="--", linewidth=1)
    used = sorted({b.treatment for b in plan.blocks})
    ax_g.legend([Patch(color=COLORS[t]) for t in used], used, loc="upper right", fontsize=8)
    ax_d.set_title(
        f"{plan.strategy}: {len(plan.trainable_blocks)}/{L} blocks train "
        f"(dashed: backward boundary)"
    )
    fig.tight_layout()
    tmp = f"{png_path}.tmp-{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, png_path)
    return png_path
