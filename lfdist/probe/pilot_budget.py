"""How many pilot fine-tunes salf can afford: probe + pilots within a share of the run.

Pure arithmetic on the cost model (lfdist.cost): every figure is analytic FLOPs of one
example, so the sizing is the same on any machine and is reported in the probe file.
"""

from __future__ import annotations

from dataclasses import dataclass

from lfdist.cost import predict
from lfdist.plan import DEFAULT_MODULES
from lfdist.probe.stats import LENS_STRIDE

PILOT_BUDGET = 0.05  # probe + pilots as a share of the cheapest run salf may pick
# Pilots shorter than this share of the run are not run when sized by the budget, and salf does
# not read them by default: 16-step pilots of an 80-step classifier run (20%) kept every block
# where 4 of 6 could freeze, and the pilots that fit 5% of a 1,000-step run (2-5 steps) moved
# with the draw of the fresh head, i.e. measured noise (they see the head start to learn, not
# what the blocks add: SPEC 2.1); 8-step pilots of a 60-step LM run (13%) picked the oracle's
# split (benchmarks/selection_quality). At the default 5% budget no pilot plan reaches it (the
# grid's longer pilot is at most ~3% of the run): the budget must be raised to read pilots.
INFORMATIVE_SHARE = 0.1
MIN_STEPS = 4  # the longer pilot; the shorter is half of it
MIN_HELDOUT = 16


def top_treatments(L: int, depth: int) -> list[str]:
    return ["frozen"] * (L - depth) + ["full"] * depth


def example_flops(info: dict, seq_len: int) -> dict:
    """Analytic FLOPs (cost model) of one example: forward only, and one training step of
    every split k (index k = frozen bottom blocks)."""
    L = info["n_blocks"]
    one = dict(engine="single", dtype="float32", batch_size=1, seq_len=seq_len)
    train = [predict(info, top_treatments(L, L - k), DEFAULT_MODULES, **one) for k in range(L)]
    forward = train[0]["flops_forward"]
    return {
        "forward": forward,
        "probe": forward + lens_flops(info, seq_len),
        "train": [p["flops_per_step"] for p in train],
    }


