"""salf's `halving` estimator (SPEC 2.1): successive halving over candidate splits. Pure Python.

Candidates are frozen-prefix splits k (k = 0 trains every block: the reference every other
candidate is measured against). Round r trains every surviving candidate for s * 2^r steps
with the run's recipe (lfdist.probe.halving) and scores it on held-out examples. After each
round, every candidate's gap to the reference is read at the run's length (`end_gap`: the
learning-curve reading of salf_fit.along_steps, from its last two rounds), and the better half
continues, "better" in the decision's own terms: inside the tolerance and cheaper first, then
the smallest gap. Rounds stop when the reference and one candidate are left, or when the next
round does not fit the budget. The pick is the cheapest candidate of the last round whose gap
is inside the tolerance (k = 0 when none is).

Short pilots favour depth (SPEC 2.1: the gap after a few steps mostly measures how many
parameters move); reading each gap along steps is what lets a shallow split that is catching
up survive. The trace orders and prunes the candidates first (`candidates`): splits whose
trainable blocks carry less than TRACE_FLOOR of the trace's fall are not tried.
"""

from __future__ import annotations

import math

from lfdist.probe.pilot_budget import most_crowded
from lfdist.select.salf_fit import GAMMA

TRACE_FLOOR = 0.5  # a candidate's trainable blocks carry at least this share of the trace's fall
MAX_CANDIDATES = 6  # the reference included; the budget may allow fewer


def gap_within(task: str, gap: float, tolerance: float) -> bool:
    """Whether an error `gap` above full fine-tuning's is inside the tolerance in the user's
    metric: perplexity at most (1 + tolerance) times full's, or `tolerance` accuracy points."""
    if task == "lm":
        return gap <= math.log1p(tolerance) + 1e-12
    return gap * 100.0 <= tolerance + 1e-9


def candidates(gain: list[float], trace_pick: int, most: int = MAX_CANDIDATES) -> list[int]:
    """The splits halving tries, from the trace gain G(0..L-1) and the trace's own pick: k = 0
    (the reference), the trace's pick and the split one deeper, and every split whose trainable
    blocks carry TRACE_FLOOR of the fall, thinned to `most` on a log scale of trainable depth.
    k = L - 1 (one block) is never a candidate, as salf never picks it unprompted."""
    L = len(gain)
    top = max(0, L - 2)
    ks = {0, min(trace_pick, top), min(trace_pick + 1, top)}
    ks |= {k for k in range(1, top + 1) if gain[k] >= TRACE_FLOOR}
    ks = sorted(ks)
    keep = {0, min(trace_pick, top)}
    while len(ks) > most:
        i = most_crowded([L - k for k in ks], {L - k for k in keep})
        if i is None:
            break
        ks.pop(i)
    return ks


def end_gap(history: list[tuple[int, float]], run_steps: int, gamma: float = GAMMA) -> float:
    """A candidate's gap to the reference at the run's length from (steps, gap) of its rounds,
    shortest first: the gap follows a + c s^-gamma along steps, fixed by its last two rounds
    (a gap that shrinks keeps shrinking, one that grows keeps growing); never below 0."""
    s2, g2 = history[-1]
    if len(history) < 2 or run_steps <= s2:
        return max(0.0, g2)
    s1, g1 = history[-2]
    reach = (s2**-gamma - run_steps**-gamma) / (s1**-gamma - s2**-gamma)
    return max(0.0, g2 + (g2 - g1) * reach)


def histories(rounds: list[dict]) -> dict[int, list[tuple[int, float]]]:
    """(steps, gap to the reference) per candidate over the rounds it ran."""
    out: dict[int, list[tuple[int, float]]] = {}
    for r in rounds:
        errors = {int(k): e for k, e in zip(r["candidates"], r["errors"])}
        for k, e in errors.items():
            if k != 0:
                out.setdefault(k, []).append((int(r["steps"]), e - errors[0]))
    return out


def end_gaps(rounds: list[dict], run_steps: int) -> dict[int, float]:
    """The predicted end-of-run gap of every candidate that ran, from its own rounds."""
    return {k: end_gap(h, run_steps) for k, h in histories(rounds).items()}


def ranked(task: str, gaps: dict[int, float], tolerance: float) -> list[int]:
    """Candidates best first in the decision's terms: inside the tolerance and cheaper (larger
    k) first, then the rest by gap (ties to the cheaper)."""
    inside = sorted((k for k, g in gaps.items() if gap_within(task, g, tolerance)), reverse=True)
    outside = sorted((k for k in gaps if k not in inside), key=lambda k: (gaps[k], -k))
    return inside + outside


def survivors(task: str, rounds: list[dict], run_steps: int, tolerance: float) -> list[int]:
    """The reference plus the better half of the last round's other candidates."""
    last = [int(k) for k in rounds[-1]["candidates"] if int(k) != 0]
    gaps = {k: g for k, g in end_gaps(rounds, run_steps).items() if k in last}
    best = ranked(task, gaps, tolerance)[: math.ceil(len(last) / 2)]
    return [0, *sorted(best)]


def pick(task: str, rounds: list[dict], run_steps: int, tolerance: float) -> tuple[int, dict]:
    """(k, predicted end gap per candidate of the last round): the cheapest candidate of the
    last round inside the tolerance, else 0."""
    last = [int(k) for k in rounds[-1]["candidates"] if int(k) != 0]
    gaps = {k: g for k, g in end_gaps(rounds, run_steps).items() if k in last}
    inside = [k for k in last if gap_within(task, gaps[k], tolerance)]
    return (max(inside) if inside else 0), gaps
