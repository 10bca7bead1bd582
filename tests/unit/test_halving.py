"""salf's halving estimator: candidates from the trace, rounds sized to the budget, the rule for
who continues, the rounds trained through the run's own step, and salf's pick from them."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from lfdist.config import TrainConfig
from lfdist.data import load_task_data
from lfdist.errors import UserError
from lfdist.model.tiny import build_tiny
from lfdist.model.tokenizer import ByteTokenizer
from lfdist.probe import load_probe, run_probe
from lfdist.probe.halving import run_halving
from lfdist.probe.pilot import attach
from lfdist.probe.pilot_budget import Sizing, halving_counts, plan_halving
from lfdist.select import select_plan
from lfdist.select.salf import explain
from lfdist.select.salf_halving import candidates, end_gap, pick, survivors
from tests.helpers import fake_probe

INFO = fake_probe().model_info  # 8 blocks: one token trains split k for 1600 + 400 (8 - k)
TC = TrainConfig(steps=600, batch_size=2, nproc=2, lr=1e-3, warmup_steps=60)


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def data():
    train, _, _ = load_task_data("synthetic:lm:200", "lm", ByteTokenizer(), 32)
    return {k: v[:48] for k, v in train.items()}


def test_candidates_follow_the_trace():
    # trace pick 0 (G(1) < 0.98): k = 0, the split one deeper, and every k whose trainable
    # blocks carry half the fall; k = 5 (one block of 6) never
    assert candidates([1.0, 0.95, 0.9, 0.6, 0.4, 0.1], 0) == [0, 1, 2, 3]
    assert candidates([1.0, 1.0, 1.0, 1.0, 0.99, 0.5], 4) == [0, 1, 2, 3, 4]
    # 30 blocks whose trace keeps its fall high everywhere: six, spread on trainable depth,
    # the reference and the trace's pick kept
    many = candidates([1.0] * 29 + [0.9], 10)
    assert len(many) == 6 and many[0] == 0 and 10 in many and max(many) == 28


def test_end_gap_reads_the_trend_along_steps():
    assert end_gap([(8, 0.2)], 1000) == 0.2  # one round: as measured
    assert end_gap([(8, -0.01)], 1000) == 0.0  # never below the reference
    # gamma 0.5 from 8 and 16 steps to 1000: reach = (16^-.5 - 1000^-.5) / (8^-.5 - 16^-.5)
    reach = (0.25 - 1000**-0.5) / (8**-0.5 - 0.25)
    assert end_gap([(8, 0.2), (16, 0.1)], 1000) == 0.0  # shrinking by half: caught up
    assert end_gap([(8, 0.10), (16, 0.09)], 1000) == pytest.approx(0.09 - 0.01 * reach)
    assert end_gap([(8, 0.01), (16, 0.02)], 1000) == pytest.approx(0.02 + 0.01 * reach)
    assert end_gap([(8, 0.1), (16, 0.05)], 16) == 0.05  # the run is no longer: as measured


def _round(steps, errors: dict[int, float]) -> dict:
    return {"steps": steps, "candidates": list(errors), "errors": list(errors.values())}


def test_survivors_and_pick_in_the_decisions_terms():
    tol = math.log1p(0.01)  # an lm gap of exactly 1% perplexity
    r1 = _round(4, {0: 3.0, 1: 3.0 + tol / 2, 2: 3.0 + 0.5, 4: 3.0 + 0.3, 6: 3.0 + 0.9})
    # inside the tolerance and cheapest first (k = 1), then by gap (4 before 2 before 6)
    assert survivors("lm", [r1], 1000, 0.01) == [0, 1, 4]
    assert pick("lm", [r1], 1000, 0.01)[0] == 1
    # k = 4's gap halves from 4 to 8 steps: read at 1000 steps it has caught up, so it is the
    # cheapest inside; k = 1 stays inside but costs more
    r2 = _round(8, {0: 2.5, 1: 2.5 + tol / 2, 4: 2.5 + 0.15})
    k, gaps = pick("lm", [r1, r2], 1000, 0.01)
    assert k == 4 and gaps[4] == 0.0 and gaps[1] == pytest.approx(tol / 2)
    # classifiers: gaps in accuracy points (1 point = 0.01 of error)
    c = _round(4, {0: 0.10, 3: 0.105, 4: 0.2})
    assert pick("classify", [c], 100, 1.0)[0] == 3
    assert pick("classify", [_round(4, {0: 0.1, 4: 0.2})], 100, 1.0)[0] == 0  # none inside


def test_halving_counts():
    assert halving_counts(2) == [2, 2]  # two rounds: a trend along steps
    assert halving_counts(4) == [4, 3, 2]
    assert halving_counts(5) == [5, 3, 2]
    assert halving_counts(6) == [6, 4, 3, 2]


def test_plan_halving_by_hand():
    tc = TrainConfig(steps=1000, batch_size=1, nproc=1)
    # allowed 5% of 1000 x 2400 = 120000; probe 10 x 1600. k = 0, 2, 4, 6 (4800, 4000, 3200,
    # 2400 per example) in rounds of 4 -> 3 -> 2, priced as if the dearest survive:
    # s (14400 + 2 x 12000 + 4 x 8800) = 73600 s, + 10 held-out passes of 4 x 1600 -> s < 2:
    # drop the most crowded (k = 2: depths 8/4 vs 6/2), then 3 -> 2: 26400 s + 6 x 6400
    plan = plan_halving(INFO, tc, [0, 2, 4, 6], {0}, Sizing(1, 100, 4, 10, min_share=0))
    assert plan["candidates"] == [0, 4, 6] and plan["counts"] == [3, 2]
    assert plan["lengths"] == [2, 4] and plan["flops_planned"] == 2 * 26400 + 6 * 6400
    assert plan["planned_fraction"] == pytest.approx((16000 + 91200) / 2_400_000)
    assert "halving rounds of 2, 4 steps over frozen splits k = 0, 4, 6" in plan["budget_note"]
    long = plan_halving(
        INFO,
        TrainConfig(steps=10000, batch_size=1, nproc=1),
        [0, 2, 4, 6],
        {0},
        Sizing(1, 100, 4, 10, min_share=0),
    )
    assert long["candidates"] == [0, 2, 4, 6] and long["lengths"] == [15, 30, 60]
    short = plan_halving(
        INFO, TrainConfig(steps=100, batch_size=1, nproc=1), [0, 6], {0}, Sizing(1, 100, 4, 10)
    )
    assert short["lengths"] == [] and "fewer than 2" in short["skipped"]


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_rounds_train_the_runs_step_and_salf_picks_from_them(tmp_path, data):
    model = build_tiny("llama", "lm")
    before = _state(model)
    rule = partial(survivors, "lm", run_steps=TC.steps, tolerance=0.01)
    lines: list[str] = []
    args = dict(ks=[0, 2, 4, 6], keep={0}, survivors=rule, steps=2, heldout_samples=8)
    rec = run_halving(model, data, "lm", TC, log=lines.append, **args)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert [r["steps"] for r in rec["rounds"]] == [2, 4, 8]
    assert [len(r["candidates"]) for r in rec["rounds"]] == [4, 3, 2]
    assert all(r["candidates"][0] == 0 for r in rec["rounds"])
    for a, b in zip(rec["rounds"], rec["rounds"][1:]):  # who continued is salf's rule
        assert b["candidates"] == rule(rec["rounds"][: rec["rounds"].index(a) + 1])
    assert len(lines) == 4 and lines[1].startswith("halving round 1/3, 2 steps: held-out loss k=0:")
    assert rec["flops_total"] <= rec["flops_planned"]
    again = run_halving(model, data, "lm", TC, log=quiet, **args)
    assert [r["errors"] for r in again["rounds"]] == [r["errors"] for r in rec["rounds"]]

    result = run_probe(model, data, "lm", samples=16, progress=False)
    loaded = load_probe(attach(result, "halving", rec).save(str(tmp_path)))
    # 8-step pilots of a 600-step run are under 10% of it: salf's default reads the trace, and
    # says why; asked for, halving decides
    default = select_plan(loaded, "salf")
    assert default.scores["estimator"] == "trace"
    assert explain(default.scores)[1] == (
        "salf used its forward-only trace: halving pilots ran, but the longest was 8 of the run's "
        "600 steps (1.3%, under 10%); pilots that short measure how fast training starts, not "
        "where it ends"
    )
    plan = select_plan(loaded, "salf", options={"estimator": "halving"})
    sc = plan.scores
    k, _ = pick("lm", rec["rounds"], TC.steps, 0.01)
    assert sc["estimator"] == "halving" and plan.boundary == k == sc["split"]
    assert sc["halving"]["rounds"][0]["candidates"] == [0, 2, 4, 6]
    text = explain(sc)
    assert text[0].startswith("salf (halving): ")
    assert text[2].startswith(
        "salf halving rounds (k = frozen blocks, 0 = full fine-tuning): 2 steps on k = 0,2,4,6 -> "
    )
    with pytest.raises(UserError, match="decision=budget needs a quality estimate"):
        select_plan(
            loaded,
            "salf",
            budget={"flops": 0.9},
            options={"estimator": "halving", "decision": "budget"},
        )


def test_halving_is_refused_without_rounds(tmp_path, data):
    model = build_tiny("llama", "lm")
    result = run_probe(model, data, "lm", samples=16, progress=False)
    loaded = load_probe(result.save(str(tmp_path)))
    with pytest.raises(UserError, match="estimator=halving needs halving rounds"):
        select_plan(loaded, "salf", options={"estimator": "halving"})


def test_probe_runs_halving_when_asked(tmp_path):
    """`probe.pilots=true probe.pilot_kind=halving`: candidates from the probe's own trace,
    rounds of probe.pilot_steps (on a 40-step run, so that they reach 10% of it and salf reads
    them by default), the grid pilots' record says why it did not run."""
    from lfdist import pipeline
    from lfdist.config import config_from_dict

    cfg = config_from_dict(
        {
            "model": {"spec": "tiny:llama"},
            "data": {"spec": "synthetic:lm:200", "seq_len": 32},
            "probe": {
                "samples": 16,
                "pilots": True,
                "pilot_kind": "halving",
                "pilot_steps": 2,
            },
            "train": {"engine": "single", "steps": 40, "batch_size": 2, "lr": 1e-3},
        }
    )
    result = pipeline.probe(cfg, str(tmp_path / "probe.json"), progress=False)
    rec = result.curves["halving"]
    assert rec["rounds"] and rec["candidates"][0] == 0
    assert result.curves["pilot"]["skipped"] == "the halving estimator ran instead"
    plan = select_plan(load_probe(str(tmp_path / "probe.json")), "salf")
    assert rec["lengths"][0] == 2 and rec["lengths"][-1] >= 4
    assert plan.scores["estimator"] == "halving" and plan.scores["cost_fraction"] > 0
    with pytest.raises(UserError, match="probe.pilot_kind=.grids. is not allowed"):
        config_from_dict({"model": {"spec": "tiny:llama"}, "probe": {"pilot_kind": "grids"}})
    with pytest.raises(UserError, match=r"probe.pilot_min_share must be in \[0, 1\), got 1.0"):
        config_from_dict({"model": {"spec": "tiny:llama"}, "probe": {"pilot_min_share": 1.0}})
