"""train_split: one split trained in-process through the run's engine, feeder and loop."""

from __future__ import annotations

import pytest
import torch

from lfdist.config import TrainConfig
from lfdist.data import load_task_data
from lfdist.model.tiny import build_tiny
from lfdist.model.tokenizer import ByteTokenizer
from lfdist.train.local import train_split

TC = TrainConfig(steps=4, batch_size=4, lr=1e-3)


@pytest.fixture(scope="module")
def data():
    train, held, _ = load_task_data("synthetic:lm:200", "lm", ByteTokenizer(), 32)
    return {k: v[:48] for k, v in train.items()}, {k: v[:8] for k, v in held.items()}


def _state(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def _same(model, state) -> bool:
    return all(
        torch.equal(p, state[n][0]) and p.requires_grad == state[n][1] and p.grad is None
        for n, p in model.named_parameters()
    )


def test_same_seed_same_losses_and_model_restored(data):
    train, held = data
    model = build_tiny("llama", "lm")
    model.eval()
    before = _state(model)
    split = ["frozen"] * 6 + ["full"] * 2  # tiny llama has 8 blocks
    a = train_split(model, split, train, held, "lm", TC, seed=3)
    assert _same(model, before) and not model.training
    b = train_split(model, split, train, held, "lm", TC, seed=3)
    assert _same(model, before)
    assert a["losses"] == b["losses"] and len(a["losses"]) == 4
    assert a["quality"] == b["quality"]
    assert a["quality"]["examples"] == 8 and "perplexity" in a["quality"]
    c = train_split(model, split, train, held, "lm", TC, seed=4)
    assert c["losses"] != a["losses"]  # another seed reads other batches
    assert len(a["step_times"]) == 4 and a["median_step_s"] > 0


def test_frozen_blocks_unchanged_and_trained_ones_move(data):
    train, held = data
    model = build_tiny("llama", "lm")
    seen = {}

    def spy(name):
        def hook(module, args, out):
            seen[name] = {n: p.detach().clone() for n, p in module.named_parameters()}

        return hook

    blocks = model.model.layers
    handles = [b.register_forward_hook(spy(i)) for i, b in enumerate(blocks)]
    first = {
        i: {n: p.detach().clone() for n, p in b.named_parameters()} for i, b in enumerate(blocks)
    }
    train_split(model, ["frozen"] * 7 + ["full"], train, None, "lm", TC, seed=0)
    for h in handles:
        h.remove()
    # `seen` holds the weights at the last forward (step 4's): blocks 0-6 never moved, 7 did.
    for i in range(7):
        assert all(torch.equal(seen[i][n], first[i][n]) for n in first[i])
    assert any(not torch.equal(seen[7][n], first[7][n]) for n in first[7])
    # ...and it is back to the pre-trained values now.
    assert all(torch.equal(p, first[7][n]) for n, p in blocks[7].named_parameters())


def test_lisa_and_lora_plans_train_a_copy_and_leave_the_model(data):
    from dataclasses import replace

    from lfdist.train.local import plan_for, train_plan

    train, held = data
    model = build_tiny("llama", "lm")
    before = _state(model)
    lisa = replace(
        plan_for(model, ["full"] * 2 + ["frozen"] * 6, "lisa"),
        options={"n": 2, "period": 2, "seed": 0},
    )
    a = train_plan(model, lisa, train, held, "lm", TC, seed=0)
    assert _same(model, before)
    assert a["losses"] == train_plan(model, lisa, train, held, "lm", TC, seed=0)["losses"]
    lora = plan_for(model, ["lora"] * 8, "lora")
    b = train_plan(model, lora, train, held, "lm", TC, seed=0)
    assert _same(model, before) and not any("lora" in n for n, _ in model.named_parameters())
    assert b["lr"]["lora"] == TC.lr * 10  # the PEFT default: 10x the full-fine-tuning lr
