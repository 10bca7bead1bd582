"""Per-treatment learning rates: one optimizer group per treatment, each at its own lr."""

import pytest
import torch

from lfdist.config import config_from_dict
from lfdist.engines.base import make_optimizer, optimizer_lrs, with_treatment_lrs
from lfdist.errors import UserError
from lfdist.model.apply import apply_plan
from lfdist.model.tiny import build_tiny
from tests.helpers import make_plan

# tiny:llama: 8 blocks; every block has 9 tensors (q, k, v, o, gate, up, down, 2 norms).


def _train_cfg(**train):
    return config_from_dict({"train": {"lr": 1e-3, **train}}).train


def _groups(treatments, **train):
    model = build_tiny("llama", "lm")
    apply_plan(model, make_plan(model, treatments))
    opt = make_optimizer(model, _train_cfg(**train))
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        g["treatment"]: (g["lr"], sorted(names[id(p)] for p in g["params"]))
        for g in opt.param_groups
    }, opt


def test_one_group_per_treatment_with_default_scales():
    groups, opt = _groups(["frozen"] * 4 + ["bias"] * 2 + ["lora", "full"])
    assert sorted(groups) == ["bias", "full", "lora"]  # no frozen group, no empty group
    assert groups["full"][0] == pytest.approx(1e-3)
    assert groups["lora"][0] == pytest.approx(1e-2)  # 10x train.lr
    assert groups["bias"][0] == pytest.approx(1e-2)
    # bias blocks of a bias-free (Llama) model train their two norm weights
    assert groups["bias"][1] == [
        f"model.layers.{i}.{n}.weight"
        for i in (4, 5)
        for n in ("input_layernorm", "post_attention_layernorm")
    ]
    lora = groups["lora"][1]
    assert sum(".lora_A." in n for n in lora) == 4 and sum(".lora_B." in n for n in lora) == 4
    assert {n for n in lora if ".lora_" not in n} == {
        "model.layers.6.input_layernorm.weight",
        "model.layers.6.post_attention_layernorm.weight",
    }
    # block 7 (9 tensors), the final norm and the head
    assert len(groups["full"][1]) == 9 + 2
    assert optimizer_lrs(opt) == {"full": 1e-3, "bias": 1e-2, "lora": 1e-2}


def test_config_overrides_and_plan_scale():
    groups, _ = _groups(["frozen"] * 7 + ["mask"], lr_mask=0.5)
    assert groups["mask"][0] == 0.5
    assert len(groups["mask"][1]) == 7  # q, k, v, o, gate, up, down scores
    assert all(n.endswith("mask_scores") for n in groups["mask"][1])
    tc = with_treatment_lrs(_train_cfg(lr_bias=3e-3), {"lora": 4.0})
    assert (tc.lr_lora, tc.lr_bias, tc.lr_mask) == pytest.approx((4e-3, 3e-3, 1e-1))


def test_lr_keys_are_checked():
    with pytest.raises(UserError, match="train.lr_lora must be greater than 0"):
        _train_cfg(lr_lora=0.0)


def test_select_records_the_scale_of_peft_treatments_only():
    from lfdist.select import select_plan
    from tests.helpers import fake_probe

    assert select_plan(fake_probe(), "spafit").options["lr_scale"] == {"bias": 10.0, "lora": 10.0}
    assert "lr_scale" not in select_plan(fake_probe(), "top").options


def test_lora_strategy_puts_lora_on_every_block():
    from lfdist.select import select_plan
    from tests.helpers import fake_probe

    plan = select_plan(fake_probe(), "lora", options={"lora_rank": 4})
    assert plan.treatments == ["lora"] * 8
    assert plan.options["lora_rank"] == 4 and plan.options["lr_scale"] == {"lora": 10.0}
    with pytest.raises(UserError, match="lora_rank"):
        select_plan(fake_probe(), "lora", options={"lora_rank": 0})
    trimmed = select_plan(fake_probe(), "lora", {"blocks": 3})
    assert trimmed.treatments == ["frozen"] * 5 + ["lora"] * 3


def test_lora_groups_survive_a_real_step():
    groups, opt = _groups(["lora"] * 8)
    before = {id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]}
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    opt.step()
    moved = {g["treatment"]: [] for g in opt.param_groups}
    for g in opt.param_groups:
        for p in g["params"]:
            # AdamW's first step moves every element by exactly lr (sign of a constant gradient)
            moved[g["treatment"]].append(float((before[id(p)] - p.detach()).abs().max()))
    assert moved["lora"] == pytest.approx([1e-2] * len(moved["lora"]), rel=1e-4)
    assert moved["full"] == pytest.approx([1e-3] * len(moved["full"]), rel=1e-4)
