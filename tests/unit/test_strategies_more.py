"""salf-pilot, spafit, critical, lisa and mask on hand-built statistics, and the lora and mask
treatments on tiny models, where the right answer is known."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from lfdist.errors import UserError
from lfdist.model.apply import apply_plan
from lfdist.model.blocks import fingerprint
from lfdist.model.tiny import build_tiny
from lfdist.model.treatments import (
    SCORES,
    apply_masks,
    check_engine_supports,
    export_masks,
    merge_treatments,
    pack_bits,
    unpack_bits,
)
from lfdist.probe import ProbeResult
from lfdist.registry import strategy_names
from lfdist.select import select_plan
from lfdist.select.lisa import lisa_blocks, lisa_treatments
from lfdist.select.salf import fit_power_law, trace_slope
from tests.helpers import fake_probe, make_plan

L = 8
FLAT = [1.0] * (L + 1)  # a trace that does not fall: no prior
LINEAR = [float(L - i) for i in range(L + 1)]  # trace gain (8 - k)/8: log-log slope 1
FALLING = [4.0, 4.0, 4.0, 4.0, 4.0, 3.0, 2.0, 1.0, 0.0]  # trace salf picks k = 4
FROZEN_MODULES = {"embeddings": "frozen", "final_norm": "frozen", "head": "frozen"}


def probe(deviation=FLAT, pilot=None, critical=None) -> ProbeResult:
    """8 blocks of 100 elements, embeddings 100, no head: full FT costs 4800 FLOPs per token and
    training the top n blocks (4 + n)/12 of it."""
    return fake_probe(deviation, pilot=pilot, critical=critical)


def pilots(beta: float, depths=(1, 2, 4, 8), a: float = 0.1, flops: float = 0.0, run_steps=None):
    return {
        "depths": list(depths),
        "gain": [a * n**beta for n in depths],
        "flops_total": flops,
        "run_steps": run_steps,
    }


def test_strategies_registered():
    assert {"critical", "lisa", "mask", "spafit"} <= set(strategy_names())


# ---------------------------------------------------------------- salf, estimator pilot


def salf_k(beta, budget=None, deviation=FLAT, **options) -> int:
    plan = select_plan(probe(deviation, pilots(beta)), "salf", budget, options)
    assert plan.scores["estimator"] == "pilot" and plan.options["estimator"] == "pilot"
    assert plan.trainable_blocks == list(range(plan.boundary, L))
    return plan.boundary


@pytest.mark.parametrize(
    "beta,options,k",
    [
        # target: largest k with ((8 - k)/8)^beta >= 1 - eps, i.e. n = 8 - k >= 8 (1 - eps)^(1/beta)
        (0.5, {}, 0),  # n >= 7.68
        (0.5, {"epsilon": 0.1}, 1),  # n >= 6.48
        (0.5, {"epsilon": 0.3}, 4),  # n >= 3.92
        (0.1, {}, 1),  # n >= 6.54
        (0.1, {"epsilon": 0.1}, 5),  # n >= 2.79
        (0.01, {"epsilon": 0.2}, 6),  # n >= 1.6e-9: k = 7 would do, but never L-1 unless forced
        # ratio: G/C = A n^beta / ((4 + n)/12), maximal at n = 4 beta / (1 - beta)
        (0.5, {"decision": "ratio"}, 4),  # n = 4: .25 beats n = 3: .2474 and n = 5: .2485
        (0.8, {"decision": "ratio"}, 0),  # n* = 16 > 8
    ],
)
def test_salf_pilot_decisions_by_hand(beta, options, k):
    assert salf_k(beta, **options) == k


def test_salf_pilot_budget_decision():
    # flops (4 + n)/12 <= 0.5 -> n <= 2 -> k >= 6; G falls with k, so k = 6
    assert salf_k(0.5, {"flops": 0.5}, decision="budget") == 6
    assert salf_k(0.5, {"blocks": 3}, decision="budget") == 5
    assert salf_k(0.5, {"blocks": 1}, decision="budget") == 7  # forced by the budget


def test_salf_pilot_fit_and_scores():
    plan = select_plan(probe(FLAT, pilots(0.5)), "salf")
    fit = plan.scores["pilot"]
    assert fit["beta"] == pytest.approx(0.5, rel=1e-9) and fit["A"] == pytest.approx(0.1, rel=1e-9)
    assert fit["beta_prior"] is None  # the flat trace carries no shape
    assert plan.scores["gain"] == pytest.approx([0.1 * (L - k) ** 0.5 for k in range(L)])
    assert [b.score for b in plan.blocks] == pytest.approx(plan.scores["gain"])


def test_default_estimator_follows_the_probe():
    assert select_plan(probe(FALLING), "salf").scores["estimator"] == "trace"
    assert select_plan(probe(FALLING, pilots(0.5)), "salf").scores["estimator"] == "pilot"
    trace = select_plan(probe(FALLING, pilots(0.5)), "salf", options={"estimator": "trace"})
    assert trace.scores["estimator"] == "trace" and trace.boundary == 4
    with pytest.raises(UserError, match="pilot_steps"):
        select_plan(probe(FALLING), "salf", options={"estimator": "pilot"})
    with pytest.raises(UserError, match="prior_sd"):
        select_plan(probe(FALLING, pilots(0.5)), "salf", options={"prior_sd": -1})


def test_power_law_fit_with_the_trace_prior():
    assert trace_slope(FLAT) is None
    assert trace_slope(LINEAR) == pytest.approx(1.0)
    # clean pilots keep their own slope: the residual is zero, the prior has no weight
    clean = fit_power_law([1, 2, 4, 8], [0.1 * n**0.2 for n in (1, 2, 4, 8)], 1.0, 0.5)
    assert clean["beta"] == pytest.approx(0.2, abs=1e-4)
    # two pilots leave no residual: noise sigma^2 = 0.05 is assumed; Sxx = (ln 8)^2 / 2
    two = fit_power_law([1, 8], [0.1, 0.1 * 8**0.2], 1.0, 0.5)
    w_data, w_prior = math.log(8) ** 2 / 2 / 0.05, 1 / 0.25
    assert two["beta"] == pytest.approx((w_data * 0.2 + w_prior * 1.0) / (w_data + w_prior))
    assert fit_power_law([1, 8], [0.1, 0.1 * 8**0.2], 1.0, None)["beta"] == pytest.approx(0.2)
    # gains falling with depth: beta is kept > 0
    assert fit_power_law([1, 2, 4], [0.3, 0.2, 0.1], None, None)["beta"] == pytest.approx(1e-3)
    # pilots that gained nothing are dropped; none left means no fit
    assert fit_power_law([1, 2, 4], [-0.1, 0.2, 0.4], None, None)["points"] == 2
    assert fit_power_law([1, 2], [0.0, -0.1], None, None)["A"] is None


def test_no_pilot_gain_falls_back_to_the_trace():
    p = probe(FALLING, {"depths": [1, 8], "gain": [-0.1, 0.0], "flops_total": 0.0})
    plan = select_plan(p, "salf")
    assert plan.boundary == 4 and "no pilot" in plan.scores["fallback"]


def test_pilot_cost_fraction():
    # one token per step (batch 1, seq 1, one rank): full FT costs 4800 FLOPs per step, the
    # picked plan (k = 0) too; 100 steps -> 480000 FLOPs, the pilots 48000
    cost = {"engine": "ddp", "batch_size": 1, "world_size": 1}
    p = probe(FLAT, pilots(0.5, flops=48000.0))
    plan = select_plan(p, "salf", options={**cost, "run_steps": 100})
    assert plan.boundary == 0
    assert plan.scores["pilot_cost_fraction"] == pytest.approx(0.1)
    assert plan.scores["pilot_cost_full_steps"] == pytest.approx(10.0)
    assert select_plan(p, "salf", options=cost).scores["pilot_cost_fraction"] is None
    recorded = probe(FLAT, pilots(0.5, flops=48000.0, run_steps=50))
    assert select_plan(recorded, "salf", options=cost).scores[
        "pilot_cost_fraction"
    ] == pytest.approx(0.2)


# ---------------------------------------------------------------- spafit


@pytest.mark.parametrize(
    "cuts,strata",
    [
        (None, (3, 5)),  # 1/3, 2/3 of 8 rounded half up
        ([2, 6], (2, 6)),
        ([0.25, 0.75], (2, 6)),
        ("2,5", (2, 5)),
        ([0, 0], (0, 0)),  # LoRA everywhere
        ([4, 8], (4, 8)),  # no LoRA stratum
        ("salf", (4, 6)),  # salf picks k = 4 on FALLING; c2 halfway through blocks 4..7
    ],
)
def test_spafit_strata(cuts, strata):
    c1, c2 = strata
    options = {} if cuts is None else {"cuts": cuts}
    plan = select_plan(probe(FALLING), "spafit", options=options)
    assert plan.treatments == ["frozen"] * c1 + ["bias"] * (c2 - c1) + ["lora"] * (L - c2)
    assert plan.scores["cuts"] == [c1, c2]
    assert plan.options["lora_rank"] == 8


def test_spafit_errors_and_budget():
    for cuts, message in [
        ([5, 2], "c1=5 > c2=2"),
        ([8, 8], "frozen stratum"),
        ([1, 9], "0..8"),
        ([0.5], "two cut points"),
        ([1.5, 2], "fraction"),
    ]:
        with pytest.raises(UserError, match=message):
            select_plan(probe(FALLING), "spafit", options={"cuts": cuts})
    with pytest.raises(UserError, match="lora_rank"):
        select_plan(probe(FALLING), "spafit", options={"lora_rank": 0})
    # a budget drops the lowest trainable blocks first
    plan = select_plan(probe(FALLING), "spafit", {"blocks": 3})
    assert plan.treatments == ["frozen"] * 5 + ["lora"] * 3


# ---------------------------------------------------------------- critical


CHANGES = {
    "l1": [0.5, 0.1, 0.3, 0.3, 0.05, 0.2, 0.1, 0.4],
    "angular": [0.1, 0.9, 0.2, 0.3, 0.8, 0.1, 0.1, 0.1],
    "steps": 50,
}


def test_critical_ranks_by_relative_change():
    p = probe(critical=CHANGES)
    assert select_plan(p, "critical").trainable_blocks == [0, 7]  # m defaults to L/4 = 2
    assert select_plan(p, "critical", options={"m": 4}).trainable_blocks == [0, 2, 3, 7]
    assert select_plan(p, "critical", options={"m": 3}).trainable_blocks == [0, 3, 7]  # tie: deeper
    assert select_plan(p, "critical", options={"metric": "angular"}).trainable_blocks == [1, 4]
    plan = select_plan(p, "critical", {"blocks": 1}, {"m": 3})
    assert plan.trainable_blocks == [0] and [b.score for b in plan.blocks] == CHANGES["l1"]
    with pytest.raises(UserError, match="critical_steps"):
        select_plan(probe(), "critical")
    with pytest.raises(UserError, match="metric"):
        select_plan(p, "critical", options={"metric": "l2"})


# ---------------------------------------------------------------- lisa


def test_lisa_schedule_is_deterministic():
    first = lisa_blocks(L, 2, 20, 7, 0)
    assert first == sorted(random.Random(7 * 1_000_003).sample(range(L), 2))
    assert all(lisa_blocks(L, 2, 20, 7, s) == first for s in range(20))  # one draw per period
    assert lisa_blocks(L, 2, 20, 7, 20) == sorted(
        random.Random(7 * 1_000_003 + 1).sample(range(L), 2)
    )
    schedule = [lisa_blocks(L, 2, 20, 7, p * 20) for p in range(10)]
    assert len({tuple(s) for s in schedule}) > 1  # the draws do change
    plan = select_plan(probe(), "lisa", options={"seed": 7})
    assert plan.trainable_blocks == first and plan.scores["schedule"][:2] == schedule[:2]
    assert (plan.options["n"], plan.options["period"], plan.options["seed"]) == (2, 20, 7)
    assert select_plan(probe(), "lisa", options={"seed": 7}) == plan
    assert lisa_treatments(plan.treatments, plan.options, 0) == plan.treatments
    assert [
        i for i, t in enumerate(lisa_treatments(plan.treatments, plan.options, 45)) if t == "full"
    ] == schedule[2]


def test_lisa_budget_shrinks_every_draw():
    plan = select_plan(probe(), "lisa", {"blocks": 1}, {"n": 3})
    assert plan.options["n"] == 1 and len(plan.trainable_blocks) == 1
    # every draw must fit, so the costliest (the bottom n: backward through all 8 blocks) decides:
    # flops = (1600 forward + 8 * 200 input grads + n * 200 weight grads) / 4800
    assert select_plan(probe(), "lisa", {"flops": 0.75}, {"n": 3}).options["n"] == 2
    with pytest.raises(UserError, match="needs flops>=0.709"):
        select_plan(probe(), "lisa", {"flops": 0.6})
    with pytest.raises(UserError, match="period"):
        select_plan(probe(), "lisa", options={"period": 0})


def test_engine_support_checks():
    model = build_tiny("llama", "lm")
    lisa_plan = make_plan(model, ["frozen"] * 6 + ["full"] * 2, strategy="lisa")
    with pytest.raises(UserError, match="DeepSpeed cannot"):
        check_engine_supports(lisa_plan, "deepspeed")
    for engine in ("ddp", "fsdp2", "fsdp1", "single"):  # the re-drawing loop is not built yet
        with pytest.raises(UserError, match="does not do yet"):
            check_engine_supports(lisa_plan, engine)
    lora_plan = make_plan(model, ["frozen"] * 6 + ["lora"] * 2)
    with pytest.raises(UserError, match="fsdp1 cannot train the lora"):
        check_engine_supports(lora_plan, "fsdp1")
    check_engine_supports(lora_plan, "deepspeed")


# ---------------------------------------------------------------- mask strategy and treatment


def test_mask_strategy():
    assert select_plan(probe(), "mask").treatments == ["mask"] * L  # every block, as the paper
    plan = select_plan(probe(), "mask", options={"n": 2, "sparsity": 0.3})
    assert plan.treatments == ["frozen"] * 6 + ["mask"] * 2 and plan.options["sparsity"] == 0.3
    assert select_plan(probe(), "mask", options={"blocks": "1,5"}).trainable_blocks == [1, 5]
    assert select_plan(probe(), "mask", options={"blocks": [6, 2]}).trainable_blocks == [2, 6]
    for options, message in [
        ({"blocks": [8]}, "0..7"),
        ({"blocks": [1], "n": 1}, "not both"),
        ({"sparsity": 1.0}, "sparsity"),
    ]:
        with pytest.raises(UserError, match=message):
            select_plan(probe(), "mask", options=options)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (4, 16), generator=g)
    return {"input_ids": ids, "labels": ids}


def _masked_model(sparsity=0.25, blocks=(6, 7), modules=FROZEN_MODULES):
    model = build_tiny("llama", "lm").eval()
    treatments = ["mask" if i in blocks else "frozen" for i in range(L)]
    plan = make_plan(model, treatments, options={"sparsity": sparsity}, modules=dict(modules))
    return model, plan, apply_plan(model, plan)


def test_mask_gradient_reaches_scores_only_and_weights_stay():
    model, plan, applied = _masked_model()
    assert applied.trainable_names and all(n.endswith(SCORES) for n in applied.trainable_names)
    assert len(applied.trainable_names) == 2 * 7  # 7 projections per Llama block
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith(SCORES)}
    masks0 = export_masks(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for step in range(3):
        model(**_batch(step)).loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == n.endswith(SCORES), n
            if p.grad is not None:
                assert p.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        if not n.endswith(SCORES):
            assert torch.equal(p, weights[n]), n  # bit-identical
    masks = export_masks(model)
    assert any(not torch.equal(masks[k], masks0[k]) for k in masks)  # the masks did learn
    params = dict(model.named_parameters())
    for name, bits in masks.items():
        shape = tuple(params[name].shape)
        mask = unpack_bits(bits, shape)
        assert int((~mask).sum()) == round(0.25 * mask.numel())  # sparsity reached exactly


def test_mask_at_zero_sparsity_is_the_base_model():
    base = build_tiny("llama", "lm").eval()
    model, _, _ = _masked_model(sparsity=0.0)
    with torch.no_grad():
        assert torch.equal(model(**_batch()).logits, base(**_batch()).logits)


def test_bit_masks_round_trip_and_apply():
    bools = torch.rand(5, 13, generator=torch.Generator().manual_seed(0)) > 0.5
    bits = pack_bits(bools)
    assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(65 / 8)
    assert np.array_equal(bits.numpy(), np.packbits(bools.flatten().numpy()))
    assert torch.equal(unpack_bits(bits, (5, 13)), bools)
    model, plan, _ = _masked_model(sparsity=0.3)
    masks = export_masks(model)
    base = build_tiny("llama", "lm").eval()
    apply_masks(base, masks)  # the pre-trained weights + bit masks = the task's model
    with torch.no_grad():
        expect = model(**_batch()).logits
        assert torch.allclose(base(**_batch()).logits, expect, rtol=0, atol=1e-6)
        merged = merge_treatments(model)
        assert fingerprint(merged) == plan.fingerprint
        assert torch.allclose(merged(**_batch()).logits, expect, rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="names no parameter"):
        apply_masks(base, {"nope.weight": masks[next(iter(masks))]})


# ---------------------------------------------------------------- lora treatment


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_trains_adapters_and_biases_only(arch):
    model = build_tiny(arch, "lm").eval()
    base = build_tiny(arch, "lm").eval()
    treatments = ["frozen"] * 5 + ["bias"] + ["lora"] * 2
    plan = make_plan(model, treatments, options={"lora_rank": 4}, modules=dict(FROZEN_MODULES))
    applied = apply_plan(model, plan)
    names = applied.trainable_names
    lora = [n for n in names if ".lora_" in n]
    assert lora and all(".6." in n or ".7." in n for n in lora)
    rest = [n for n in names if ".lora_" not in n]
    if arch == "llama":  # bias-free: norm weights stand in for biases
        assert rest and all("layernorm" in n for n in rest)
    else:
        assert rest and all(n.endswith("bias") for n in rest)
    assert all(
        p.shape[0] == 4 or p.shape[1] == 4 for n, p in model.named_parameters() if ".lora_" in n
    )
    with torch.no_grad():
        assert torch.equal(model(**_batch()).logits, base(**_batch()).logits)  # B = 0 at init


def test_lora_trains_and_merges_back():
    model = build_tiny("llama", "lm")
    plan = make_plan(model, ["frozen"] * 6 + ["lora"] * 2, options={"lora_seed": 3})
    apply_plan(model, plan)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        model(**_batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    model.eval()
    with torch.no_grad():
        expect = model(**_batch()).logits
        merged = merge_treatments(model)
        assert fingerprint(merged) == plan.fingerprint
        assert torch.allclose(merged(**_batch()).logits, expect, rtol=0, atol=1e-5)
    again = build_tiny("llama", "lm")
    apply_plan(again, plan)  # the same seed draws the same adapters on every rank
    fresh = build_tiny("llama", "lm")
    apply_plan(fresh, plan)
    a = {n: p for n, p in again.named_parameters() if "lora_A" in n}
    assert all(torch.equal(p, a[n]) for n, p in fresh.named_parameters() if "lora_A" in n)