def lens_flops(info: dict, seq_len: int) -> float:
    """The logit lens of one example (causal LMs): the unembedding matmul at every LENS_STRIDE-th
    position for the L interior latent spaces, at every position for the output space."""
    if info.get("task") != "lm":
        return 0.0
    positions = max(0, seq_len - 1)
    interior = -(-positions // LENS_STRIDE)
    return 2.0 * float(info["head_matmul_params"]) * (info["n_blocks"] * interior + positions)


def global_batch(tc) -> int:
    return tc.batch_size * tc.grad_accum * tc.nproc


def _run_and_probe(info: dict, tc, seq_len: int, probe_examples: int):
    """(per-example FLOPs, global batch, FLOPs of the cheapest run salf may pick, the probe's
    FLOPs): what every budget figure is a share of."""
    flops = example_flops(info, seq_len)
    gb = global_batch(tc)
    run = tc.steps * gb * flops["train"][max(0, info["n_blocks"] - 2)]
    return flops, gb, run, probe_examples * flops["probe"]


def most_crowded(depths: list[int], keep=()) -> int | None:
    """The index of the interior depth (sorted either way, its value not in `keep`) whose
    neighbours are closest on a log scale: dropping it leaves the others spread from 1 to L
    (1, 2, 4, 8, 16, 30 -> 1, 2, 4, 8, 30 -> 1, 4, 8, 30 -> 1, 4, 30). None: all kept."""
    interior = [i for i in range(1, len(depths) - 1) if depths[i] not in keep]
    if not interior:
        return None
    return min(
        interior,
        key=lambda i: max(depths[i - 1], depths[i + 1]) / min(depths[i - 1], depths[i + 1]),
    )


def _sized_by(budget: float, tc, steps: int | None) -> str:
    if steps is None:
        return f"the {budget:.0%} budget of a {tc.steps}-step run allowed"
    return f"probe.pilot_steps={steps} (not sized to the budget) gave"


def _share(min_share: float | None) -> float:
    return INFORMATIVE_SHARE if min_share is None else min_share


def _too_short(longest: int, run_steps: int, budget: float, share: float) -> str | None:
    """Why budget-sized pilots whose longest run is `longest` steps are not worth running."""
    if longest >= share * run_steps:
        return None
    return (
        f"the {budget:.0%} budget of a {run_steps}-step run allows pilots of at most {longest} "
        f"steps ({longest / run_steps:.1%} of it), and pilots under {share:.0%} of the run "
        "measure how fast training starts, not where it ends; raise probe.pilot_budget or set "
        "probe.pilot_steps to run them"
    )


def _costs(budget, probe, pilots, run, flops, gb, share) -> dict:
    """The cost facts every pilot record carries (salf prices its plan from them)."""
    return {
        "budget": budget,
        "probe_flops": probe,
        "run_flops_per_example": flops["train"],
        "global_batch": gb,
        "planned_fraction": (probe + pilots) / run,
        "min_share": share,
    }


def _too_few(global_batch: int, left: int) -> str:
    return (
        f"one global batch ({global_batch}) needs more than the {left} calibration examples "
        "left for training"
    )


@dataclass(frozen=True)
class Sizing:
    """What an estimator is sized from: the calibration set and its share of the run."""

    seq_len: int
    n_examples: int  # the calibration examples, held-out ones included
    n_heldout: int  # the most held-out examples
    probe_examples: int
    budget: float = PILOT_BUDGET  # probe + estimator as a share of the cheapest run
    steps: int | None = None  # an explicit length: the budget is reported, not enforced
    min_share: float | None = None  # None: INFORMATIVE_SHARE


def plan_pilots(info: dict, tc, depths: list[int], sz: Sizing) -> dict:
    """Which depths, lengths and held-out examples the budget allows: probe + pilots at most
    `sz.budget` of the run that trains the fewest blocks salf may pick (2; 1 on a 1-block model).

    `sz.steps`: an explicit longer length. Before the pilots get shorter than MIN_STEPS,
    interior depths are dropped (1, the deepest and one between stay), then the held-out set
    halves down to MIN_HELDOUT; with nothing left, `skipped` says why; also when the longer
    pilot is under `sz.min_share` (default INFORMATIVE_SHARE) of the run.
    """
    L, budget, steps, min_share = info["n_blocks"], sz.budget, sz.steps, sz.min_share
    flops, gb, run, probe = _run_and_probe(info, tc, sz.seq_len, sz.probe_examples)
    allowed = budget * run
    n_examples = sz.n_examples

    def cost(ds: list[int], s2: int, held: int) -> float:  # + the pre-trained model's pass
        train = (s2 + s2 // 2) * gb * sum(flops["train"][L - n] for n in ds)
        return train + (2 * len(ds) + 1) * held * flops["forward"]

    def longest(ds: list[int], held: int) -> int:
        per_step = 1.5 * gb * sum(flops["train"][L - n] for n in ds)
        return int((allowed - probe - cost(ds, 0, held)) // per_step)

    depths, held = list(depths), min(sz.n_heldout, max(1, n_examples // 4))
    if steps is None:
        while longest(depths, held) < MIN_STEPS and len(depths) > 3:
            depths.pop(most_crowded(depths))
        while longest(depths, held) < MIN_STEPS and held // 2 >= MIN_HELDOUT:
            held //= 2
        s2 = min(longest(depths, held), tc.steps)
    else:
        s2 = steps
    if gb > n_examples - held:
        skipped = _too_few(gb, n_examples - held)
    elif s2 < (2 if steps else MIN_STEPS):
        skipped = (
            f"the {budget:.0%} budget of a {tc.steps}-step run allows pilots of {max(s2, 0)} "
            f"steps, fewer than {MIN_STEPS}"
        )
    else:
        skipped = None if steps else _too_short(s2, tc.steps, budget, _share(min_share))
    lengths = [] if skipped else [s2 // 2, s2]
    pilots = cost(depths, s2, held) if lengths else 0.0
    plan = {
        "depths": depths,
        "lengths": lengths,
        "heldout_examples": held,
        "flops_total": pilots,  # the pilots and their held-out passes
        **_costs(budget, probe, pilots, run, flops, gb, _share(min_share)),
    }
    if skipped:
        return {**plan, "skipped": skipped, "budget_note": f"no pilots: {skipped}"}
    note = (
        f"{_sized_by(budget, tc, steps)} pilots of {lengths[0]} and {lengths[1]} steps at depths "
        f"{','.join(map(str, depths))}, scored on {held} held-out examples"
    )
    return {**plan, "budget_note": note}


def probe_only(
    info: dict,
    tc,
    seq_len: int,
    probe_examples: int,
    budget: float = PILOT_BUDGET,
    skipped: str = "probe.pilots is off",
):
    """The cost record of a probe that ran no grid pilots (probe.pilots off, or halving ran or
    did not fit: `skipped` says which), so that salf's plan still reports the probe's share of
    the run it plans."""
    flops, gb, run, probe = _run_and_probe(info, tc, seq_len, probe_examples)
    return {
        "depths": [],
        "lengths": [],
        "budget": budget,
        "probe_flops": probe,
        "flops_total": 0.0,
        "run_flops_per_example": flops["train"],
        "global_batch": gb,
        "planned_fraction": probe / run,
        "run_steps": tc.steps,
        "seq_len": seq_len,
        "skipped": skipped,
        "budget_note": f"no pilots: {skipped}",
        "seconds": [0.0],
    }


def halving_counts(m: int) -> list[int]:
    """Candidates per halving round: all m, then the reference plus the better half of the
    others, and so on down to the reference and one (5 -> 3 -> 2; 6 -> 4 -> 3 -> 2). At least
    two rounds, so that every gap the pick reads has a trend along steps (2 -> 2)."""
    counts = [m]
    while counts[-1] > 2:
        counts.append(1 + -(-(counts[-1] - 1) // 2))
    return counts if len(counts) > 1 else counts * 2


def plan_halving(info: dict, tc, ks: list[int], keep: set[int], sz: Sizing) -> dict:
    """The halving estimator's rounds inside `sz.budget` of the run (as `plan_pilots`):
    candidate splits `ks` (k = 0 first), round r trains the survivors for s * 2^r steps, each
    from the pre-trained weights. Priced as if the deepest candidates survived every round, so
    what runs never costs more than planned. Before the first round gets shorter than
    MIN_STEPS // 2, candidates not in `keep` are dropped (the most crowded first), then the
    held-out set halves down to MIN_HELDOUT. `sz.steps`: an explicit first-round length."""
    L, budget, steps, min_share = info["n_blocks"], sz.budget, sz.steps, sz.min_share
    flops, gb, run, probe = _run_and_probe(info, tc, sz.seq_len, sz.probe_examples)
    allowed = budget * run
    n_examples = sz.n_examples

    def cost(cands: list[int], s0: int, held: int) -> float:
        counts = halving_counts(len(cands))
        dearest = sorted((flops["train"][k] for k in cands), reverse=True)
        train = sum(s0 * 2**r * gb * sum(dearest[:m]) for r, m in enumerate(counts))
        return train + (sum(counts) + 1) * held * flops["forward"]  # + the base model's pass

    def longest(cands: list[int], held: int) -> int:
        per_step = cost(cands, 1, held) - cost(cands, 0, held)
        return int((allowed - probe - cost(cands, 0, held)) // per_step)

    ks, held = sorted(ks), min(sz.n_heldout, max(1, n_examples // 4))
    first = MIN_STEPS // 2
    if steps is None:
        while longest(ks, held) < first and len(ks) > 2:
            i = most_crowded([L - k for k in ks], {L - k for k in keep})
            if i is None:
                break
            ks.pop(i)
        while longest(ks, held) < first and held // 2 >= MIN_HELDOUT:
            held //= 2
        rounds = len(halving_counts(len(ks)))
        s0 = min(longest(ks, held), max(1, tc.steps // 2 ** (rounds - 1)))
    else:
        s0 = steps
    if len(ks) < 2:
        skipped = "the trace leaves no candidate split to compare with full fine-tuning"
    elif gb > n_examples - held:
        skipped = _too_few(gb, n_examples - held)
    elif s0 < first:
        skipped = (
            f"the {budget:.0%} budget of a {tc.steps}-step run allows a first halving round of "
            f"{max(s0, 0)} steps, fewer than {first}"
        )
    else:
        last = s0 * 2 ** (len(halving_counts(len(ks))) - 1)
        skipped = None if steps else _too_short(last, tc.steps, budget, _share(min_share))
    counts = halving_counts(len(ks))
    lengths = [] if skipped else [s0 * 2**r for r in range(len(counts))]
    spent = cost(ks, s0, held) if lengths else 0.0
    plan = {
        "candidates": ks,
        "counts": counts,
        "lengths": lengths,
        "heldout_examples": held,
        "flops_planned": spent,
        "forward_flops_per_example": flops["forward"],
        **_costs(budget, probe, spent, run, flops, gb, _share(min_share)),
    }
    if skipped:
        return {**plan, "skipped": skipped, "budget_note": f"no halving: {skipped}"}
    note = (
        f"{_sized_by(budget, tc, steps)} halving rounds of {', '.join(map(str, lengths))} steps over frozen splits "
        f"k = {', '.join(map(str, ks))} ({' -> '.join(map(str, counts))} candidates), scored on "
        f"{held} held-out examples"
    )
    return {**plan, "budget_note": note}
