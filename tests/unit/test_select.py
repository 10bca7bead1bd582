"""Strategies and budgets on hand-built statistics where the right answer is known."""

from __future__ import annotations

import pytest

from lfdist.errors import UserError
from lfdist.plan import Plan, load_plan, save_plan
from lfdist.probe import ProbeResult
from lfdist.select import select_plan
from lfdist.select.registry import strategy_names
from lfdist.select.salf import explain, trace_gain, within
from lfdist.select.salf_fit import ALPHA_GRID, along_steps, fit_saturating, line_fit
from tests import helpers

L = 8


def fake_probe(deviation=None, gradnorm=None, head=0) -> ProbeResult:
    """8 blocks of 100 elements, embeddings 100: a block is 1/9 of the model (1/10 with head=100)."""
    return helpers.fake_probe(deviation, head=head, gradnorm=gradnorm)


def trained(plan: Plan) -> list[int]:
    return plan.trainable_blocks


# ddp, one rank, fp32, one token, H=1: bytes = 900·4 params + n·100·(4 + 8) + n·34·1·1·4/2 acts
COST = {"engine": "ddp", "world_size": 1, "batch_size": 1, "seq_len": 1, "dtype": "float32"}


def gib_for(n: int) -> float:
    return (3600 + n * 1200 + n * 68) / 2**30


def test_all_strategies_registered():
    assert strategy_names() == [
        "all",
        "bottom",
        "critical",
        "gradnorm",
        "lisa",
        "lora",
        "mask",
        "random",
        "salf",
        "spafit",
        "top",
    ]


def test_top_bottom_all_random():
    p = fake_probe()
    assert trained(select_plan(p, "top")) == [4, 5, 6, 7]  # default: half
    assert trained(select_plan(p, "top", options={"n": 3})) == [5, 6, 7]
    assert trained(select_plan(p, "bottom", options={"n": 3})) == [0, 1, 2]
    assert trained(select_plan(p, "all")) == list(range(L))
    # Python's random.Random(7).sample(range(8), 3) draws 5, 1, 3 (the same on every platform)
    plan = select_plan(p, "random", options={"n": 3, "seed": 7})
    assert trained(plan) == [1, 3, 5] and plan.options["seed"] == 7
    assert trained(select_plan(p, "random", options={"n": 3, "seed": 7})) == [1, 3, 5]  # seeded
    # a budget drops the last drawn first
    assert trained(select_plan(p, "random", {"blocks": 2}, {"n": 3, "seed": 7})) == [1, 5]
    assert trained(select_plan(p, "random", options={"n": 3, "seed": 8})) != [1, 3, 5]


def test_gradnorm_picks_largest_ratios():
    ratio = [0.1, 0.5, 0.2, 0.9, 0.3, 0.9, 0.05, 0.4]
    plan = select_plan(fake_probe(gradnorm=ratio), "gradnorm", options={"n": 3})
    assert trained(plan) == [1, 3, 5]
    assert [b.score for b in plan.blocks] == ratio and plan.scores["gradnorm"] == ratio
    # the budget drops the weakest first; ties keep the deeper block
    assert trained(
        select_plan(fake_probe(gradnorm=ratio), "gradnorm", {"blocks": 1}, {"n": 3})
    ) == [5]
    with pytest.raises(UserError, match="gradnorm"):
        select_plan(fake_probe(), "gradnorm")


@pytest.mark.parametrize(
    "strategy,options,budget,expected",
    [
        ("top", {}, {"blocks": 2}, [6, 7]),
        ("top", {}, {"params": 0.3}, [6, 7]),  # 100n/900 <= 0.3 -> n = 2
        ("top", {}, {"flops": 0.5}, [6, 7]),  # (2 + 4n/8)/6 <= 0.5 -> n <= 2
        ("top", {}, {"blocks": 3, "params": 0.3}, [6, 7]),  # both hold
        ("top", COST, {"gib": gib_for(2)}, [6, 7]),
        ("top", COST, {"gib": gib_for(3) * 0.999}, [6, 7]),
        ("all", {}, {"params": 0.45}, [4, 5, 6, 7]),  # freezes from the bottom
        ("bottom", {"n": 3}, {"blocks": 2}, [0, 1]),  # keeps its own preference, the lowest
        # bottom trains blocks 0..n-1, so backward runs through all 8: (3200 + 200n)/4800 <= 0.75 -> n <= 2
        ("bottom", {}, {"flops": 0.75}, [0, 1]),
    ],
)
def test_budgets_trim_in_preference_order(strategy, options, budget, expected):
    plan = select_plan(fake_probe(), strategy, budget, options)
    assert trained(plan) == expected
    assert plan.budget == budget


