"""`salf`: semantic-aware layer freezing (Gu, Aleti, Chen, Zhang; arXiv 2406.11753).

The paper's derivation is not public; this is lfdist's documented reconstruction
(docs/strategies.md). k is the number of frozen bottom blocks, 0..L-1; blocks k..L-1 train.

Part 1, what each split k is expected to achieve, from one of two estimators:
- `pilot` (default when the probe holds pilots): pilot fine-tunes of the top n blocks, sized
  to a share of the run's cost, measure held-out quality; the saturating scaling law
  l(n) = l_inf + B n^-alpha through them predicts the run's END quality of every split
  (lfdist.select.salf_fit), with an interval.
- `trace` (forward only): from the deviation trace d_0..d_L,
    G(k) = (D_k - d_L) / (D_0 - d_L),   D_k = max_{j >= k} d_j,
  the share of the trace's fall from latent space k to the output that the trainable blocks
  carry (the running max keeps G non-increasing on bumpy traces). A trace that does not fall
  carries no information, and G falls back to the uniform share (L - k) / L.
Part 2, the decision: `target` (pilot: the cheapest k whose predicted quality is within
`tolerance` of full fine-tuning's in the user's metric; trace: the largest k with
G(k) >= (1 - epsilon) G(0)), `budget` (the best predicted quality among plans inside the
budget), `ratio` (argmax gain / C(k), C = FLOPs fraction).
k = L-1 (one block) is never picked unless the budget leaves nothing else.
"""

from __future__ import annotations

import math

from lfdist.errors import UserError
from lfdist.probe.pilot_budget import INFORMATIVE_SHARE
from lfdist.select.base import Choice, Context, frozen_prefix
from lfdist.select.budget import infeasible
from lfdist.select.registry import register_strategy
from lfdist.select.salf_fit import Z, predict_quality
from lfdist.select.salf_halving import gap_within, pick

ESTIMATORS = ("trace", "pilot", "halving")
DECISIONS = ("target", "budget", "ratio")


def trace_gain(d: list[float], skip: list[int] = ()) -> tuple[list[float], bool]:
    """(G(0..L-1), whether the uniform fallback was used). `skip`: latent spaces that carry no
    information (constant across examples); the running max reads the others."""
    L = len(d) - 1
    env = [max(d[j] for j in range(k, L + 1) if j not in skip or j == L) for k in range(L)]
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


TOLERANCE = {"lm": 0.01, "classify": 1.0}  # 1% of perplexity; 1 accuracy point


def _metric(task: str) -> str:
    return "perplexity" if task == "lm" else "accuracy"


def to_metric(task: str, error: float) -> float:
    """An error on salf's scale (loss in nats, or 1 - accuracy) in the user's metric."""
    return math.exp(min(error, 50.0)) if task == "lm" else 1.0 - error


def within(task: str, error: float, full: float, tolerance: float) -> bool:
    """Whether `error` is within the tolerance of full fine-tuning's, in the user's metric:
    perplexity at most (1 + tolerance) times full's, or accuracy at most `tolerance` points below."""
    return gap_within(task, error - full, tolerance)


def interval(task: str, error: float, se: float) -> list[float]:
    lo, hi = sorted(to_metric(task, e) for e in (error - Z * se, error + Z * se))
    return [max(lo, 0.0), min(hi, 1.0)] if task == "classify" else [lo, hi]


def pilot_decide(
    task: str, errors: list[float], decision: str, gain: list[float], cost, feasible, tolerance
) -> int:
    """errors[k]: predicted end error of split k; the same rules as `decide`, `target` in the
    user's metric."""
    L = len(errors)
    if decision != "target":
        return decide(decision, gain, cost, feasible, 0.0)
    usual = list(range(max(1, L - 1)))
    return max(k for k in usual if within(task, errors[k], errors[0], tolerance))


def _pilot_scores(ctx: Context, run_steps: int | None) -> tuple[list[float], dict]:
    """Predicted end error per split k (index k) and the record for plan.scores."""
    pilot = ctx.probe.curves["pilot"]
    L = ctx.n_blocks
    pred = predict_quality(pilot, L, run_steps)
    errors = [pred["error"][L - k - 1] for k in range(L)]
    return errors, {**pred, "measured": pilot["errors"], "metric": pilot.get("metric")}


