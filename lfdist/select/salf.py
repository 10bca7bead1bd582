"""`salf`: semantic-aware layer freezing (Gu, Aleti, Chen, Zhang; arXiv 2406.11753).

The paper's derivation is not public; this is lfdist's documented reconstruction
(docs/strategies.md). k is the number of frozen bottom blocks, 0..L-1; blocks k..L-1 train.

Part 1, estimator `trace` (forward only): the gain curve from the deviation trace d_0..d_L,
    G(k) = (D_k - d_L) / (D_0 - d_L),   D_k = max_{j >= k} d_j,
the share of the trace's fall from latent space k to the output that the trainable blocks
carry (the running max keeps G non-increasing on bumpy traces). A trace that does not fall
carries no information, and G falls back to the uniform share (L - k) / L.
Part 2, the decision: `target` (largest k with G(k) >= (1 - epsilon) G(0)), `budget` (best
G(k) among plans inside the budget), `ratio` (argmax G(k) / C(k), C = FLOPs fraction).
k = L-1 (one block) is never picked unless the budget leaves nothing else.
"""

from __future__ import annotations

from lfdist.errors import UserError
from lfdist.registry import register_strategy
from lfdist.select.base import Choice, Context, frozen_prefix
from lfdist.select.budget import infeasible

ESTIMATORS = ("trace", "pilot")
DECISIONS = ("target", "budget", "ratio")


def trace_gain(d: list[float]) -> tuple[list[float], bool]:
    """(G(0..L-1), whether the uniform fallback was used)."""
    L = len(d) - 1
    env = [max(d[k:]) for k in range(L)]
    drop = env[0] - d[L] if L else 0.0
    if not drop > 1e-9 * max(1.0, abs(d[L])):
        return [(L - k) / L for k in range(L)], True
    return [max(0.0, (e - d[L]) / drop) for e in env], False


def chord_gap(d: list[float]) -> list[float]:
    """d_l minus the chord from d_0 to d_L: the knee is where the trace sits highest above it."""
    L = len(d) - 1
    return [d[i] - (d[0] + (d[L] - d[0]) * i / L) for i in range(L + 1)] if L else [0.0]


def _argmax_last(values: list[float], ks: list[int]) -> int:
    """The k with the largest value; ties go to the largest k (the cheapest plan)."""
    return max(ks, key=lambda k: (values[k], k))


def decide(
    decision: str, gain: list[float], cost: list[float], feasible: list[bool], epsilon: float
) -> int:
    L = len(gain)
    usual = list(range(max(1, L - 1)))  # k = L-1 only when L == 1 or a budget forces it
    if decision == "target":
        return max(k for k in usual if gain[k] >= (1 - epsilon) * gain[0])
    if decision == "ratio":
        return _argmax_last([g / c for g, c in zip(gain, cost)], usual)
    ok = [k for k in usual if feasible[k]] or [k for k in range(L) if feasible[k]]
    return _argmax_last(gain, ok)


@register_strategy("salf")
def salf(
    ctx: Context, estimator: str = "trace", decision: str = "target", epsilon: float = 0.02
) -> Choice:
    if estimator not in ESTIMATORS:
        raise UserError(
            f"salf estimator={estimator!r} is unknown; use one of {', '.join(ESTIMATORS)}"
        )
    if estimator == "pilot":
        raise UserError(
            "salf estimator=pilot needs pilot fine-tunes, which this build does not run yet; "
            "use estimator=trace"
        )
    if decision not in DECISIONS:
        raise UserError(f"salf decision={decision!r} is unknown; use one of {', '.join(DECISIONS)}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= epsilon < 1:
        raise UserError(f"salf epsilon={epsilon!r} must be a number in [0, 1)")
    if decision == "budget" and not ctx.limits:
        raise UserError(
            "salf decision=budget needs a budget; add one such as flops=0.5 or gib=40, "
            "or use decision=target"
        )
    L = ctx.n_blocks
    d = list(ctx.probe.deviation)
    gain, fallback = trace_gain(d)
    plans = [frozen_prefix(L, k) for k in range(L)]
    cost = [ctx.predict(p)["flops_fraction"] for p in plans]
    feasible = [ctx.fits(p) for p in plans] if decision == "budget" else [True] * L
    if not any(feasible):
        raise infeasible(ctx, plans[-1])
    k = decide(decision, gain, cost, feasible, float(epsilon))
    gap = chord_gap(d)
    scores = {
        "deviation": d,
        "gain": gain,
        "cost": cost,
        "chord_gap": gap,
        "knee": max(range(len(gap)), key=lambda i: gap[i]),
        "split": k,
    }
    if fallback:
        scores["fallback"] = "uniform gain: the deviation trace does not fall"
    return Choice(plans[k], list(range(L - 1, k - 1, -1)), scores=scores, block_scores=gain)
