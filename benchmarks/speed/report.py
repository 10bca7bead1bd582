"""speed-<mode>.json, .md and .png from the speed benchmark's rows."""

from __future__ import annotations

import os


def _ratios(rows: list[dict]) -> None:
    """ratio: lfdist over the plain loop in the same precision family and plan; plan/full: a
    plan's step over full fine-tuning's on the same run kind."""
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        anchor = _anchor(r, ok)
        r["ratio"] = r["median_step_s"] / anchor["median_step_s"] if anchor else None
        full = next((f for f in ok if f["run"] == r["run"] and f["plan"] == "full"), None)
        r["plan_over_full"] = r["median_step_s"] / full["median_step_s"] if full else None


def _anchor(row: dict, rows: list[dict]) -> dict | None:
    if row["run"].startswith("plain"):
        return row
    # lfdist's bf16-mixed is compared with the autocast loop, fp32 with fp32, pure with pure
    want = {"bf16-mixed": "plain autocast", "bf16": "plain bf16", "fp32": "plain fp32"}
    label = want.get(row.get("precision"))
    return next((r for r in rows if r["run"] == label and r["plan"] == row["plan"]), None)


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown(rows: list[dict], settings: dict) -> str:
    lines = [
        f"Model {settings['model']}, weights in {settings['dtype']}, micro-batch "
        f"{settings['batch']} x {settings['seq']} tokens, {settings['steps']} steps, median "
        f"after the first {settings['skip']}; final loss: mean of the last {settings['last']}.\n",
        "| plan | run | precision | median step (s) | vs plain loop | plan/full (predicted "
        "FLOPs) | tokens/s | MFU | peak GiB | predicted GiB | final loss |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['plan']} | {r['run']} | failed: {r['error']} ||||||||")
            continue
        frac = (r.get("predicted") or {}).get("flops_fraction")
        lines.append(
            f"| {r['plan']} | {r['run']} | {r['precision']} | {r['median_step_s']:.4f} | "
            f"{_fmt(r['ratio'], '.2f')} | {_fmt(r['plan_over_full'], '.2f')} "
            f"({_fmt(frac, '.2f')}) | {r['tokens_per_s']:.0f} | {_fmt(r['mfu'], '.1%')} | "
            f"{_fmt(r['peak_gib'], '.2f')} | {_fmt(r['predicted_gib'], '.2f')} | "
            f"{r['final_loss']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    from matplotlib.figure import Figure

    ok = [r for r in rows if "error" not in r]
    runs = list(dict.fromkeys(r["run"] for r in ok))
    plans = list(dict.fromkeys(r["plan"] for r in ok))
    fig = Figure(figsize=(8, 3.5))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(plans))
    for j, plan in enumerate(plans):
        ys = [next((r["median_step_s"] for r in ok if (r["run"], r["plan"]) == (run, plan)), 0) for run in runs]  # fmt: skip
        ax.bar([i + j * width for i in range(len(runs))], ys, width, label=plan)
    ax.set_xticks([i + width * (len(plans) - 1) / 2 for i in range(len(runs))], runs, rotation=20)
    ax.set_ylabel("median step (s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(rows: list[dict], mode: str, settings_tuple, out_dir: str) -> None:
    from benchmarks.speed.run import LAST, SKIP
    from lfdist.bench.gpu_table import card
    from lfdist.bench.record import write_result

    model, dtype, batch, seq, steps, _ = settings_tuple
    params = model["num_hidden_layers"], model["hidden_size"]
    settings = dict(
        model=f"generated Llama ({params[0]} blocks, hidden {params[1]})", dtype=dtype,
        batch=batch, seq=seq, steps=steps, skip=SKIP, last=LAST,
    )  # fmt: skip
    _ratios(rows)
    result = {"mode": mode, "card": card(), "settings": settings, "rows": rows}
    name = f"speed-{mode}"
    write_result(out_dir, name, result, markdown(rows, settings))
    try:
        plot(rows, os.path.join(out_dir, f"{name}.png"))
    except ImportError:  # matplotlib absent (a bare GPU image): JSON and Markdown only
        pass