def test_budget_with_cost_keys_in_the_budget_dict():
    plan = select_plan(fake_probe(), "top", {"gib": gib_for(1), **COST})
    assert trained(plan) == [7]
    assert plan.predicted["engine"] == "ddp" and plan.predicted["gib_per_rank"] == pytest.approx(
        gib_for(1)
    )


@pytest.mark.parametrize(
    "strategy,budget,options,message",
    [
        (
            "top",
            {"params": 0.1},
            {},
            "budget params=0.1 is infeasible: the smallest plan that trains one block needs params>=0.112",
        ),
        ("top", {"blocks": 0}, {}, "needs blocks>=1"),
        ("top", {"flops": 0.3}, {}, "needs flops>=0.417"),  # (2 + 4/8)/6 = 0.41667
        ("bottom", {"flops": 0.5}, {}, "needs flops>=0.709"),  # (3200 + 200)/4800 = 0.70833
        ("top", {"gib": 1e-6}, COST, "needs gib>=4.54e-06"),  # gib_for(1) = 4.5337e-06, rounded up
        ("salf", {"flops": 0.3}, {"decision": "budget"}, "needs flops>=0.417"),
    ],
)
def test_infeasible_budget_names_the_smallest_feasible_value(strategy, budget, options, message):
    with pytest.raises(UserError) as e:
        select_plan(fake_probe(), strategy, budget, options)
    assert message in str(e.value)


def test_unknown_budget_key_and_option():
    with pytest.raises(UserError, match="budget keys: blocks, params, gib, flops"):
        select_plan(fake_probe(), "top", {"memory": 3})
    with pytest.raises(UserError, match="has no option 'm'; its options: n"):
        select_plan(fake_probe(), "top", options={"m": 1})
    with pytest.raises(UserError, match="1..8"):
        select_plan(fake_probe(), "top", options={"n": 9})
    with pytest.raises(UserError, match="unknown strategy"):
        select_plan(fake_probe(), "nope")


# --- SALF, estimator trace: gains and picks computed by hand ---

FALLING = [5, 5, 5, 5, 5, 4, 3, 2, 1]  # flat, then falls: G = 1,1,1,1,1,.75,.5,.25
LINEAR = [8, 7, 6, 5, 4, 3, 2, 1, 0]  # G(k) = (8 - k)/8
LATE = [5] * 8 + [1]  # only the last block moves: G = 1 everywhere
BUMPY = [5, 6, 5, 5, 4, 4, 2, 2, 1]  # running max 6,6,5,5,4,4,2,2: G = 1,1,.8,.8,.6,.6,.2,.2
RISING = list(range(1, 10))  # no fall: uniform fallback G = (8 - k)/8


def test_trace_gain_by_hand():
    assert trace_gain(FALLING) == ([1, 1, 1, 1, 1, 0.75, 0.5, 0.25], False)
    assert trace_gain(LINEAR)[0] == [(8 - k) / 8 for k in range(8)]
    assert trace_gain(BUMPY)[0] == pytest.approx([1, 1, 0.8, 0.8, 0.6, 0.6, 0.2, 0.2])
    assert trace_gain(RISING) == ([(8 - k) / 8 for k in range(8)], True)


def test_trace_leaves_out_a_constant_latent_space():
    # An encoder classifier's [CLS] h_0 is the same in every example: chance (ln 5) by
    # construction. Read as a deviation it makes block 0 carry the fall and salf keep every block.
    d = [1.6094, 1.0958, 1.2909, 0.9821, 1.2603, 1.5604, 1.3952]  # MiniLM on BBC (probe)
    assert trace_gain(d)[0][1] == pytest.approx(0.771, abs=1e-3)
    assert trace_gain(d, [0])[0] == [1.0] * 6
    probe = helpers.fake_probe(d, n_blocks=6, constant_spaces=[0])
    plan = select_plan(probe, "salf")
    assert plan.boundary == 4 and plan.scores["constant_spaces"] == [0]
    assert "h_0 is the same in every example" in " ".join(explain(plan.scores))
    assert select_plan(helpers.fake_probe(d, n_blocks=6), "salf").boundary == 0


