"""`salf`: semantic-aware layer freezing (Gu, Aleti, Chen, Zhang; arXiv 2406.11753).

The paper's derivation is not public; this is lfdist's documented reconstruction
(docs/strategies.md). k is the number of frozen bottom blocks, 0..L-1; blocks k..L-1 train.

Part 1, the gain curve G(k), from one of two estimators:
- `pilot` (the scaling-law reading; default when the probe holds pilot fine-tunes): pilots of
  the top n blocks at a few depths measure the held-out loss reduction g_n; a power law
  G(n) = A·n^beta (beta > 0) is fitted by least squares in log space, beta shrunk toward the
  trace's own log-log slope in proportion to the pilots' noise, and G(k) = A·(L - k)^beta.
- `trace` (forward only): from the deviation trace d_0..d_L,
    G(k) = (D_k - d_L) / (D_0 - d_L),   D_k = max_{j >= k} d_j,
  the share of the trace's fall from latent space k to the output that the trainable blocks
  carry (the running max keeps G non-increasing on bumpy traces). A trace that does not fall
  carries no information, and G falls back to the uniform share (L - k) / L.
Part 2, the decision: `target` (largest k with G(k) >= (1 - epsilon) G(0)), `budget` (best
G(k) among plans inside the budget), `ratio` (argmax G(k) / C(k), C = FLOPs fraction).
k = L-1 (one block) is never picked unless the budget leaves nothing else.
"""

from __future__ import annotations

import math

from lfdist.errors import UserError
from lfdist.registry import register_strategy
from lfdist.select.base import Choice, Context, frozen_prefix
from lfdist.select.budget import infeasible

ESTIMATORS = ("trace", "pilot")
DECISIONS = ("target", "budget", "ratio")
PRIOR_SD = 0.5  # spread of the trace-shape prior on beta
SIGMA2_TWO_POINTS = 0.05  # log-gain noise assumed when two pilots leave no residual to measure it
SIGMA2_FLOOR = 1e-6
BETA_MIN = 1e-3  # beta > 0: a deeper pilot never predicts less gain


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


