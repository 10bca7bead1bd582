"""spafit, critical, lisa and mask on hand-built statistics, and the lora and mask
treatments on tiny models, where the right answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lfdist.errors import UserError
from lfdist.lisa_draw import lisa_blocks, lisa_treatments
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
from lfdist.select import select_plan
from lfdist.select.registry import strategy_names
from tests.helpers import fake_probe, make_plan

L = 8
FLAT = [1.0] * (L + 1)  # a trace that does not fall
FALLING = [4.0, 4.0, 4.0, 4.0, 4.0, 3.0, 2.0, 1.0, 0.0]  # trace salf picks k = 4
FROZEN_MODULES = {"embeddings": "frozen", "final_norm": "frozen", "head": "frozen"}


def probe(deviation=FLAT, pilot=None, critical=None) -> ProbeResult:
    """8 blocks of 100 elements, embeddings 100, no head: full FT costs 4800 FLOPs per token and
    training the top n blocks (4 + n)/12 of it."""
    return fake_probe(deviation, pilot=pilot, critical=critical)


def test_strategies_registered():
    assert {"critical", "lisa", "mask", "spafit"} <= set(strategy_names())


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
    # Literal draws of the stdlib's seeded Mersenne Twister (the same on every platform).
    first = lisa_blocks(L, 2, 20, 7, 0)
    assert first == [2, 5]
    assert all(lisa_blocks(L, 2, 20, 7, s) == first for s in range(20))  # one draw per period
    assert lisa_blocks(L, 2, 20, 7, 59) == [2, 6]  # step 59 is in period 2
    schedule = [lisa_blocks(L, 2, 20, 7, p * 20) for p in range(10)]
    assert schedule == [
        [2, 5], [2, 5], [2, 6], [3, 7], [4, 5], [1, 5], [1, 4], [1, 5], [6, 7], [0, 4]
    ]  # fmt: skip
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
    with pytest.raises(UserError, match="FSDP1 cannot"):
        check_engine_supports(lisa_plan, "fsdp1")
    for engine in ("ddp", "fsdp2", "single"):  # the engines that re-draw (lfdist.train.redraw)
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
