"""Pilot fine-tunes (salf estimator pilot, critical): the run's own training step, sizing to
the budget, restoration, determinism, probe.json."""

from __future__ import annotations

import pytest
import torch

from lfdist.config import TrainConfig
from lfdist.data import load_task_data
from lfdist.errors import UserError
from lfdist.model.tiny import build_tiny
from lfdist.model.tokenizer import ByteTokenizer
from lfdist.probe import load_probe, run_probe
from lfdist.probe.pilot import (
    attach,
    pilot_depths,
    pilot_recipe,
    plan_pilots,
    run_critical,
    run_pilots,
    split_calibration,
)
from lfdist.probe.pilot_budget import Sizing
from lfdist.select import select_plan
from lfdist.train.local import train_split
from tests.helpers import fake_probe

# the pilots train in one process on the run's global batch of 4
TC = TrainConfig(steps=600, batch_size=2, nproc=2, lr=1e-3, warmup_steps=60)


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def data():
    train, _, _ = load_task_data("synthetic:lm:200", "lm", ByteTokenizer(), 32)
    return {k: v[:48] for k, v in train.items()}


def _state(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def _same(model, state) -> bool:
    return all(
        torch.equal(p, state[n][0]) and p.requires_grad == state[n][1] and p.grad is None
        for n, p in model.named_parameters()
    )


def test_pilot_depths():
    assert pilot_depths("auto", 8) == [1, 2, 4, 8]
    assert pilot_depths("auto", 30) == [1, 2, 4, 8, 16, 30]
    assert pilot_depths("auto", 1) == [1]
    assert pilot_depths("4,1,2", 8) == [1, 2, 4]
    for bad in ("0,2", "1,9", "x"):
        with pytest.raises(UserError, match="pilot_depths"):
            pilot_depths(bad, 8)


def test_split_calibration_is_disjoint(data):
    train, held = split_calibration(data, heldout_samples=5)
    assert len(held["input_ids"]) == 5 and len(train["input_ids"]) == 43
    # evenly spread over all 48 (the middle of each fifth), not the first 5 of every 4th
    assert torch.equal(held["input_ids"], data["input_ids"][[4, 14, 24, 33, 43]])


def test_pilot_recipe_is_the_run_on_one_process():
    r = pilot_recipe(TC, 8)
    assert (r.steps, r.batch_size, r.nproc, r.warmup_steps, r.lr) == (8, 4, 1, 1, 1e-3)


INFO = fake_probe().model_info  # 8 blocks of 100, embeddings 100: one token trains the top n
# blocks for 1600 + 400 n FLOPs (n = 2: 2400) and runs forward for 1600


def test_plan_pilots_by_hand():
    tc = TrainConfig(steps=1100, batch_size=1, nproc=1)
    # allowed 5% of 1100 steps x 2400 = 132000; probe 10 x 1600 = 16000; held-out passes of
    # 4 x 1600 = 6400 (one for the pre-trained model, two per depth). Depths 1,2,4,8: 1.5 s x
    # (2000+2400+3200+4800) + 9 x 6400 fits s = 3.1 < 4: drop 2 (4/1 ties 8/2: the first);
    # 1,4,8: 1.5 s x 10000 + 7 x 6400 -> s = 4.75 -> pilots of 2 and 4 steps
    plan = plan_pilots(INFO, tc, [1, 2, 4, 8], Sizing(1, 100, 4, 10, min_share=0.0))
    assert plan["depths"] == [1, 4, 8] and plan["lengths"] == [2, 4]
    assert plan["flops_total"] == 6 * 10000 + 7 * 6400  # 104800
    assert plan["probe_flops"] == 16000
    assert plan["planned_fraction"] == pytest.approx(120800 / 2_640_000)
    assert (
        "allowed pilots of 2 and 4 steps at depths 1,4,8, scored on 4 held-out"
        in (plan["budget_note"])
    )
    short = plan_pilots(
        INFO, TrainConfig(steps=100, batch_size=1, nproc=1), [1, 8], Sizing(1, 100, 4, 10)
    )
    assert short["lengths"] == [] and "fewer than 4" in short["skipped"]
    explicit = plan_pilots(INFO, tc, [1, 8], Sizing(1, 100, 4, 10, steps=10))
    assert explicit["lengths"] == [5, 10] and "skipped" not in explicit
    # 3000 steps allow 360000; 3 pilots at 64 held-out examples pay 7 x 64 x 1600 = 716800 for
    # their held-out passes alone, at 32 still 358400; at 16: (360000 - 179200) / 13800 -> 13
    halved = plan_pilots(
        INFO,
        TrainConfig(steps=3000, batch_size=1, nproc=1),
        [1, 2, 8],
        Sizing(1, 400, 64, 0, min_share=0),
    )
    assert (halved["heldout_examples"], halved["lengths"]) == (16, [6, 13])
    assert halved["depths"] == [1, 2, 8]
    # by default, pilots of 4 steps are not worth 5% of an 1100-step run: under 10% of it
    unread = plan_pilots(INFO, tc, [1, 2, 4, 8], Sizing(1, 100, 4, 10))
    assert unread["lengths"] == [] and unread["skipped"] == (
        "the 5% budget of a 1100-step run allows pilots of at most 4 steps (0.4% of it), and "
        "pilots under 10% of the run measure how fast training starts, not where it ends; raise "
        "probe.pilot_budget or set probe.pilot_steps to run them"
    )


def test_pilots_are_the_runs_own_step_and_restore_the_model(data):
    model = build_tiny("llama", "lm")
    model.train()
    for p in model.parameters():  # an odd starting state that must come back as it was
        p.requires_grad_(False)
    state = _state(model)
    rec = run_pilots(model, data, "lm", TC, "2,8", 8, heldout_samples=8, log=quiet)
    assert _same(model, state) and model.training
    assert rec["depths"] == [2, 8] and rec["lengths"] == [4, 8]
    assert (rec["train_examples"], rec["heldout_examples"], rec["run_steps"]) == (40, 8, 600)
    assert rec["lr"] == 1e-3 and rec["seq_len"] == 32
    # the depth-2 pilot of 8 steps is train_split with the run's recipe, number for number
    train, held = split_calibration(data, 8)
    ref = train_split(
        model, ["frozen"] * 6 + ["full"] * 2, train, held, "lm", pilot_recipe(TC, 8), TC.seed
    )
    assert rec["quality"][1][0] == ref["quality"] and rec["train_losses"][0][1] == ref["losses"]
    assert rec["errors"][1][0] == ref["quality"]["loss"]
    # the pilots trained: 8 steps end lower than 4, and both below the pre-trained model
    for i in range(2):
        assert rec["base_error"] > rec["errors"][0][i] > rec["errors"][1][i]
    again = run_pilots(model, data, "lm", TC, "2,8", 8, heldout_samples=8, log=quiet)
    assert again["errors"] == rec["errors"]


def test_pilots_log_one_line_per_stage(data):
    lines: list[str] = []
    run_pilots(build_tiny("llama", "lm"), data, "lm", TC, "1,8", 8, log=lines.append)
    assert (
        len(lines) == 3
        and "pilot_steps=8 (not sized to the budget) gave pilots of 4 and 8" in (lines[0])
    )
    assert lines[1].startswith("pilot 1/2: top 1 blocks") and lines[2].startswith("pilot 2/2")
    skipped: list[str] = []
    tc = TrainConfig(steps=20, batch_size=2, nproc=2)
    rec = run_pilots(build_tiny("llama", "lm"), data, "lm", tc, log=skipped.append)
    assert "skipped" in rec and skipped == [f"pilots: skipped, {rec['skipped']}"]


def test_pilots_and_critical_in_probe_json(tmp_path, data):
    model = build_tiny("llama", "lm")
    state = _state(model)
    result = run_probe(model, data, "lm", samples=16, progress=False)
    long_run = TrainConfig(steps=3000, batch_size=2, nproc=2, lr=1e-3)  # room for 4 depths
    record = run_pilots(model, data, "lm", long_run, probe_examples=16, log=quiet, min_share=0.0)
    assert record["depths"] == [1, 2, 4, 8] and "skipped" not in record
    lines: list[str] = []
    crit = run_critical(model, data, "lm", TC, steps=3, log=lines.append)
    assert lines[0] == "critical: training all 8 blocks for 3 steps" and len(lines) == 2
    assert _same(model, state)
    assert len(crit["train_losses"]) == 3 and crit["batch_size"] == 4
    assert all(v > 0 for v in crit["l1"]) and all(0 < v < 0.5 for v in crit["angular"])
    attach(attach(result, "pilot", record), "critical", crit)
    assert result.timings["pilot_s"] == pytest.approx(sum(record["seconds"]))
    loaded = load_probe(result.save(str(tmp_path)))
    assert loaded.curves["pilot"] == record and loaded.curves["critical"] == crit
    # the probe ran them whatever their length (min_share=0), so salf reads them by default
    assert select_plan(loaded, "salf").scores["estimator"] == "pilot"
    plan = select_plan(loaded, "salf", options={"estimator": "pilot"})
    assert (
        plan.scores["estimator"] == "pilot"
        and plan.scores["pilot"]["measured"] == (record["errors"])
    )
    assert plan.scores["predicted"]["metric"] == "perplexity"
    assert 0 < plan.scores["cost_fraction"] < 0.05
    ranked = sorted(range(8), key=lambda i: (-crit["l1"][i], -i))[:2]
    assert select_plan(loaded, "critical").trainable_blocks == sorted(ranked)


def test_classifier_pilots_measure_accuracy():
    model = build_tiny("bert", "classify", num_labels=3)
    g = torch.Generator().manual_seed(0)
    data = {
        "input_ids": torch.randint(0, 250, (48, 12), generator=g),
        "labels": torch.arange(48) % 3,
    }
    rec = run_pilots(
        model, data, "classify", TC, depths="1,2", heldout_samples=12, log=quiet, min_share=0
    )
    assert rec["metric"] == "accuracy" and rec["base_error"] is None
    for j in range(2):
        for i in range(2):
            q = rec["quality"][j][i]
            assert q["examples"] == 12 and rec["errors"][j][i] == 1.0 - q["accuracy"]
            assert q["accuracy"] * 12 == round(q["accuracy"] * 12)  # a count of 12 examples
