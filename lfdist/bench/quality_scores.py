"""Selection-quality scores of SPEC 6, pure functions of the oracle's per-split summaries.

Quality is in the user's metric: accuracy points (higher is better) for classifiers,
perplexity (lower is better) for language models. Tolerance: 1 accuracy point, or 1% of the
perplexity of full fine-tuning (k = 0). `splits` maps k (frozen bottom blocks) to a summary
with `mean`, `std` (between seeds) and `step_s` (measured median seconds per step).
"""

from __future__ import annotations

TOLERANCE = {"classify": 1.0, "lm": 0.01}


def shortfall(task: str, ref: float, x: float) -> float:
    """How much worse x is than ref: accuracy points, or percent of ref's perplexity."""
    return ref - x if task == "classify" else 100.0 * (x / ref - 1.0)


def within(task: str, ref: float, x: float, tolerance: float | None = None) -> bool:
    tol = TOLERANCE[task] if tolerance is None else tolerance
    if task == "classify":
        return x >= ref - tol - 1e-9
    return x <= ref * (1.0 + tol) + 1e-12


def k_tol(task: str, splits: dict[int, dict], tolerance: float | None = None) -> int:
    """The largest k whose mean quality is within the tolerance of k = 0's."""
    ref = splits[0]["mean"]
    return max(k for k, s in splits.items() if within(task, ref, s["mean"], tolerance))


def cheapest_score(
    task: str, splits: dict[int, dict], pick: int, oracle_k: int, cost: str = "step_s"
) -> dict:
    """Score (a): a pick above k_tol loses quality (its shortfall against k = 0); a pick below
    k_tol wastes time (its measured step time over k_tol's). `saved_share`: the share of the
    step time k_tol saves against k = 0 that the pick saves too. `cost`: the summary key
    that measures cost (step_s measured, or flops predicted)."""
    base, tol_s, pick_s = (splits[k][cost] for k in (0, oracle_k, pick))
    out = {
        "pick": pick,
        "k_tol": oracle_k,
        "verdict": "exact" if pick == oracle_k else ("too deep" if pick > oracle_k else "shallow"),
        "shortfall": max(0.0, shortfall(task, splits[0]["mean"], splits[pick]["mean"])),
        "wasted_time": max(0.0, pick_s / tol_s - 1.0) if pick < oracle_k else 0.0,
        "saved_share": (base - pick_s) / (base - tol_s) if base != tol_s else None,
    }
    if pick <= oracle_k:
        out["shortfall"] = 0.0  # within tolerance by the oracle's own verdict
    return out


def best_within(task: str, splits: dict[int, dict], n_blocks: int, trainable: int) -> int:
    """The oracle split training at most `trainable` blocks with the best mean quality."""
    fits = [k for k in splits if n_blocks - k <= trainable]
    sign = 1.0 if task == "classify" else -1.0
    return max(fits, key=lambda k: (sign * splits[k]["mean"], k))


def separation(task: str, splits: dict[int, dict]) -> list[dict]:
    """Per split: its gap to full fine-tuning against the spread between seeds. A gap counts as
    resolved when it exceeds the sum of the two splits' standard deviations."""
    ref = splits[0]
    rows = []
    for k in sorted(splits):
        s = splits[k]
        gap = shortfall(task, ref["mean"], s["mean"])
        noise = ref["std"] + s["std"]
        if task == "lm":
            noise = 100.0 * noise / ref["mean"]  # in percent, like the gap
        rows.append({"k": k, "gap": gap, "spread": noise, "resolved": abs(gap) > noise})
    return rows


def estimator_label(name: str, e: dict) -> str:
    """The pick's name in the scores: in budget unless the estimator's record says over."""
    return f"salf: {name}" if e.get("over_budget") else f"salf: {name} (in budget)"
