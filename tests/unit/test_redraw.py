"""LISA's re-drawing in one process: the engine's trainable set, optimizer groups and states."""

from dataclasses import replace

import pytest
import torch

from lfdist.config import config_from_dict
from lfdist.engines import build_engine
from lfdist.engines.base import World, treatment_of_parameters
from lfdist.errors import UserError
from lfdist.model.apply import apply_plan
from lfdist.model.tiny import build_tiny
from lfdist.train.redraw import LisaSchedule
from tests.helpers import make_plan

OPTIONS = {"n": 2, "period": 2, "seed": 2}  # draws [2, 6], [6, 7], [3, 5]


def _engine():
    model = build_tiny("llama", "lm")
    treatments = ["full" if i in (2, 6) else "frozen" for i in range(8)]
    plan = make_plan(model, treatments, strategy="lisa", options=OPTIONS)
    apply_plan(model, plan)
    schedule = LisaSchedule(plan)
    tc = config_from_dict({"train": {"engine": "single", "nproc": 1, "lr": 1e-3}}).train
    engine = build_engine("single", model, None, tc, World(0, 1, 0, torch.device("cpu")))
    return engine, schedule


def _step(engine):
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    engine.micro_step({"input_ids": ids, "labels": ids}, 1.0)
    engine.optimizer_step()


def _blocks_in_optimizer(engine):
    names = {id(p): n for n, p in engine.model.named_parameters()}
    return sorted(
        {
            int(names[id(p)].split(".")[2])
            for g in engine.optimizer.param_groups
            for p in g["params"]
            if names[id(p)].startswith("model.layers.")
        }
    )


def test_redraw_moves_the_trainable_set_and_drops_leaving_states():
    engine, schedule = _engine()
    assert schedule.at(engine, 0) == [2, 6]
    _step(engine)
    block6 = engine.model.model.layers[6].self_attn.q_proj.weight
    state6 = engine.optimizer.state[block6]["exp_avg"].clone()
    assert schedule.at(engine, 2) == [6, 7]
    assert _blocks_in_optimizer(engine) == [6, 7]
    trainable = {n for n, p in engine.model.named_parameters() if p.requires_grad}
    assert {int(n.split(".")[2]) for n in trainable if n.startswith("model.layers.")} == {6, 7}
    assert {"lm_head.weight", "model.norm.weight"} <= trainable  # modules keep the plan's
    # block 2 left: its 9 tensors lost their state; block 6 stayed and kept it; 7 starts fresh
    layer2 = set(engine.model.model.layers[2].parameters())
    assert not layer2 & set(engine.optimizer.state)
    assert torch.equal(engine.optimizer.state[block6]["exp_avg"], state6)
    assert engine.model.model.layers[7].self_attn.q_proj.weight not in engine.optimizer.state
    _step(engine)
    assert len(engine.optimizer.state) == 2 * 9 + 2  # blocks 6, 7 + norm + head


def test_schedule_needs_the_plans_options():
    model = build_tiny("llama", "lm")
    plan = make_plan(model, ["frozen"] * 6 + ["full"] * 2, strategy="lisa")
    with pytest.raises(UserError, match="lisa plan has no integer option 'n'"):
        LisaSchedule(replace(plan, options={"period": 2, "seed": 0}))


def test_bias_treatment_groups_biases_on_a_model_with_biases():
    model = build_tiny("bert", "classify")
    apply_plan(model, make_plan(model, ["frozen"] * 6 + ["bias", "full"]))
    kinds = treatment_of_parameters(model)
    bias = sorted(n for n, k in kinds.items() if k == "bias")
    assert bias and all(n.startswith("bert.encoder.layer.6.") for n in bias)
    assert all(n.endswith("bias") for n in bias)
    assert {k for n, k in kinds.items() if n.startswith("bert.encoder.layer.7.")} == {"full"}