def test_constant_spaces_from_the_statistics():
    import torch

    from lfdist.probe.deviation import constant_spaces
    from lfdist.probe.stats import ProbeStats

    s = ProbeStats.empty("classify", 3, 4, num_labels=2)
    same = torch.tensor([[0.5, -1.0, 2.0, 0.0]] * 5)
    for layer, h in enumerate([same, torch.randn(5, 4), same * 3]):
        s.add_latent(layer, h)
    assert constant_spaces(s) == [0, 2]


def salf_k(deviation, budget=None, **options) -> int:
    plan = select_plan(fake_probe(deviation), "salf", budget, options)
    assert plan.trainable_blocks == list(range(plan.boundary, L))  # always a frozen prefix
    return plan.boundary


@pytest.mark.parametrize(
    "trace,options,k",
    [
        (FALLING, {}, 4),  # target: last k with G >= 0.98
        (LINEAR, {}, 0),  # G(1) = 0.875 < 0.98
        (LINEAR, {"epsilon": 0.3}, 2),  # (8 - k)/8 >= 0.7 -> k <= 2.4
        (BUMPY, {}, 1),
        (RISING, {}, 0),
        (FALLING, {"decision": "ratio"}, 4),  # G/C: k=4 -> 1/(4/6) = 1.5, k=5 -> .75/(3.5/6) = 1.29
        (LINEAR, {"decision": "ratio"}, 0),  # 1.5n/(4 + n) grows with n = 8 - k
        (LATE, {}, 6),  # target would take k = 7: never L-1 unless forced
        (LATE, {"decision": "ratio"}, 6),
    ],
)
def test_salf_decisions_by_hand(trace, options, k):
    assert salf_k(trace, **options) == k


def test_salf_budget_decision():
    # flops (2 + 4(8-k)/8)/6 <= 0.5 -> k >= 6; best G among k = 6, 7 is G(6) = 0.5
    assert salf_k(FALLING, {"flops": 0.5}, decision="budget") == 6
    assert salf_k(LINEAR, {"blocks": 5}, decision="budget") == 3  # k >= 3 fits; G falls with k
    # G ties at 1 for every k <= 4: the cheapest of them
    assert salf_k(FALLING, {"blocks": 5}, decision="budget") == 4
    assert salf_k(LATE, {"blocks": 1}, decision="budget") == 7  # forced by the budget
    assert salf_k(LATE, {"blocks": 1}) == 7  # target, then trimmed by the budget
    with pytest.raises(UserError, match="needs a budget"):
        salf_k(FALLING, decision="budget")