def _cost_fraction(
    ctx: Context, k: int, run_steps: int | None, record: str = "pilot", pilots: bool = True
) -> dict:
    """Probe + pilot (or halving) FLOPs as a fraction of the run that trains blocks k..
    (SPEC 2.1: < 5%); the probe's alone when `pilots` is False (the trace used none)."""
    pilot = ctx.probe.curves[record]
    steps = run_steps or pilot.get("run_steps")
    spent = float(pilot.get("probe_flops") or 0.0)
    spent += float(pilot.get("flops_total") or 0.0) if pilots else 0.0
    out = {
        "run_steps": steps,
        "run_steps_given": bool(run_steps),  # else the train.steps the probe was sized for
        "global_batch": pilot.get("global_batch"),
        "probe_pilot_flops": spent,
        "budget": pilot.get("budget"),
    }
    per_example = pilot.get("run_flops_per_example")  # per frozen split k, one example
    if steps and per_example:
        run = steps * int(pilot["global_batch"]) * per_example[k]
        out["cost_fraction"] = spent / run
    else:
        out["cost_fraction"] = None
    return out


def _halving_scores(ctx: Context, run_steps: int | None, tolerance: float) -> tuple[int, dict]:
    """(the pick, the record for plan.scores) from the probe's halving rounds."""
    record = ctx.probe.curves["halving"]
    task = ctx.probe.task
    steps = run_steps or record.get("run_steps") or record["lengths"][-1]
    k, gaps = pick(task, record["rounds"], steps, tolerance)
    return k, {
        "metric": _metric(task),
        "tolerance": tolerance,
        "halving": {
            "candidates": record["candidates"],
            "rounds": [
                {key: r[key] for key in ("steps", "candidates", "errors", "seconds", "flops")}
                for r in record["rounds"]
            ],
            "end_gaps": {str(c): g for c, g in sorted(gaps.items())},
            "in_metric": {str(c): _gap_in_metric(task, g) for c, g in sorted(gaps.items())},
            "run_steps": steps,
        },
        "pilot_plan": record.get("budget_note"),
    }


def _gap_in_metric(task: str, gap: float) -> float:
    """An error gap as the user reads it: relative perplexity (0.01 = 1%) or accuracy points."""
    return math.expm1(min(gap, 50.0)) if task == "lm" else 100.0 * gap


def _number(name: str, value, ok) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value)
    ):
        raise UserError(f"salf {name}={value!r} must be {ok.__doc__}")


def default_estimator(curves: dict, run_steps: int | None) -> tuple[str, str | None]:
    """(the estimator salf uses when none is asked for, why the trace decided where pilots ran):
    the pilots' own when they ran long enough to be read (the share the probe required of them,
    probe.pilot_min_share, INFORMATIVE_SHARE by default; pilots forced by probe.pilot_steps
    must reach it too), else the forward-only trace."""
    for name, ran in (("pilot", "errors"), ("halving", "rounds")):
        record = curves.get(name) or {}
        if not record.get(ran) or not record.get("lengths"):
            continue
        steps = run_steps or record.get("run_steps") or 0
        rounds = record.get("rounds")  # halving may stop before its planned last round
        longest = int(rounds[-1]["steps"] if rounds else record["lengths"][-1])
        share = float(record.get("min_share", INFORMATIVE_SHARE))  # what the probe required
        if longest >= share * steps:
            return name, None
        return "trace", (
            f"{name} pilots ran, but the longest was {longest} of the run's {steps} steps "
            f"({longest / steps:.1%}, under {share:.0%}); pilots that short measure "
            "how fast training starts, not where it ends"
        )
    return "trace", None


def _check_options(ctx: Context, estimator, decision, epsilon, tolerance, run_steps):
    pilot = ctx.probe.curves.get("pilot")
    has_pilot = bool(pilot) and "errors" in pilot
    halving = ctx.probe.curves.get("halving") or {}
    why = None
    if estimator is None:
        estimator, why = default_estimator(ctx.probe.curves, run_steps)
    if estimator not in ESTIMATORS:
        raise UserError(
            f"salf estimator={estimator!r} is unknown; use one of {', '.join(ESTIMATORS)}"
        )
    if estimator == "pilot" and not has_pilot:
        why = (pilot or {}).get("skipped") or "the probe did not run them"
        raise UserError(
            f"salf estimator=pilot needs pilot fine-tunes ({why}); rerun `lfdist probe` with "
            "probe.pilots=true (or a larger probe.pilot_budget), or use estimator=trace"
        )
    if estimator == "halving" and not halving.get("rounds"):
        why = halving.get("skipped") or "the probe did not run them"
        raise UserError(
            f"salf estimator=halving needs halving rounds ({why}); rerun `lfdist probe` with "
            "probe.pilots=true probe.pilot_kind=halving (or a larger probe.pilot_budget), or use "
            "estimator=trace"
        )
    if decision not in DECISIONS:
        raise UserError(f"salf decision={decision!r} is unknown; use one of {', '.join(DECISIONS)}")
    if estimator == "halving" and decision != "target":
        raise UserError(
            f"salf decision={decision} needs a quality estimate for every split; halving measures "
            "only its candidates: use estimator=trace or pilot, or decision=target"
        )

    def fraction(v):
        """a number in [0, 1)"""
        return 0 <= v < 1

    def non_negative(v):
        """a number >= 0 (relative for lm: 0.01 is 1%; accuracy points for classifiers)"""
        return v >= 0

    def whole(v):
        """a whole number of steps >= 1"""
        return isinstance(v, int) and v >= 1

    _number("epsilon", epsilon, fraction)
    _number("tolerance", tolerance, non_negative)
    _number("run_steps", run_steps, whole)
    if decision == "budget" and not ctx.limits:
        raise UserError(
            "salf decision=budget needs a budget; add one such as flops=0.5 or gib=40, "
            "or use decision=target"
        )
    return estimator, why