def _loglog_slope(xs: list[float], ys: list[float]) -> tuple[float, float, float, float]:
    """Least squares of log y on log x: (slope, intercept, residual sum of squares, Sxx)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    slope = sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sxx if sxx > 0 else 0.0
    rss = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(lx, ly))
    return slope, my - slope * mx, rss, sxx


def trace_slope(d: list[float]) -> float | None:
    """The trace's shape as a power law in n = L - k: log-log slope of the trace gain, or None
    when the trace is uninformative (it does not fall, or fewer than 2 positive points)."""
    gain, fallback = trace_gain(d)
    L = len(gain)
    pts = [(n, gain[L - n]) for n in range(1, L + 1) if gain[L - n] > 0]
    if fallback or len(pts) < 2:
        return None
    return max(BETA_MIN, _loglog_slope([n for n, _ in pts], [g for _, g in pts])[0])


def fit_power_law(
    depths: list[int], gains: list[float], prior_beta: float | None, prior_sd: float | None
) -> dict:
    """G(n) = A·n^beta through the pilots with a positive gain.

    Least squares in log space; with a prior, beta is the precision-weighted mean of the free
    fit (precision Sxx / sigma^2, sigma^2 the residual variance, or SIGMA2_TWO_POINTS when two
    pilots leave no residual) and the prior (precision 1 / prior_sd^2): clean pilots keep their
    own slope, noisy ones lean on the trace's shape. beta is kept > 0.
    """
    pts = [(n, g) for n, g in zip(depths, gains) if g > 0]
    fit = {"points": len(pts), "beta_prior": prior_beta, "prior_sd": prior_sd}
    if not pts:
        return {**fit, "A": None, "beta": None}
    xs, ys = [n for n, _ in pts], [g for _, g in pts]
    use_prior = prior_beta is not None and prior_sd is not None and prior_sd > 0
    if len({*xs}) < 2:  # one depth: the slope can only come from the prior
        beta_free, sigma2, beta = None, None, prior_beta if use_prior else 1.0
    else:
        beta_free, _, rss, sxx = _loglog_slope(xs, ys)
        sigma2 = max(rss / (len(xs) - 2), SIGMA2_FLOOR) if len(xs) > 2 else SIGMA2_TWO_POINTS
        beta = beta_free
        if use_prior:
            w_data, w_prior = sxx / sigma2, 1.0 / prior_sd**2
            beta = (w_data * beta_free + w_prior * prior_beta) / (w_data + w_prior)
    beta = max(beta, BETA_MIN)
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    a = sum(ly) / len(ly) - beta * sum(lx) / len(lx)  # the intercept given beta
    return {**fit, "A": math.exp(a), "beta": beta, "beta_free": beta_free, "sigma2": sigma2}


def _pilot_gain(ctx: Context, d: list[float], prior_sd: float | None) -> tuple[list[float], dict]:
    pilot = ctx.probe.curves["pilot"]
    L = ctx.n_blocks
    fit = fit_power_law(pilot["depths"], pilot["gain"], trace_slope(d), prior_sd)
    fit.update(depths=list(pilot["depths"]), measured=list(pilot["gain"]))
    if fit["A"] is None:
        return [], fit
    return [fit["A"] * (L - k) ** fit["beta"] for k in range(L)], fit


def pilot_cost(ctx: Context, k: int, run_steps: int | None) -> dict:
    """The pilots' FLOPs as full fine-tuning steps of the costed run, and as a fraction of the
    run that trains blocks k.. for `run_steps` steps (None when the step count is unknown)."""
    flops = float(ctx.probe.curves["pilot"].get("flops_total") or 0.0)
    world = int(ctx.cost.get("world_size", 1))
    p = ctx.predict(frozen_prefix(ctx.n_blocks, k))
    out = {
        "pilot_flops": flops,
        "pilot_cost_full_steps": flops / (world * p["flops_full_per_step"]),
    }
    steps = run_steps or ctx.probe.curves["pilot"].get("run_steps")
    out["run_steps"] = steps
    out["pilot_cost_fraction"] = flops / (steps * world * p["flops_per_step"]) if steps else None
    return out


def _check_options(ctx: Context, estimator, decision, epsilon, prior_sd, run_steps) -> str:
    has_pilot = "pilot" in ctx.probe.curves
    if estimator is None:
        estimator = "pilot" if has_pilot else "trace"
    if estimator not in ESTIMATORS:
        raise UserError(
            f"salf estimator={estimator!r} is unknown; use one of {', '.join(ESTIMATORS)}"
        )
    if estimator == "pilot" and not has_pilot:
        raise UserError(
            "salf estimator=pilot needs pilot fine-tunes the probe did not run; rerun "
            "`lfdist probe` with probe.pilot_steps=20, or use estimator=trace"
        )
    if decision not in DECISIONS:
        raise UserError(f"salf decision={decision!r} is unknown; use one of {', '.join(DECISIONS)}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= epsilon < 1:
        raise UserError(f"salf epsilon={epsilon!r} must be a number in [0, 1)")
    if prior_sd is not None and (
        isinstance(prior_sd, bool) or not isinstance(prior_sd, (int, float)) or not prior_sd > 0
    ):
        raise UserError(f"salf prior_sd={prior_sd!r} must be a number > 0, or null for no prior")
    if run_steps is not None and (
        isinstance(run_steps, bool) or not isinstance(run_steps, int) or run_steps < 1
    ):
        raise UserError(f"salf run_steps={run_steps!r} must be a whole number of steps >= 1")
    if decision == "budget" and not ctx.limits:
        raise UserError(
            "salf decision=budget needs a budget; add one such as flops=0.5 or gib=40, "
            "or use decision=target"
        )
    return estimator


@register_strategy("salf")
def salf(
    ctx: Context,
    estimator: str | None = None,
    decision: str = "target",
    epsilon: float = 0.02,
    prior_sd: float | None = PRIOR_SD,
    run_steps: int | None = None,
) -> Choice:
    """estimator: pilot | trace (default: pilot when the probe holds pilots). prior_sd: spread of
    the trace-shape prior on beta (null: none). run_steps: the run's steps, for the pilot cost
    fraction (default: the value the probe recorded)."""
    estimator = _check_options(ctx, estimator, decision, epsilon, prior_sd, run_steps)
    L = ctx.n_blocks
    d = list(ctx.probe.deviation)
    scores: dict = {"deviation": d}
    gain, fallback = trace_gain(d)
    if estimator == "pilot":
        pilot_gain, fit = _pilot_gain(ctx, d, prior_sd)
        scores["pilot"] = fit
        if pilot_gain:
            gain, fallback = pilot_gain, False
        else:
            scores["fallback"] = "trace gain: no pilot reduced the held-out loss"
    plans = [frozen_prefix(L, k) for k in range(L)]
    cost = [ctx.predict(p)["flops_fraction"] for p in plans]
    feasible = [ctx.fits(p) for p in plans] if decision == "budget" else [True] * L
    if not any(feasible):
        raise infeasible(ctx, plans[-1])
    k = decide(decision, gain, cost, feasible, float(epsilon))
    gap = chord_gap(d)
    scores.update(
        estimator=estimator,
        gain=gain,
        cost=cost,
        chord_gap=gap,
        knee=max(range(len(gap)), key=lambda i: gap[i]),
        split=k,
    )
    if estimator == "pilot":
        scores.update(pilot_cost(ctx, k, run_steps))
    if fallback:
        scores["fallback"] = "uniform gain: the deviation trace does not fall"
    return Choice(
        plans[k],
        list(range(L - 1, k - 1, -1)),
        scores=scores,
        block_scores=gain,
        options={"estimator": estimator},
    )
