"""Pilot fine-tunes (salf estimator pilot, critical): determinism, restoration, probe.json."""

from __future__ import annotations

import pytest
import torch

from lfdist.data import load_task_data
from lfdist.errors import UserError
from lfdist.model.tiny import build_tiny
from lfdist.model.tokenizer import ByteTokenizer
from lfdist.probe import load_probe, run_probe
from lfdist.probe.pilot import (
    attach,
    pilot_depths,
    run_critical,
    run_pilot,
    run_pilots,
    split_calibration,
)
from lfdist.select import select_plan

STEPS, LR, BATCH = 3, 1e-3, 4


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
    assert torch.equal(held["input_ids"], data["input_ids"][[3, 7, 11, 15, 19]])


def test_pilot_restores_the_model_and_repeats_exactly(data):
    model = build_tiny("llama", "lm")
    model.train()
    for p in model.parameters():  # an odd starting state that must come back as it was
        p.requires_grad_(False)
    state = _state(model)
    train, held = split_calibration(data, 8)
    a = run_pilot(model, train, held, "lm", depth=2, steps=STEPS, lr=LR, batch_size=BATCH)
    assert _same(model, state) and model.training
    b = run_pilot(model, train, held, "lm", depth=2, steps=STEPS, lr=LR, batch_size=BATCH)
    # a fresh replica built by a factory (a Ray task) gives the same numbers
    c = run_pilot(
        lambda: build_tiny("llama", "lm"),
        train,
        held,
        "lm",
        depth=2,
        steps=STEPS,
        lr=LR,
        batch_size=BATCH,
    )
    # the held-out loss of the pre-trained model measured once outside (run_pilots does)
    d = run_pilot(
        model, train, held, "lm", 2, STEPS, LR, batch_size=BATCH, loss_before=a["loss_before"]
    )
    assert d["flops"] < a["flops"]
    for r in (b, c, d):
        assert (r["gain"], r["loss_after"], r["train_losses"]) == (
            a["gain"],
            a["loss_after"],
            a["train_losses"],
        )
    assert a["gain"] == a["loss_before"] - a["loss_after"] and a["gain"] > 0
    assert a["flops"] > 0 and a["seconds"] > 0
    with pytest.raises(UserError, match="depth"):
        run_pilot(model, train, held, "lm", depth=9)


def test_pilots_and_critical_in_probe_json(tmp_path, data):
    model = build_tiny("llama", "lm")
    state = _state(model)
    result = run_probe(model, data, "lm", samples=16, progress=False)
    record = run_pilots(
        model,
        data,
        "lm",
        depths="1,8",
        steps=STEPS,
        lr=LR,
        batch_size=BATCH,
        heldout_samples=8,
        run_steps=100,
    )
    crit = run_critical(model, data, "lm", steps=STEPS, lr=LR, batch_size=BATCH)
    assert _same(model, state)
    assert record["depths"] == [1, 8] and len(record["gain"]) == 2
    assert record["flops_total"] > sum(record["flops"])  # + the shared held-out pass
    assert record["loss_before"][0] == record["loss_before"][1]
    assert (record["train_examples"], record["heldout_examples"], record["run_steps"]) == (
        40,
        8,
        100,
    )
    assert len(crit["l1"]) == len(crit["angular"]) == 8
    assert all(v > 0 for v in crit["l1"]) and all(0 < v < 0.5 for v in crit["angular"])
    attach(attach(result, "pilot", record), "critical", crit)
    assert result.timings["pilot_s"] == pytest.approx(sum(record["seconds"]))
    loaded = load_probe(result.save(str(tmp_path)))
    assert loaded.curves["pilot"] == record and loaded.curves["critical"] == crit
    plan = select_plan(loaded, "salf")
    assert (
        plan.scores["estimator"] == "pilot" and plan.scores["pilot"]["measured"] == record["gain"]
    )
    assert plan.scores["pilot_cost_fraction"] > 0
    ranked = sorted(range(8), key=lambda i: (-crit["l1"][i], -i))[:2]
    assert select_plan(loaded, "critical").trainable_blocks == sorted(ranked)


def test_pilot_on_a_classifier():
    model = build_tiny("bert", "classify", num_labels=3)
    g = torch.Generator().manual_seed(0)
    data = {
        "input_ids": torch.randint(0, 250, (24, 12), generator=g),
        "labels": torch.arange(24) % 3,
    }
    train, held = split_calibration(data, 6)
    r = run_pilot(model, train, held, "classify", depth=1, steps=2, lr=LR, batch_size=BATCH)
    assert r["loss_before"] > 0 and r["gain"] == r["loss_before"] - r["loss_after"]
