"""Markdown tables and the PNG of `lfdist bench quality` (quality against measured step time)."""

from __future__ import annotations

from lfdist.bench.quality_scores import estimator_label


def _q(task: str, x: float) -> str:
    return f"{x:.2f}" if task == "classify" else f"{x:.3f}"


def _unit(task: str) -> str:
    return "points" if task == "classify" else "% of perplexity"


def _task_md(r: dict) -> list[str]:
    t, task = r["task"], r["task"]["task"]
    metric = "accuracy (%)" if task == "classify" else "held-out perplexity"
    tol = "1 accuracy point" if task == "classify" else "1% of k = 0's perplexity"
    lines = [
        f"## {t['name']}: `{t['model']}` on `{t['data']}` ({task}, {r['n_blocks']} blocks)",
        "",
        f"Recipe: {t['steps']} steps, batch {t['batch']}, lr {t['lr']}, seq_len {t['seq_len']}, "
        f"seeds {r['seeds']}, {r['n_eval']} held-out examples; tolerance {tol}. Wall: "
        f"{r['wall'].get('trained_s', 0):.0f} s training and evaluating all runs (cached "
        f"across invocations), probe {r['wall']['probe_wall_s']:.0f} s; this invocation "
        f"{r['wall']['total_s']:.0f} s.",
        "",
        f"### Oracle: {metric} per split k (k bottom blocks frozen)",
        "",
        "| k | blocks trained | mean | std (seeds) | per seed | gap to k=0 | seed spread "
        "| resolved | step s | FLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    sep = {row["k"]: row for row in r["separation"]}
    for k, s in sorted(r["oracle"].items(), key=lambda kv: int(kv[0])):
        row = sep[int(k)]
        per = ", ".join(_q(task, x) for x in s["quality"])
        lines.append(
            f"| {k} | {r['n_blocks'] - int(k)} | {_q(task, s['mean'])} | {s['std']:.3f} | {per} "
            f"| {row['gap']:+.2f} | {row['spread']:.2f} | {'yes' if row['resolved'] else 'no'} "
            f"| {s['step_s']:.3f} | {s['flops']:.2f} |"
        )
    unresolved = [row["k"] for row in r["separation"] if row["k"] and not row["resolved"]]
    lines += [
        "",
        f"Gap and spread in {_unit(task)}; a gap is resolved when it exceeds the sum of the two "
        "splits' standard deviations between seeds. "
        + (
            f"Not resolved (the spread between seeds is larger than the difference): k = "
            f"{', '.join(map(str, unresolved))}."
            if unresolved
            else "Every split's gap to k = 0 exceeds the spread between seeds."
        ),
        "",
        f"**Oracle k_tol = {r['k_tol']}** (the largest k within the tolerance of k = 0).",
        "",
        "### (a) Cheapest split within tolerance",
        "",
        "| strategy | pick k | k_tol | verdict | quality shortfall | wasted step time (FLOPs) "
        "| share of k_tol's saving, time (FLOPs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s, c in r["cheapest"].items():
        # a pick deeper than k_tol saves more than k_tol by losing quality: no share to read
        too_deep = c["pick"] > c["k_tol"]
        share = "n/a" if c["saved_share"] is None or too_deep else f"{100 * c['saved_share']:.0f}%"
        if c.get("saved_share_flops") is not None and not too_deep:
            share += f" ({100 * c['saved_share_flops']:.0f}%)"
        lines.append(
            f"| {s} | {c['pick']} | {c['k_tol']} | {c['verdict']} | {c['shortfall']:.2f} "
            f"{_unit(task)} | {100 * c['wasted_time']:.0f}% "
            f"({100 * c.get('wasted_flops', 0.0):.0f}%) | {share} |"
        )
    if not r["at_budget"]:  # long runs: score (b) not trained (TaskSpec.at_budget)
        lines += ["", "### (b) Quality at equal trainable blocks: not run for this task"]
    lines += (
        []
        if not r["at_budget"]
        else [
            "",
            f"### (b) Quality at {r['budget_blocks']} trainable blocks",
            "",
            f"The best oracle split within that budget is k = {r['best_fit_k']}. Shortfall in "
            f"{_unit(task)} against it (negative: better than it).",
            "",
            "| strategy | blocks trained | mean | std | shortfall | step s | FLOPs |",
            "|---|---|---|---|---|---|---|",
        ]
    )
    ranked = sorted(
        r["at_budget"].items(), key=lambda kv: kv[1]["mean"] * (-1 if task == "classify" else 1)
    )
    for s, b in ranked:
        blocks = (
            "all (adapters)"
            if "lora" in b["treatments"]
            else ",".join(map(str, b["trained_blocks"]))
        )
        if s == "lisa":
            blocks = f"{len(b['trained_blocks'])} re-drawn every {b['options'].get('period')} steps"
        lines.append(
            f"| {s} | {blocks} | {_q(task, b['mean'])} | {b['std']:.3f} | "
            f"{b['shortfall_vs_best_fit']:+.2f} | {b['step_s']:.3f} | {b['flops']:.2f} |"
        )
    sa = r["salf"]
    cost = sa["cost"]
    frac = "n/a" if cost["fraction"] is None else f"{100 * cost['fraction']:.1f}%"
    lines += [
        "",
        f"### salf: k = {sa['k']}, estimator {sa['estimator']}",
        "",
        f"Pilot plan: {sa['pilot_plan'] or 'none'}. Probe forward {cost['probe_forward_s'] or 0:.1f}"
        f" s + pilots {cost['pilot_s'] or 0:.1f} s = {cost['salf_s']:.1f} s, {frac} of the run it "
        f"plans (measured wall time); the plan's own FLOPs fraction: "
        + ("n/a" if sa["plan_cost_fraction"] is None else f"{100 * sa['plan_cost_fraction']:.1f}%")
        + ".",
    ]
    if sa.get("predicted"):
        p = sa["predicted"]
        lines.append(
            f"Predicted {p['metric']}: pick {p['pick']:.4g} (interval "
            f"{p['pick_interval'][0]:.4g}-{p['pick_interval'][1]:.4g}), full {p['full']:.4g}."
        )
    sp = r.get("salf_pilot")
    if sp:
        frac = sp["plan_cost_fraction"]
        lines += [
            "",
            f"### salf's pilot estimator, outside the budget: k = {sp['k']}",
            "",
            f"{sp['pilot_plan']}; pilots took {sp['pilot_s'] or 0:.1f} s, "
            + ("n/a" if frac is None else f"{100 * frac:.1f}%")
            + " of the run it plans in FLOPs (the default probe sizes pilots to 5% and, on "
            "runs this short, skips them).",
        ]
        if sp.get("predicted"):
            p = sp["predicted"]
            per = ", ".join(f"{v:.4g}" for v in p["per_split"])
            lines.append(
                f"Predicted end-of-run {p['metric']} per split k = 0..: {per}; pick {p['pick']:.4g}"
                f" (interval {p['pick_interval'][0]:.4g}-{p['pick_interval'][1]:.4g}), full "
                f"{p['full']:.4g}."
            )
    lines += _estimators_md(r)
    for s, e in r["errors"].items():
        lines.append(f"- {s} not scored: {e}")
    return lines + [""]


def _estimators_md(r: dict) -> list[str]:
    """salf's estimators inside their budget: pick, cost (FLOPs and wall) and verdict."""
    est = r.get("estimators")
    if not est:
        return []
    lines = [
        "",
        f"### salf's estimators inside the 5% budget (oracle k_tol = {r['k_tol']}; over "
        "budget where the row says so)",
        "",
        "| estimator | pick k | verdict | cost, FLOPs of the run | cost, wall time of the run "
        "| what ran |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in est.items():
        if "k" not in e:
            lines.append(f"| {name} | - | not run | - | - | {e['skipped']} |")
            continue
        c = r["cheapest"].get(estimator_label(name, e), {})
        flops = "n/a" if e["plan_cost_fraction"] is None else f"{e['plan_cost_fraction']:.1%}"
        wall = "n/a" if e.get("wall_fraction") is None else f"{e['wall_fraction']:.1%}"
        lines.append(
            f"| {name} | {e['k']} | {c.get('verdict', '-')} | {flops} | {wall} "
            f"| {e['pilot_plan']} |"
        )
    lm = r["task"]["task"] == "lm"
    unit, scale = ("% perplexity", 100.0) if lm else (" accuracy points", 1.0)
    for name, e in est.items():
        h = e.get("halving")
        if not h:
            continue
        lines += [
            "",
            f"Rounds of {name} (held-out error per candidate k; k = 0 trains every block):",
            "",
        ]
        for rd in h["rounds"]:
            shown = ", ".join(f"k={k}: {x:.4f}" for k, x in zip(rd["candidates"], rd["errors"]))
            lines.append(f"- {rd['steps']} steps: {shown} ({rd['seconds']:.1f} s)")
        gaps = ", ".join(f"k={k}: {scale * g:+.2f}{unit}" for k, g in h["in_metric"].items())
        lines.append(f"- read at the run's {h['run_steps']} steps, gap to k = 0: {gaps}")
    return lines


def markdown(result: dict) -> str:
    lines = [
        "# Selection quality (`lfdist bench quality`)",
        "",
        "Step s: the median of each run's steps after the first, measured while that run ran. "
        "Runs ran minutes apart on a shared machine whose load changed, so a difference in "
        "step s between two plans can be load, not cost. FLOPs: training FLOPs per step as a "
        "fraction of full fine-tuning's (the cost model), the cost no load can blur.",
        "",
    ]
    for r in result["tasks"]:
        lines += _task_md(r)
    lines.append(f"Total wall time {result['wall_s']:.0f} s.")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    """Quality against cost, per task: predicted FLOPs fraction (top row, the cost no load
    can blur) and measured step time (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(2, n, figsize=(6.5 * n, 9.0), squeeze=False)
    for col, r in enumerate(results):
        for row, (cost, label) in enumerate(
            (
                ("flops", "training FLOPs per step (fraction of full fine-tuning)"),
                ("step_s", "measured step time (s), under changing load"),
            )
        ):
            _panel(axes[row][col], r, cost, label)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _panel(ax, r: dict, cost: str, label: str) -> None:
    task = r["task"]["task"]
    ks = sorted(r["oracle"], key=int)
    xs = [r["oracle"][k][cost] for k in ks]
    ys = [r["oracle"][k]["mean"] for k in ks]
    es = [r["oracle"][k]["std"] for k in ks]
    ax.errorbar(xs, ys, yerr=es, fmt="-o", color="0.5", ms=4, capsize=3, label="oracle split k")
    for k, x, y in zip(ks, xs, ys):
        ax.annotate(f"k={k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for i, (s, b) in enumerate(r["at_budget"].items()):
        ax.errorbar(
            b[cost],
            b["mean"],
            yerr=b["std"],
            fmt="*" if s == "salf" else "x",
            ms=10,
            capsize=2,
            color=f"C{i}",
            label=f"{s} ({len(b['trained_blocks'])} blocks)",
        )
    ax.axvline(r["oracle"][str(r["k_tol"])][cost], ls=":", color="k", lw=0.8)
    ax.set_xlabel(label)
    ax.set_ylabel("accuracy (%)" if task == "classify" else "held-out perplexity")
    ax.set_title(
        f"{r['task']['name']}: salf k={r['salf']['k']}, oracle k_tol={r['k_tol']} (dotted)",
        fontsize=9,
    )
    ax.legend(fontsize=7)
