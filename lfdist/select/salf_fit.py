"""salf's `pilot` estimator: end-of-run quality per split from pilot fine-tunes (SPEC 2.1).

Pure Python, no torch. The pilots measure held-out quality q(n) after fine-tuning the top n
blocks with the run's recipe, at one or two pilot lengths. Quality is read as an error to
minimise: the loss (nats) for language models, 1 - accuracy for classifiers.

1. Along steps: with two lengths s1 < s2, the deepest pilot's error and each depth's gap to it
   follow a learning curve a + c s^-gamma (gamma = 0.5 assumed), read at the run's S steps: a
   gap that grows from s1 to s2 keeps growing, one that shrinks keeps shrinking, never below
   0, and both settle; with one length the gaps are read as they are.
2. Along depth: the saturating scaling law l(n) = l_inf + B n^(-alpha), alpha > 0, B >= 0, is
   fitted by least squares: for each alpha on a log grid, l_inf and B are closed-form (a line
   in x = n^-alpha); the alpha with the least residual wins. Three depths or fewer leave no
   residual degrees of freedom, so a weak pull toward ALPHA_PRIOR breaks ties.
3. The interval: the fit's residual standard error, floored by the pilots' measurement noise
   (binomial for accuracy, the spread of the last training losses for the loss), times 2.
"""

from __future__ import annotations

import math

ALPHA_GRID = [0.05 * 1.1**i for i in range(60)]  # 0.05 .. ~14
ALPHA_PRIOR = 1.0  # the tie-break when the pilots cannot fix alpha (<= 3 depths)
PRIOR_WEIGHT = 1e-3  # of the points' variance: only decides between near-equal fits
GAMMA = 0.5  # learning-curve exponent along steps (two lengths cannot also fit it)
Z = 2.0  # interval half-width in standard errors (~95%)


def line_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x with b >= 0: (a, b, residual sum of squares)."""
    m = len(xs)
    mx, my = sum(xs) / m, sum(ys) / m
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    b = max(b, 0.0)  # deeper never predicts worse: a falling curve is flat
    a = my - b * mx
    return a, b, sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))


def fit_saturating(depths: list[int], errors: list[float]) -> dict:
    """l(n) = l_inf + B n^-alpha through (depth, error) points; see the module docstring."""
    if len(depths) != len(errors) or not depths:
        raise ValueError("one error per depth, at least one depth")
    m = len(depths)
    my = sum(errors) / m
    scale = sum((y - my) ** 2 for y in errors) / m or 1e-12
    best = None
    for alpha in ALPHA_GRID:
        a, b, rss = line_fit([n**-alpha for n in depths], errors)
        penalty = PRIOR_WEIGHT * scale * math.log(alpha / ALPHA_PRIOR) ** 2 if m <= 3 else 0.0
        if best is None or rss + penalty < best[0]:
            best = (rss + penalty, alpha, a, b, rss)
    _, alpha, l_inf, b, rss = best
    dof = m - 3
    return {
        "l_inf": l_inf,
        "B": b,
        "alpha": alpha,
        "rss": rss,
        "dof": dof,
        "residual_se": math.sqrt(rss / dof) if dof > 0 else None,
    }


def curve(fit: dict, n: int) -> float:
    return fit["l_inf"] + fit["B"] * n ** -fit["alpha"]


def along_steps(
    errors: dict[int, list[float]], lengths: list[int], run_steps: int, gamma: float = GAMMA
) -> list[float]:
    """Per-depth errors at the run's length from errors[length][depth index] (deepest last).

    The deepest pilot's error and each depth's gap to it follow a learning curve
    a + c s^-gamma in steps s; two lengths fix a and c, and the curve is read at run_steps.
    """
    last = errors[lengths[-1]]
    if len(lengths) < 2 or run_steps <= lengths[-1]:
        return list(last)
    s1, s2 = lengths[-2], lengths[-1]
    first = errors[s1]
    reach = (s2**-gamma - run_steps**-gamma) / (s1**-gamma - s2**-gamma)
    # Longer training never makes the deepest pilot worse, nor its error negative.
    deep_end = min(last[-1], max(0.0, last[-1] + (last[-1] - first[-1]) * reach))
    out = []
    for e1, e2 in zip(first, last):
        gap1, gap2 = e1 - first[-1], e2 - last[-1]
        out.append(deep_end + max(0.0, gap2 + (gap2 - gap1) * reach))
    out[-1] = deep_end
    return out


def predict_quality(pilot: dict, n_blocks: int, run_steps: int | None) -> dict:
    """Predicted end-of-run error for every trainable depth n = 1..L, with the fit and noise.

    `pilot`: the probe's curves["pilot"] (lfdist.probe.pilot.assemble_pilots).
    """
    lengths = list(pilot["lengths"])
    errors = {int(s): list(v) for s, v in zip(lengths, pilot["errors"])}
    steps = run_steps or pilot.get("run_steps") or lengths[-1]
    top = 1.0 if pilot.get("metric") == "accuracy" else math.inf  # an error rate is at most 1

    def bounded(e: float) -> float:
        return min(max(e, 0.0), top)

    at_end = [bounded(e) for e in along_steps(errors, lengths, steps)]
    fit = fit_saturating(pilot["depths"], at_end)
    noise = float(pilot.get("noise") or 0.0)
    se = max(fit["residual_se"] or 0.0, noise)
    return {
        **fit,
        "depths": list(pilot["depths"]),
        "lengths": lengths,
        "run_steps": steps,
        "at_run_steps": at_end,
        "noise_se": noise,
        "se": se,
        "error": [bounded(curve(fit, n)) for n in range(1, n_blocks + 1)],  # index n - 1
    }