@register_strategy("salf")
def salf(
    ctx: Context,
    estimator: str | None = None,
    decision: str = "target",
    tolerance: float | None = None,
    epsilon: float = 0.02,
    run_steps: int | None = None,
) -> Choice:
    """estimator: pilot | halving | trace (default: the probe's pilots when they ran at least
    INFORMATIVE_SHARE of the run, else trace). tolerance (pilot, halving; target): relative
    perplexity for lm (default 0.01 = 1%), accuracy points for classifiers
    (default 1). epsilon (trace, target): share of the trace gain that may be lost. run_steps:
    the run's steps (default: what the probe recorded)."""
    estimator, why = _check_options(ctx, estimator, decision, epsilon, tolerance, run_steps)
    L = ctx.n_blocks
    task = ctx.probe.task
    d = list(ctx.probe.deviation)
    scores: dict = {"deviation": d, "estimator": estimator}
    plans = [frozen_prefix(L, k) for k in range(L)]
    cost = [ctx.predict(p)["flops_fraction"] for p in plans]
    feasible = [ctx.fits(p) for p in plans] if decision == "budget" else [True] * L
    if not any(feasible):
        raise infeasible(ctx, plans[-1])
    constant = [i for i in ctx.probe.curves.get("constant_spaces", []) if i < L]
    gain, fallback = trace_gain(d, constant)
    if estimator == "halving":
        tolerance = TOLERANCE[task] if tolerance is None else float(tolerance)
        k, record = _halving_scores(ctx, run_steps, tolerance)
        scores.update(record, **_cost_fraction(ctx, k, run_steps, "halving"))
    elif estimator == "pilot":
        tolerance = TOLERANCE[task] if tolerance is None else float(tolerance)
        errors, fit = _pilot_scores(ctx, run_steps)
        base = ctx.probe.curves["pilot"].get("base_error")
        gain = [(errors[-1] if base is None else base) - e for e in errors]
        fallback = False
        k = pilot_decide(task, errors, decision, gain, cost, feasible, tolerance)
        metric = _metric(task)
        scores.update(
            pilot=fit,
            metric=metric,
            tolerance=tolerance,
            predicted={
                "metric": metric,
                "pick": to_metric(task, errors[k]),
                "full": to_metric(task, errors[0]),
                "pick_interval": interval(task, errors[k], fit["se"]),
                "full_interval": interval(task, errors[0], fit["se"]),
                "per_split": [to_metric(task, e) for e in errors],
            },
            **_cost_fraction(ctx, k, run_steps),
            pilot_plan=ctx.probe.curves["pilot"].get("budget_note"),
        )
    else:
        k = decide(decision, gain, cost, feasible, float(epsilon))
        record = ctx.probe.curves.get("pilot") or {}
        if why:
            scores["pilots_not_read"] = why
        elif record.get("skipped"):
            scores["pilot_skipped"] = record["skipped"]
        if "probe_flops" in record:  # the probe's own cost, as sized for the pilots
            scores.update(_cost_fraction(ctx, k, run_steps, pilots=False))
    gap = chord_gap(d)
    scores.update(
        gain=gain,
        cost=cost,
        chord_gap=gap,
        knee=max(range(len(gap)), key=lambda i: gap[i]),
        split=k,
    )
    if fallback:
        scores["fallback"] = "uniform gain: the deviation trace does not fall"
    if constant:
        scores["constant_spaces"] = constant
    options = {"estimator": estimator}
    if estimator in ("pilot", "halving"):
        options["tolerance"] = tolerance
    return Choice(
        plans[k],
        list(range(L - 1, k - 1, -1)),
        scores=scores,
        block_scores=gain,
        options=options,
    )


def _cost_line(scores: dict, what: str) -> list[str]:
    if scores.get("cost_fraction") is None:
        return []
    run = "this run"
    if scores.get("run_steps") and scores.get("global_batch"):  # the run it was priced against
        run = f"the {scores['run_steps']}-step run at global batch {scores['global_batch']}"
        if scores.get("run_steps_given") is False:
            run += (
                " the probe was sized for (its train.steps; price your own run with "
                "select --option run_steps=N)"
            )
    line = f"salf {what} cost: {scores['cost_fraction']:.1%} of {run}"
    budget = scores.get("budget")
    if budget and scores["cost_fraction"] > budget:
        line += f", over the {budget:.0%} budget: probe fewer samples or plan a longer run"
    return [line]


