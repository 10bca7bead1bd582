"""Plain-text summaries of training metrics and of plan-versus-full savings."""

from __future__ import annotations

import statistics

from lfdist.plan import head_treatment


def _median_step(metrics: dict) -> float:
    times = metrics["step_times"][1:] or metrics["step_times"]  # the first step warms up
    return statistics.median(times)


def _rank0(metrics: dict, key: str) -> int:
    return metrics["per_rank"][0]["after_step"][key]


def train_summary(metrics: dict) -> str:
    losses = list(metrics["losses"].values())
    lines = [
        f"engine {metrics['engine']} x{metrics['world_size']}: {len(losses)} steps, "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, median step {_median_step(metrics):.3f}s",
        f"trainable {metrics['params']['trainable']:,} of "
        f"{metrics['params']['trainable'] + metrics['params']['frozen']:,} parameters; "
        f"backward reached blocks {_ranges(metrics['per_rank'][0].get('backward_blocks', []))}",
    ]
    memory = _memory_line(metrics)
    if memory:
        lines.append(memory)
    modules = metrics["plan"].get("modules")
    if modules:  # what trains outside the blocks (a tied head does not, with frozen embeddings)
        groups = ", ".join(f"{g} {t}" for g, t in modules.items() if g != "head")
        lines.append(f"modules: {groups}; {head_treatment(modules)}")
    if metrics.get("eval"):
        ev, before = metrics["eval"], metrics.get("eval_before")
        key = "perplexity" if "perplexity" in ev else "accuracy"
        was = f" (before training {before[key]:.3f})" if before else ""
        lines.append(
            f"held-out loss {ev['loss']:.4f}, {key} {ev[key]:.3f}{was} ({ev['examples']} examples)"
        )
    return "\n".join(lines)


def _memory_line(metrics: dict) -> str | None:
    """The run's precision and its measured peak next to the cost model's prediction for it."""
    prec, pred = metrics.get("precision"), metrics.get("predicted_run") or {}
    if not prec:
        return None
    line = f"precision {prec['name']}"
    if prec["trainable"] != prec["frozen"]:
        line += f" ({prec['trainable']} trainable, {prec['frozen']} frozen parameters)"
    peak = metrics["per_rank"][0].get("memory", {}).get("cuda_max_allocated")
    if "gib_per_rank" in pred:
        line += f"; predicted {pred['gib_per_rank']:.3g} GiB per rank"
        if peak is not None:
            line += f", measured peak {peak / 2**30:.3g} GiB (cuda max_memory_allocated)"
    return line


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    return f"{xs[0]}..{xs[-1]}" if xs == list(range(xs[0], xs[-1] + 1)) else ",".join(map(str, xs))


def savings_table(plan_m: dict, full_m: dict) -> str:
    """Measured side by side in one run: the plan against full fine-tuning, same engine."""
    rows = [
        ("trainable parameters", plan_m["params"]["trainable"], full_m["params"]["trainable"]),
        (
            "optimizer-state elements (rank 0)",
            _rank0(plan_m, "optimizer_state_elements"),
            _rank0(full_m, "optimizer_state_elements"),
        ),
        (
            "gradient elements (rank 0)",
            plan_m["per_rank"][0]["after_backward"]["grad_elements"],
            full_m["per_rank"][0]["after_backward"]["grad_elements"],
        ),
        ("params+grads+optimizer bytes (rank 0)", _state_bytes(plan_m), _state_bytes(full_m)),
        ("peak memory bytes (rank 0)", _peak(plan_m), _peak(full_m)),
        ("median step seconds", _median_step(plan_m), _median_step(full_m)),
    ]
    if plan_m.get("eval") and full_m.get("eval"):
        key = "perplexity" if "perplexity" in plan_m["eval"] else "accuracy"
        rows.append((f"held-out {key}", plan_m["eval"][key], full_m["eval"][key]))
    width = max(len(r[0]) for r in rows)
    note = (
        "(peak memory is CUDA max_memory_allocated)"
        if "cuda_max_allocated" in plan_m["per_rank"][0]["memory"]
        else "(peak memory is the process peak RSS: Python, libraries and data included)"
    )
    out = [f"{'measured':<{width}}  {'plan':>14}  {'full':>14}  {'plan/full':>9}"]
    for name, a, b in rows:
        ratio = a / b if b else float("nan")
        fmt = (lambda v: f"{v:14.4f}") if isinstance(a, float) else (lambda v: f"{v:14,}")
        out.append(f"{name:<{width}}  {fmt(a)}  {fmt(b)}  {ratio:9.3f}")
    predicted = plan_m["plan"].get("predicted") or {}
    if "flops_fraction" in predicted:
        out.append(
            f"predicted training FLOPs plan/full: {predicted['flops_fraction']:.3f} (cost model)"
        )
    out.append(note)
    return "\n".join(out)


def _state_bytes(m: dict) -> int:
    """Training state one rank holds at its peak: parameters, gradients, optimizer states."""
    r = m["per_rank"][0]
    return (
        r["after_step"].get("param_bytes", 0)
        + r["after_backward"].get("grad_bytes", 0)
        + r["after_step"].get("optimizer_state_bytes", 0)
    )


def _peak(m: dict) -> int:
    mem = m["per_rank"][0]["memory"]
    return mem.get("cuda_max_allocated", mem.get("peak_rss", 0))


def run_summary(result: dict) -> str:
    lines = [f"plan: {result['plan']}", train_summary(result["train"])]
    if result.get("full_same_as_plan"):
        lines += [
            "",
            "full fine-tuning: the plan trains every block, so it IS full fine-tuning; no "
            "second run (savings: none, quality: the same)",
        ]
    if result.get("full"):
        lines += [
            "",
            "full fine-tuning (same engine, steps, data):",
            train_summary(result["full"]),
            "",
            savings_table(result["train"], result["full"]),
        ]
    return "\n".join(lines)