def test_salf_options_and_scores():
    plan = select_plan(fake_probe(FALLING), "salf")
    assert plan.scores["gain"] == [1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    assert plan.scores["deviation"] == FALLING and plan.scores["split"] == 4
    assert plan.scores["cost"][0] == 1.0 and plan.scores["knee"] == 4
    assert plan.options["estimator"] == "trace" and plan.options["epsilon"] == 0.02
    for options, message in [
        ({"estimator": "pilot"}, "estimator=trace"),
        ({"decision": "x"}, "target"),
        ({"epsilon": 2}, "epsilon"),
    ]:
        with pytest.raises(UserError, match=message):
            select_plan(fake_probe(FALLING), "salf", options=options)


# --- SALF, estimator pilot: the saturating law, the step extrapolation, the decision ---

ALPHA = ALPHA_GRID[39]  # 0.05 * 1.1^39 = 2.0568, on the grid the fit searches


def sat(n: int) -> float:
    """A classifier's error after training the top n blocks: 0.05 + 0.2 n^-2.0568."""
    return 0.05 + 0.2 * n**-ALPHA


def pilot_record(errors, depths=(1, 2, 4, 8), lengths=(10,), run_steps=10, **extra) -> dict:
    return {
        "depths": list(depths),
        "lengths": list(lengths),
        "errors": [list(e) for e in errors],
        "run_steps": run_steps,
        "metric": "accuracy",
        **extra,
    }


def salf_pilot(record, budget=None, **options):
    options.setdefault("estimator", "pilot")  # asked for: the default also weighs their length
    plan = select_plan(helpers.fake_probe(pilot=record), "salf", budget, options)
    assert plan.trainable_blocks == list(range(plan.boundary, L))
    return plan


def test_salf_reads_pilots_by_default_only_when_long_enough():
    from lfdist.select.salf import default_estimator

    errors = [[0.3, 0.2, 0.1, 0.1], [0.2, 0.1, 0.1, 0.1]]
    long_enough = pilot_record(errors, lengths=(8, 16), run_steps=160)
    assert default_estimator({"pilot": long_enough}, None) == ("pilot", None)
    short = pilot_record(errors, lengths=(5, 10), run_steps=160)
    name, why = default_estimator({"pilot": short}, None)
    assert name == "trace" and "the longest was 10 of the run's 160 steps (6.2%" in why
    assert default_estimator({"pilot": short}, 100)[0] == "pilot"  # a shorter run, priced
    plan = select_plan(helpers.fake_probe(pilot=short), "salf")
    assert plan.scores["estimator"] == "trace" and plan.scores["pilots_not_read"] == why
    assert default_estimator({}, None) == ("trace", None)


def test_saturating_fit_recovers_the_law():
    fit = fit_saturating([1, 2, 4, 8], [sat(n) for n in (1, 2, 4, 8)])
    assert fit["alpha"] == ALPHA and fit["dof"] == 1
    assert fit["l_inf"] == pytest.approx(0.05, abs=1e-12) and fit["B"] == pytest.approx(0.2)
    assert fit["rss"] == pytest.approx(0.0, abs=1e-20)
    # errors that rise with depth: B >= 0 keeps it flat at their mean
    flat = fit_saturating([1, 2, 4], [0.1, 0.2, 0.3])
    assert (flat["B"], flat["l_inf"]) == (0.0, pytest.approx(0.2))
    assert flat["rss"] == pytest.approx(0.02)
    assert line_fit([0.0, 1.0], [1.0, 3.0]) == (1.0, 2.0, 0.0)


def test_along_steps_by_hand():
    # lengths 4 and 16, run 64, gamma 0.5: reach = (1/4 - 1/8) / (1/2 - 1/4) = 0.5
    errors = {4: [0.5, 0.4, 0.3], 16: [0.4, 0.32, 0.26]}
    # deepest: 0.26 + (0.26 - 0.30) * 0.5 = 0.24; gaps 0.2 -> 0.14 -> 0.11; 0.1 -> 0.06 -> 0.04
    assert along_steps(errors, [4, 16], 64) == pytest.approx([0.35, 0.28, 0.24])
    # a gap that shrinks fast settles at 0, never below
    assert along_steps({4: [0.9, 0.3], 16: [0.35, 0.26]}, [4, 16], 64) == pytest.approx(
        [0.24, 0.24]
    )
    assert along_steps(errors, [16], 64) == [0.4, 0.32, 0.26]  # one length: read as measured
    assert along_steps(errors, [4, 16], 16) == [0.4, 0.32, 0.26]  # the run is no longer


def test_tolerance_in_the_users_metric():
    assert within("lm", 2.0099, 2.0, 0.01) and not within("lm", 2.0100, 2.0, 0.01)  # ln 1.01
    assert within("classify", 0.109, 0.1, 1.0) and not within("classify", 0.111, 0.1, 1.0)


@pytest.mark.parametrize(
    "tolerance,k",
    [
        # e(n) - e(8) = 0.2 (n^-2.0568 - 0.01389): n = 4: 0.0088, n = 3: 0.0181, n = 2: 0.0453
        (None, 4),  # default 1 accuracy point: n = 4
        (2.0, 5),  # n = 3
        (5.0, 6),  # n = 2
        (30.0, 6),  # n = 1 would do (0.197), but never L-1 unless forced
        (0.0, 0),
    ],
)
def test_salf_pilot_target_by_hand(tolerance, k):
    options = {} if tolerance is None else {"tolerance": tolerance}
    plan = salf_pilot(pilot_record([[sat(n) for n in (1, 2, 4, 8)]]), **options)
    assert plan.boundary == k and plan.scores["estimator"] == "pilot"


def test_salf_pilot_scores_and_interval():
    from lfdist.report import plan_table

    plan = salf_pilot(pilot_record([[sat(n) for n in (1, 2, 4, 8)]], noise=0.01))
    pred = plan.scores["predicted"]
    assert pred["metric"] == "accuracy" and plan.scores["tolerance"] == 1.0
    assert pred["pick"] == pytest.approx(0.95 - 0.2 * 4**-ALPHA)  # 0.93846
    assert pred["full"] == pytest.approx(0.95 - 0.2 * 8**-ALPHA)  # 0.94722
    # the fit leaves no residual: the interval is 2 x the measurement noise 0.01
    assert pred["pick_interval"] == pytest.approx([pred["pick"] - 0.02, pred["pick"] + 0.02])
    assert plan.options["tolerance"] == 1.0 and plan.options["estimator"] == "pilot"
    lines = plan_table(plan).splitlines()[-3:]
    assert lines[1].startswith(
        "salf (pilot): freezes 4 blocks; predicted end-of-run accuracy 93.8% (interval "
        "91.8%..95.8%) vs full fine-tuning 94.7%, tolerance 1 accuracy point(s)"
    )


def test_salf_pilot_extrapolates_to_the_run():
    # at 5 and 10 steps shallow pilots trail; their gaps shrink with steps (gamma 0.5: reach to
    # 160 steps = (10^-.5 - 160^-.5) / (5^-.5 - 10^-.5) = 1.8107), so the run catches up
    short = [0.30, 0.20, 0.12, 0.10]
    longer = [0.20, 0.14, 0.09, 0.08]
    record = pilot_record([short, longer], lengths=(5, 10), run_steps=160)
    at_end = salf_pilot(record).scores["pilot"]["at_run_steps"]
    deep = 0.08 - 0.02 * 1.8107
    gaps = [0.12 - 0.08 * 1.8107, 0.06 - 0.04 * 1.8107, 0.01 - 0.01 * 1.8107]
    assert at_end == pytest.approx([deep + max(0, g) for g in gaps] + [deep], abs=1e-4)
    assert salf_pilot(record, run_steps=10).scores["pilot"]["at_run_steps"] == longer
    # an error rate stays in [0, 1]: a deepest pilot falling 0.6 in 4 steps would go below 0
    steep = pilot_record([[0.9, 0.85, 0.8, 0.8], [0.7, 0.45, 0.25, 0.2]], lengths=(4, 8))
    pred = salf_pilot(steep, run_steps=1000).scores
    assert pred["pilot"]["at_run_steps"][-1] == 0.0 and max(pred["pilot"]["at_run_steps"]) <= 1.0
    assert pred["predicted"]["full"] == 1.0 and pred["predicted"]["pick"] <= 1.0


def test_salf_pilot_cost_fraction():
    # 100 steps of one example; the pick (k = 4, top 4 blocks) costs 3200 per example-step
    record = pilot_record(
        [[sat(n) for n in (1, 2, 4, 8)]],
        flops_total=10000.0,
        probe_flops=6000.0,
        global_batch=1,
        run_flops_per_example=[4800, 4400, 4000, 3600, 3200, 2800, 2400, 2000],
    )
    plan = salf_pilot(record, run_steps=100)
    assert plan.boundary == 4 and plan.scores["cost_fraction"] == pytest.approx(0.05)
    assert plan.scores["probe_pilot_flops"] == 16000.0
    assert explain(plan.scores)[-1] == (
        "salf probe + pilot cost: 5.0% of the 100-step run at global batch 1"
    )


def test_salf_pilot_needs_pilots():
    with pytest.raises(UserError, match="probe.pilots=true"):
        select_plan(fake_probe(FALLING), "salf", options={"estimator": "pilot"})
    skipped = helpers.fake_probe(FALLING, pilot={"skipped": "the 5% budget allows 2 steps"})
    plan = select_plan(skipped, "salf")  # the trace, saying why
    assert plan.scores["estimator"] == "trace" and plan.boundary == 4
    assert plan.scores["pilot_skipped"] == "the 5% budget allows 2 steps"
    with pytest.raises(UserError, match="the 5% budget allows 2 steps"):
        select_plan(skipped, "salf", options={"estimator": "pilot"})
    # the probe's own cost is still reported: 4800 / (10 steps x 3200 for k = 4) = 0.15
    sized = {"skipped": "too short", "probe_flops": 4800.0, "flops_total": 0.0, "global_batch": 1}
    sized["run_flops_per_example"] = [4800, 4400, 4000, 3600, 3200, 2800, 2400, 2000]
    plan = select_plan(helpers.fake_probe(FALLING, pilot=sized), "salf", options={"run_steps": 10})
    assert plan.scores["cost_fraction"] == pytest.approx(0.15)
    sized["budget"] = 0.05
    plan = select_plan(helpers.fake_probe(FALLING, pilot=sized), "salf", options={"run_steps": 10})
    assert explain(plan.scores)[-1] == (
        "salf probe cost: 15.0% of the 10-step run at global batch 1, over the 5% budget: probe "
        "fewer samples or plan a longer run"
    )
    with pytest.raises(UserError, match="tolerance"):
        salf_pilot(pilot_record([[0.1] * 4]), tolerance=-1)


def test_plan_round_trip_with_predictions(tmp_path):
    plan = select_plan(fake_probe(FALLING, head=100), "salf", {"flops": 0.9}, COST)
    assert plan.predicted["flops_fraction"] <= 0.9
    assert plan.fingerprint.n_blocks == L and plan.strategy == "salf"
    save_plan(plan, str(tmp_path / "plan.yaml"))
    assert load_plan(str(tmp_path / "plan.yaml")) == plan


def test_report_table_and_plot(tmp_path):
    from lfdist.report import plan_table, plot_plan

    probe = fake_probe(FALLING, gradnorm=[0.1] * L)
    plan = select_plan(probe, "salf")
    table = plan_table(plan, probe)
    lines = table.splitlines()
    assert lines[0].split() == [
        "#",
        "block",
        "treatment",
        "params",
        "gain",
        "gradnorm",
        "d_out",
        "score",
    ]
    assert lines[2].split()[:4] == ["0", "layers.0", "frozen", "100"]
    legend = lines[2 + L]  # under the rows, once: every score column in words
    assert legend.startswith("columns: gain = the share of the probe's loss fall")
    assert "gradnorm = " in legend and "d_out = the loss read out" in legend
    assert legend.endswith("score = what salf ranked the blocks by")
    assert lines[-2].startswith("strategy salf: 4/8 blocks train, backward stops at block 4")
    assert "saves" in lines[-2]
    assert lines[-1] == (
        "salf (trace, forward only): freezes blocks 0-3: reading your data's loss out of every "
        "layer, 0% of its fall from the embeddings to the output happens in those blocks, so "
        "they add little"
    )
    assert "params" in plan_table(select_plan(probe, "top"))  # works without the probe too
    png = plot_plan(plan, str(tmp_path / "plan.png"), probe)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_salf_lines_follow_the_plan_under_a_budget_and_name_an_unpriced_run():
    sized = {"skipped": "too short", "probe_flops": 4800.0, "flops_total": 0.0, "global_batch": 1}
    sized.update(
        run_steps=20, run_flops_per_example=[4800, 4400, 4000, 3600, 3200, 2800, 2400, 2000]
    )
    probe = helpers.fake_probe(FALLING, pilot=sized)
    plan = select_plan(probe, "salf", budget={"blocks": 2})
    assert plan.scores["split"] == 4 and plan.boundary == 6  # the budget froze two more
    lines = explain(plan.scores, plan.boundary, plan.budget)
    assert lines[1] == (
        "salf's pick froze 4 blocks; the budget (blocks=2) moved the split: the plan freezes 6 "
        "blocks (backward stops at block 6)"
    )
    assert "of the 20-step run at global batch 1 the probe was sized for" in lines[-1]
    assert "select --option run_steps=N" in lines[-1]
