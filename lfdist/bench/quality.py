"""`lfdist bench quality`: does a strategy pick the right blocks? (SPEC 6)

Per task: the oracle sweep (lfdist.bench.oracle) trains every split k with the same steps, lr,
batch and seeds; the probe runs as `lfdist probe` would for salf's defaults (pilots sized to
the run) plus gradnorm's backward pass and critical's all-block pilot; every strategy selects
from that probe, and each plan is trained with the same recipe and seeds. Two scores
(lfdist.bench.quality_scores): (a) the cheapest split within tolerance of full fine-tuning
(salf and top's default pick against the oracle's k_tol), (b) quality at equal trainable
blocks. Results: quality.json / .md / .png, and oracle-<task>.json per task (the cache that
`--reuse DIR` reads, so strategies are re-scored without re-training the sweep).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

from lfdist.bench.oracle import Oracle, metric_of, plan_key, prefix
from lfdist.bench.quality_scores import (
    TOLERANCE,
    best_within,
    cheapest_score,
    estimator_label,
    k_tol,
    separation,
    shortfall,
)
from lfdist.errors import UserError

STRATEGIES = ("salf", "top", "bottom", "random", "gradnorm", "critical", "lisa", "lora")


@dataclass(frozen=True)
class TaskSpec:
    """One task of the benchmark: what is trained, on what, with which recipe and seeds."""

    name: str
    model: str  # a model spec (pkg:, tiny:, a folder)
    data: str  # a data spec (pkg:, synthetic:, a file)
    task: str
    # The recipe of every run (oracle splits and strategies' plans alike)
    seq_len: int
    steps: int
    lr: float
    batch: int
    seeds: list[int]
    warmup: int = 0
    ks: list[int] | None = None  # the oracle's splits; None: every split 0..L-1
    max_examples: int | None = None  # data.max_examples
    max_eval: int | None = None  # data.max_eval_examples (held-out examples scored)
    # The probe behind every strategy's plan
    probe_samples: int = 64
    critical_steps: int = 10  # critical's all-block pilot
    # salf's pilot estimator scored OUTSIDE the budget: pilots of pilot_steps/2 and pilot_steps
    # (0: not scored). The runs here are too short for pilots inside 5%; this shows what the
    # estimator would pick, with its cost fraction printed as it is.
    pilot_steps: int = 0
    # salf's halving estimator scored OUTSIDE the budget too: a first round of halving_steps
    # (0: not scored), where the budget allows none; its cost fraction printed as it is
    halving_steps: int = 0
    # score (b), every strategy at equal trainable blocks; off for the long runs, where each
    # extra plan costs as much as a split of the sweep
    at_budget: bool = True
    extra: dict = field(default_factory=dict)


TASKS = [
    TaskSpec(
        "minilm-bbc",
        "pkg:minilm-l6",
        "pkg:bbc-news",
        "classify",
        seq_len=64,
        steps=80,
        lr=2e-4,
        batch=8,
        seeds=[0, 1, 2],
        probe_samples=32,
        critical_steps=8,
        warmup=8,
        pilot_steps=16,
    ),
    TaskSpec(
        "smollm2-docs",
        "pkg:smollm2-135m",
        "pkg:python-docs",
        "lm",
        seq_len=32,
        steps=60,
        lr=1e-4,
        batch=4,
        seeds=[0, 1],
        ks=[0, 1, 2, 4, 12, 24],
        max_examples=2000,
        max_eval=32,
        probe_samples=8,
        critical_steps=4,
        warmup=6,
        pilot_steps=8,
    ),
]
# The same tasks at the run lengths users have (issue 17): `--only minilm-bbc-1000` etc., into
# their own folder (benchmarks/selection_quality/long). Warm-up stays 10% of the run; pilots
# are not scored there, nor every strategy at equal blocks (each extra plan costs a split).


def _longer(task: TaskSpec, name: str, steps: int, **changes) -> TaskSpec:
    return replace(
        task, name=name, steps=steps, warmup=steps // 10, pilot_steps=0, at_budget=False, **changes
    )


LONG_TASKS = [
    _longer(TASKS[0], "minilm-bbc-1000", 1000),
    # More seeds or splits train only what is new (--reuse benchmarks/selection_quality/long):
    # about 5-10 min a run on 2 quiet cores. 5% of 300 steps allows no halving round: 8 steps
    # (the short run's pilots) are scored outside the budget.
    _longer(TASKS[1], "smollm2-docs-300", 300, seeds=[0, 1], ks=[0, 1, 2, 4, 8], halving_steps=8),
]
# The tests' tasks: a tiny encoder and a tiny decoder on generated data.
_TINY_BERT = TaskSpec(
    "tiny-bert", "tiny:bert", "synthetic:classify:300", "classify", 32, 8, 1e-3, 4, [0, 1],
    ks=[0, 2, 4, 6, 7], pilot_steps=4,
)  # fmt: skip
TINY_TASKS = [
    _TINY_BERT,
    replace(
        _TINY_BERT,
        name="tiny-llama",
        model="tiny:llama",
        data="synthetic:lm:200",
        task="lm",
        max_eval=32,
        pilot_steps=0,
        halving_steps=2,
    ),
]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _config(spec: TaskSpec):
    from lfdist.config import DataConfig, ModelConfig, ProbeConfig, RunConfig, TrainConfig

    return RunConfig(
        model=ModelConfig(spec=spec.model, task=spec.task),
        data=DataConfig(
            spec=spec.data,
            seq_len=spec.seq_len,
            max_examples=spec.max_examples,
            max_eval_examples=spec.max_eval,
        ),
        probe=ProbeConfig(
            samples=spec.probe_samples,
            gradnorm=True,
            pilots=True,
            critical_steps=spec.critical_steps,
        ),
        train=TrainConfig(
            engine="single",
            nproc=1,
            steps=spec.steps,
            batch_size=spec.batch,
            lr=spec.lr,
            warmup_steps=spec.warmup,
            log_every=0,
        ),
    )


def _frozen_bottom(treatments: list[str]) -> int | None:
    """k when the plan is a frozen prefix with everything above fully trained, else None."""
    k = next((i for i, t in enumerate(treatments) if t != "frozen"), len(treatments))
    return k if all(t == "full" for t in treatments[k:]) else None


def _options(strategy: str, n: int) -> dict:
    if strategy == "critical":
        return {"m": n}
    if strategy in ("top", "bottom", "random", "gradnorm", "lisa"):
        return {"n": n}
    return {}  # salf (its own pick), lora (adapters on every block)


def run_task(spec: TaskSpec, out: str, reuse: str | None = None) -> dict:
    from lfdist import pipeline
    from lfdist.select import select_plan
    from lfdist.select.registry import strategy_names
    from lfdist.train.local import plan_for
    from lfdist.train.prepare import prepare

    cfg = _config(spec)
    t_start = time.perf_counter()
    prepared = prepare(cfg)
    model = prepared.loaded.model
    L = _n_blocks(model)
    settings = {**asdict(spec), "n_eval": int(len(prepared.heldout["input_ids"]))}
    path = os.path.join(out, f"oracle-{spec.name}.json")
    if reuse:
        oracle = Oracle.load(os.path.join(reuse, f"oracle-{spec.name}.json"), settings, L, _log)
        oracle.path = path
    else:
        oracle = Oracle(path, settings, L, _log)
    seeds, ks = spec.seeds, spec.ks or list(range(L))
    _log(f"{spec.name}: oracle sweep over k = {ks}, seeds {seeds}")
    t0 = time.perf_counter()
    for k in ks:
        oracle.train(model, plan_for(model, prefix(L, k)), prepared, cfg.train, seeds)
    sweep_s = time.perf_counter() - t0

    os.makedirs(out, exist_ok=True)  # a --reuse run has written nothing yet
    _log(f"{spec.name}: probe (salf's pilots, gradnorm, critical)")
    t0 = time.perf_counter()
    probe = pipeline.probe(
        cfg, os.path.join(out, f"probe-{spec.name}.json"), overwrite=True, progress=False
    )
    probe_wall = time.perf_counter() - t0

    plans, errors = {}, {}
    available = set(strategy_names())
    for s in STRATEGIES:
        if s in available:
            try:
                plans[s] = {"default": select_plan(probe, s)}
            except UserError as e:
                errors[s] = str(e)
    pilot = _pilot_pick(spec, cfg, out) if spec.pilot_steps else None
    estimators = _estimators(cfg, out, spec.name, probe)
    if spec.halving_steps:
        name = f"halving, {spec.halving_steps}-step first round (over budget)"
        estimators[name] = _halving_pick(spec, cfg, out)
    salf_k = plans["salf"]["default"].boundary if "salf" in plans else None
    oracle_k = k_tol(spec.task, oracle.splits(seeds))
    budget_k = next(k for k in (salf_k, oracle_k, L // 2) if k)  # 0 would make every plan equal
    n_budget = L - budget_k
    for s in list(plans) if spec.at_budget else []:
        try:
            plans[s]["budget"] = _at_budget(probe, s, plans[s]["default"], n_budget)
        except UserError as e:
            errors[s] = str(e)
            del plans[s]
    # Contiguous default picks (salf's, top's) join the sweep, so score (a) can read them.
    for s in ("salf", "top"):
        k = _frozen_bottom(plans[s]["default"].treatments) if s in plans else None
        if k is not None:
            oracle.train(model, plan_for(model, prefix(L, k)), prepared, cfg.train, seeds)
    if pilot is not None:
        oracle.train(model, plan_for(model, prefix(L, pilot["k"])), prepared, cfg.train, seeds)
    for e in estimators.values():
        if "k" in e:
            oracle.train(model, plan_for(model, prefix(L, e["k"])), prepared, cfg.train, seeds)
    for p in plans.values():
        if "budget" in p:
            oracle.train(model, p["budget"], prepared, cfg.train, seeds)
    splits = oracle.splits(seeds)
    oracle_k = k_tol(spec.task, splits)
    oracle.save()
    return _score(
        spec,
        probe,
        plans,
        errors,
        oracle,
        splits,
        oracle_k,
        n_budget,
        pilot,
        estimators,
        {
            "sweep_s": sweep_s,
            "probe_wall_s": probe_wall,
            "total_s": time.perf_counter() - t_start,
            # every cached run's training + evaluation wall time, whichever invocation ran it
            "trained_s": sum(r["wall_s"] for runs in oracle.runs.values() for r in runs.values()),
        },
    )


def _estimators(cfg, out: str, name: str, probe) -> dict:
    """salf's three estimators, each inside the pilot budget: trace from the main probe (what a
    user's run gets by default), the grid pilots and halving from probes of their own, sized to
    the budget and run whatever their length (probe.pilot_min_share=0), so that each is scored
    where the default would skip it as too short to read."""

    from lfdist.select import select_plan

    sources = {"trace": (probe, None, None)}
    for kind, estimator, key in (("grid", "pilot", "pilot_s"), ("halving", "halving", "halving_s")):
        _log(f"{name}: salf's {estimator} estimator inside the {cfg.probe.pilot_budget:.0%} budget")
        path = os.path.join(out, f"probe-{estimator}-in-budget-{name}.json")
        result, wall = _side_probe(cfg, path, pilot_kind=kind, pilot_min_share=0.0)
        sources[estimator] = (result, key, wall)
    out_: dict = {}
    for estimator, (source, key, wall) in sources.items():
        try:
            plan = select_plan(source, "salf", options={"estimator": estimator})
        except UserError as e:  # the probe's own reason where it skipped them
            record = source.curves.get(estimator if estimator == "halving" else "pilot") or {}
            out_[estimator] = {"skipped": record.get("skipped") or str(e)}
            continue
        t = source.timings
        sc = plan.scores
        spent = float(t.get(key, 0.0)) if key else 0.0
        out_[estimator] = {
            "k": plan.boundary,
            "plan_cost_fraction": sc.get("cost_fraction"),
            "pilot_plan": "forward probe only" if estimator == "trace" else sc.get("pilot_plan"),
            "probe_forward_s": t.get("forward_s", 0.0),
            "pilots_s": spent,
            "seconds": float(t.get("forward_s", 0.0)) + spent,
            "probe_wall_s": wall,
        }
        if estimator == "halving":
            out_[estimator]["halving"] = sc["halving"]
        if estimator == "pilot":
            out_[estimator]["predicted"] = sc.get("predicted")
    return out_


def _halving_pick(spec: TaskSpec, cfg, out: str) -> dict:
    """salf's halving estimator from a probe whose first round is spec.halving_steps long
    (probe.pilot_steps: not sized to the budget, its cost fraction reported as it is)."""
    from lfdist.select import select_plan

    _log(f"{spec.name}: salf's halving estimator, a first round of {spec.halving_steps} steps")
    path = os.path.join(out, f"probe-halving-{spec.name}.json")
    probe, wall = _side_probe(cfg, path, pilot_kind="halving", pilot_steps=spec.halving_steps)
    plan = select_plan(probe, "salf", options={"estimator": "halving"})
    t, sc = probe.timings, plan.scores
    spent = float(t.get("halving_s", 0.0))
    return {
        "k": plan.boundary,
        "over_budget": True,
        "plan_cost_fraction": sc.get("cost_fraction"),
        "pilot_plan": sc.get("pilot_plan"),
        "probe_forward_s": t.get("forward_s", 0.0),
        "pilots_s": spent,
        "seconds": float(t.get("forward_s", 0.0)) + spent,
        "probe_wall_s": wall,
        "halving": sc["halving"],
    }


def _side_probe(cfg, path: str, **probe_changes):
    """(a probe of its own for one estimator, its wall seconds): the task's probe config with
    `probe_changes`, without gradnorm's backward or critical's pilot (not salf's cost)."""
    from dataclasses import replace

    from lfdist import pipeline

    pc = replace(cfg.probe, gradnorm=False, critical_steps=0, **probe_changes)
    t0 = time.perf_counter()
    result = pipeline.probe(replace(cfg, probe=pc), path, overwrite=True, progress=False)
    return result, time.perf_counter() - t0


def _pilot_pick(spec: TaskSpec, cfg, out: str) -> dict:
    """salf with its pilot estimator from a second probe whose pilots are spec.pilot_steps long
    (probe.pilot_steps: not sized to the budget, the cost fraction reported as it is)."""

    from lfdist.select import select_plan

    _log(f"{spec.name}: salf's pilot estimator, pilots of {spec.pilot_steps} steps")
    path = os.path.join(out, f"probe-pilot-{spec.name}.json")
    probe, wall = _side_probe(cfg, path, pilot_steps=spec.pilot_steps)
    plan = select_plan(probe, "salf", options={"estimator": "pilot"})
    sc = plan.scores
    return {
        "k": plan.boundary,
        "predicted": sc.get("predicted"),
        "pilot_plan": sc.get("pilot_plan"),
        "plan_cost_fraction": sc.get("cost_fraction"),
        "pilot_s": probe.timings.get("pilot_s"),
        "probe_wall_s": wall,
        "fit": {k: sc["pilot"].get(k) for k in ("alpha", "l_inf", "B", "se", "at_run_steps")},
        "measured": sc["pilot"].get("measured"),
        "depths": sc["pilot"].get("depths"),
        "lengths": sc["pilot"].get("lengths"),
    }


def _at_budget(probe, strategy: str, default, n: int):
    """The strategy's plan with n trainable blocks. salf's own pick when it trains n blocks,
    else salf under a blocks budget (as a user would ask for it)."""
    from lfdist.select import select_plan

    if strategy != "salf":
        return select_plan(probe, strategy, options=_options(strategy, n))
    if len(default.trainable_blocks) == n:
        return default
    return select_plan(probe, "salf", budget={"blocks": n})


def _n_blocks(model) -> int:
    from lfdist.model.blocks import find_blocks

    return find_blocks(model).n_blocks


def _flops(probe, spec: TaskSpec, treatments: list[str], plan=None) -> float:
    """Training FLOPs per step as a fraction of full fine-tuning's (the cost model): a cost
    that a loaded machine cannot blur, next to the measured step time."""
    from lfdist.cost import predict, predict_plan
    from lfdist.plan import DEFAULT_MODULES

    settings = dict(engine="ddp", dtype="float32", batch_size=spec.batch, seq_len=spec.seq_len)
    if plan is not None:
        return predict_plan(probe.model_info, plan, **settings)["flops_fraction"]
    return predict(probe.model_info, treatments, DEFAULT_MODULES, **settings)["flops_fraction"]


def _salf_cost(probe, spec: TaskSpec, splits: dict, k: int | None) -> dict:
    """Probe forward + salf's pilots in seconds, against the run salf plans (its split's
    measured step time x the run's steps). gradnorm's and critical's passes are not salf's."""
    t = probe.timings
    spent = float(t.get("forward_s", 0.0)) + float(t.get("pilot_s", 0.0))
    run_s = spec.steps * splits[k]["step_s"] if k in splits else None
    return {
        "probe_forward_s": t.get("forward_s"),
        "pilot_s": t.get("pilot_s", 0.0),
        "gradnorm_s": t.get("gradnorm_s"),
        "critical_s": t.get("critical_s"),
        "salf_s": spent,
        "run_s": run_s,
        "fraction": spent / run_s if run_s else None,
    }


def _score(
    spec, probe, plans, errors, oracle, splits, oracle_k, n_budget, pilot, estimators, wall
) -> dict:
    task, seeds, L = spec.task, spec.seeds, oracle.n_blocks
    for k, summary in splits.items():
        summary["flops"] = _flops(probe, spec, prefix(L, k))
    cheapest = {}
    picks = {
        s: _frozen_bottom(plans[s]["default"].treatments) for s in ("salf", "top") if s in plans
    }
    if pilot is not None:
        picks["salf (pilot, over budget)"] = pilot["k"]
    for name, e in estimators.items():
        if "k" in e:
            picks[estimator_label(name, e)] = e["k"]
            run_s = spec.steps * splits[e["k"]]["step_s"] if e["k"] in splits else None
            e["wall_fraction"] = e["seconds"] / run_s if run_s else None
    for s, k in picks.items():
        if k is not None:
            cheapest[s] = cheapest_score(task, splits, k, oracle_k)
            by_flops = cheapest_score(task, splits, k, oracle_k, cost="flops")
            cheapest[s]["wasted_flops"] = by_flops["wasted_time"]
            cheapest[s]["saved_share_flops"] = by_flops["saved_share"]
    best_k = best_within(task, splits, L, n_budget)
    at_budget = {}
    for s, p in plans.items():
        if "budget" not in p:
            continue
        plan = p["budget"]
        summary = oracle.summary(plan_key(plan.treatments, plan.strategy, plan.options), seeds)
        at_budget[s] = {
            **summary,
            "treatments": plan.treatments,
            "flops": _flops(probe, spec, plan.treatments, plan),
            "trained_blocks": [i for i, t in enumerate(plan.treatments) if t != "frozen"],
            "options": {k: v for k, v in plan.options.items() if k in ("n", "m", "period", "seed")},
            "shortfall_vs_best_fit": shortfall(task, splits[best_k]["mean"], summary["mean"]),
        }
    salf = plans.get("salf", {}).get("default")
    scores = salf.scores if salf is not None else {}
    return {
        "task": asdict(spec),
        "n_blocks": L,
        "n_eval": oracle.settings["n_eval"],
        "metric": metric_of(task),
        "tolerance": TOLERANCE[task],
        "seeds": seeds,
        "oracle": {str(k): v for k, v in splits.items()},
        "k_tol": oracle_k,
        "separation": separation(task, splits),
        "cheapest": cheapest,
        "budget_blocks": n_budget,
        "best_fit_k": best_k,
        "at_budget": at_budget,
        "salf": {
            "k": salf.boundary if salf is not None else None,
            "estimator": scores.get("estimator"),
            "predicted": scores.get("predicted"),
            "plan_cost_fraction": scores.get("cost_fraction"),
            "pilot_plan": scores.get("pilot_plan") or scores.get("pilot_skipped"),
            "cost": _salf_cost(probe, spec, splits, salf.boundary if salf else None),
        },
        "salf_pilot": pilot,
        "estimators": estimators,
        "errors": errors,
        "wall": wall,
    }


def run(
    out: str, tiny: bool = True, reuse: str | None = None, only: list[str] | None = None
) -> str:
    from lfdist.bench.quality_report import markdown, plot
    from lfdist.bench.record import write_result

    known = TINY_TASKS if tiny else TASKS + LONG_TASKS
    tasks = [t for t in known if (t.name in only if only else t in TASKS or tiny)]
    if reuse:
        missing = [
            t.name
            for t in tasks
            if not os.path.isfile(os.path.join(reuse, f"oracle-{t.name}.json"))
        ]
        if missing:
            raise UserError(
                f"--reuse {reuse!r} holds no oracle-{missing[0]}.json; give the --out folder of "
                "an earlier bench quality run, or drop --reuse"
            )
    t0 = time.perf_counter()
    results = [run_task(t, out, reuse) for t in tasks]
    result = {"tiny": tiny, "reused": reuse, "tasks": results, "wall_s": time.perf_counter() - t0}
    plot(results, os.path.join(out, "quality.png"))
    return write_result(out, "quality", result, markdown(result))
