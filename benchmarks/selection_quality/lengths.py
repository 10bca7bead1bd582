"""How the oracle and salf's picks move with run length: the short runs (quality.json here) next
to the long ones (long/quality.json), per model and data. Writes lengths.md and lengths.json.

    python benchmarks/selection_quality/lengths.py

Reads only the two committed result files; trains nothing.
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = (os.path.join(HERE, "quality.json"), os.path.join(HERE, "long", "quality.json"))


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        result = json.load(f)
    rows = []
    for r in result["tasks"]:
        t = r["task"]
        est = r.get("estimators") or {}
        rows.append(
            {
                "pair": f"{t['model']} on {t['data']}",
                "task": t["name"],
                "steps": t["steps"],
                "metric": r["metric"],
                "k_tol": r["k_tol"],
                "gaps": {row["k"]: row["gap"] for row in r["separation"]},
                "resolved": {row["k"]: row["resolved"] for row in r["separation"]},
                "full": r["oracle"]["0"]["mean"],
                "salf_default": r["salf"]["k"],
                "salf_estimator": r["salf"]["estimator"],
                "estimators": {
                    name: e.get("k", f"not run: {e.get('skipped')}")
                    for name, e in est.items()
                    if not e.get("over_budget")
                },
                # scored outside the budget where it allows none (e.g. halving's 8-step rounds)
                "over_budget": {name: e["k"] for name, e in est.items() if e.get("over_budget")},
                "source": os.path.relpath(path, HERE),
            }
        )
    return rows


def main() -> str:
    rows = [row for path in SOURCES if os.path.isfile(path) for row in _rows(path)]
    rows.sort(key=lambda r: (r["pair"], r["steps"]))
    unit = {"accuracy": "points", "perplexity": "% of perplexity"}
    lines = [
        "# The oracle and salf's picks at two run lengths",
        "",
        "From `quality.json` (short runs) and `long/quality.json` (the same model, data, batch, "
        "lr and seeds, longer runs, warm-up 10% of the run); written by `lengths.py`. Gap: how "
        "much worse the split's mean quality is than full fine-tuning's (k = 0): accuracy "
        "points lost, or % of perplexity gained (negative: better); * = not resolved by the "
        "spread between seeds.",
        "",
        "| model and data | steps | full (k = 0) | gap per split k | oracle k_tol | salf default "
        "(estimator) | trace | pilot | halving |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gaps = ", ".join(
            f"{k}: {g:+.2f}{'' if r['resolved'][k] else '*'}"
            for k, g in sorted(r["gaps"].items())
            if k
        )
        e = r["estimators"]

        def shown(name: str, e=e) -> str:
            v = e.get(name, "-")
            return str(v) if isinstance(v, int) else "-" if v == "-" else "not run"

        halving = shown("halving") + "".join(
            f"; {name}: {k}" for name, k in r["over_budget"].items() if name.startswith("halving")
        )
        lines.append(
            f"| {r['pair']} | {r['steps']} | {r['full']:.2f} | {gaps} ({unit[r['metric']]}) "
            f"| {r['k_tol']} | {r['salf_default']} ({r['salf_estimator']}) | {shown('trace')} "
            f"| {shown('pilot')} | {halving} |"
        )
    lines += [
        "",
        "Not run: the estimator's pilots did not fit the 5% budget of that run (the task's "
        "quality.md says why, in the probe's words).",
        "",
    ]
    md = os.path.join(HERE, "lengths.md")
    with open(md, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(HERE, "lengths.json"), "w") as f:
        json.dump(rows, f, indent=1, default=str)
    return md


if __name__ == "__main__":
    print(main())