def explain(scores: dict, frozen: int | None = None, budget: dict | None = None) -> list[str]:
    """What salf decided and on what evidence, for `plan show` and the quick start. `frozen`:
    the blocks the plan freezes in the end (a budget may freeze more than salf picked)."""
    lines = _explain(scores)
    k = scores.get("split")
    if frozen is not None and k is not None and frozen != k:
        limits = ", ".join(f"{key}={value:g}" for key, value in (budget or {}).items())
        lines.insert(
            1,
            f"salf's pick froze {k} blocks; the budget ({limits or 'as given'}) moved the split: "
            f"the plan freezes {frozen} blocks (backward stops at block {frozen})",
        )
    return lines


def _tol_text(metric: str, tol: float) -> str:
    return f"{tol:.1%}" if metric == "perplexity" else f"{tol:g} accuracy point(s)"


def _gap_text(metric: str, gap: float) -> str:
    """A gap in the user's metric (`_gap_in_metric`), in words."""
    return f"+{gap:.1%} perplexity" if metric == "perplexity" else f"-{gap:.1f} accuracy points"


def _blocks(k: int) -> str:
    return "block 0" if k == 1 else f"blocks 0-{k - 1}"


def _explain_halving(scores: dict) -> list[str]:
    k, h, metric = scores.get("split"), scores["halving"], scores["metric"]
    tol = _tol_text(metric, scores["tolerance"])
    gaps = {int(c): g for c, g in h["in_metric"].items()}
    if k:
        head = (
            f"salf (halving): freezes {_blocks(k)}; its pilots predict that after the run's "
            f"{h['run_steps']} steps training the rest ends {_gap_text(metric, gaps[k])} from "
            f"full fine-tuning, inside the tolerance ({tol})"
        )
    else:
        shown = ", ".join(f"freezing {c}: {_gap_text(metric, g)}" for c, g in gaps.items())
        head = (
            f"salf (halving): trains every block; no split its pilots kept to the end stayed "
            f"inside the tolerance ({tol}) of full fine-tuning after {h['run_steps']} steps "
            f"({shown})"
        )
    rounds = " -> ".join(
        f"{r['steps']} steps on k = {','.join(map(str, r['candidates']))}" for r in h["rounds"]
    )
    return [
        head,
        f"salf halving: {scores.get('pilot_plan')}",
        f"salf halving rounds (k = frozen blocks, 0 = full fine-tuning): {rounds}",
    ] + _cost_line(scores, "probe + halving")


def _explain_trace(scores: dict) -> list[str]:
    k, gain = scores.get("split"), scores["gain"]
    if k:
        head = (
            f"salf (trace, forward only): freezes {_blocks(k)}: reading your data's loss out of "
            f"every layer, {1 - gain[k]:.0%} of its fall from the embeddings to the output "
            "happens in those blocks, so they add little"
        )
    else:
        below = 1 - gain[1] if len(gain) > 1 else 0.0
        head = (
            "salf (trace, forward only): trains every block: reading your data's loss out of "
            f"every layer, block 0 alone carries {below:.0%} of its fall from the embeddings to "
            "the output"
        )
    lines = [head]
    if scores.get("constant_spaces"):
        spaces = ", ".join(f"h_{i}" for i in scores["constant_spaces"])
        lines.append(
            f"salf trace: {spaces} is the same in every example at the scored position (e.g. "
            "the [CLS] embedding), so it carries no deviation and is left out of the trace"
        )
    if scores.get("pilots_not_read"):
        lines.append(f"salf used its forward-only trace: {scores['pilots_not_read']}")
    if scores.get("pilot_skipped"):
        lines.append(
            f"salf used its forward-only trace: no pilot fine-tunes fit ({scores['pilot_skipped']})"
        )
    return lines + _cost_line(scores, "probe")


def _explain(scores: dict) -> list[str]:
    k = scores.get("split")
    if scores.get("estimator") == "halving":
        return _explain_halving(scores)
    if scores.get("estimator") == "pilot":
        p, metric = scores["predicted"], scores["predicted"]["metric"]
        fmt = (lambda v: f"{v:.2f}") if metric == "perplexity" else (lambda v: f"{v:.1%}")
        lo, hi = p["pick_interval"]
        return [
            f"salf (pilot): freezes {k} blocks; predicted end-of-run {metric} {fmt(p['pick'])} "
            f"(interval {fmt(lo)}..{fmt(hi)}) vs full fine-tuning {fmt(p['full'])}, "
            f"tolerance {_tol_text(metric, scores['tolerance'])}",
            f"salf pilots: {scores.get('pilot_plan')}",
        ] + _cost_line(scores, "probe + pilot")
    return _explain_trace(scores)
