"""The GPU check's report: the card it ran on and the predicted-next-to-measured table."""

from __future__ import annotations

from typing import Any


def card() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu"}
    props = torch.cuda.get_device_properties(0)
    return {
        "device": props.name,
        "total_memory_gib": props.total_memory / 2**30,
        "capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "driver": _driver(),
    }


def _driver() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (
        out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    )


def _unit(tiny: bool) -> tuple[str, int]:
    return ("MiB", 2**20) if tiny else ("GiB", 2**30)


def markdown(table: list[dict[str, Any]], tiny: bool) -> str:
    name, div = _unit(tiny)

    def size(x) -> str:
        return "-" if x is None else f"{x / div:.3f}"

    skipped = [r for r in table if "skipped" in r]
    table = [r for r in table if "skipped" not in r]
    kind = table[0]["peak_kind"] if table else ""
    lines = [
        (
            "**CPU `--tiny` run: a smoke test of the script, not GPU numbers.** "
            if tiny
            else "**Measured on the GPU named above.** "
        )
        + f"Each row: one process, bf16, engine `single`, AdamW (foreach=False); measured = "
        f"tensors walked (params, grads, AdamW states) and saved-tensor hooks (activations, "
        f"runs without checkpointing); peak = {kind}; predicted = lfdist.cost. {name}.",
        "",
        "| model | plan | AC | tokens | params pred / meas | grads pred / meas | "
        "optimizer pred / meas | activations pred / meas | total pred | peak meas | "
        "peak / pred | step s (median) | step vs full: meas / pred FLOPs |",
        "|---|---|---|---:|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in table:
        same = (r["model"], "full", r["activation_checkpointing"])
        full = next(
            (f for f in table if (f["model"], f["plan"], f["activation_checkpointing"]) == same),
            None,
        )
        pr, me = r["predicted"], r["measured"]
        vs_full = "-" if full is None else f"{r['step_s_median'] / full['step_s_median']:.2f}"
        pair = " | ".join(
            f"{size(pr[k])} / {size(me[k])}"
            for k in ("params", "grads", "optimizer", "activations")
        )
        lines.append(
            f"| {r['model']} | {r['plan']} ({r['trainable_blocks']}/{r['n_blocks']}) | "
            f"{'on' if r['activation_checkpointing'] else 'off'} | "
            f"{r['batch_size']}x{r['seq_len']} | {pair} | {size(pr['total'])} | "
            f"{size(r['peak_bytes'])} | {r['peak_bytes'] / pr['total']:.2f} | "
            f"{r['step_s_median']:.4f} | {vs_full} / "
            f"{r['predicted_flops_fraction']:.2f} |"
        )
    lines += [f"\nSkipped {r['model']}: {r['skipped']}" for r in skipped]
    return "\n".join(lines)
