"""Cost model: bytes per engine/stage and FLOPs fractions, computed by hand."""

from __future__ import annotations

import pytest

from lfdist.cost import predict
from lfdist.errors import UserError
from lfdist.plan import DEFAULT_MODULES

# 4 blocks of 100 elements, embeddings 50, final norm 10, head 40; tokens = 2 x 4 = 8.
INFO = {
    "per_block_params": [100] * 4,
    "group_params": {"embeddings": 50, "final_norm": 10, "head": 40},
    "hidden_size": 8,
    "vocab_size": 0,
    "task": "classify",
    "head_matmul_params": 40,
}
PLAN = ["frozen", "frozen", "full", "full"]  # trainable: 200 + final norm 10 + head 40 = 250 of 500
ACT_BLOCK_FP32 = 34 * 8 * 8 * 4 // 2  # 34·B·T·H bytes at 16 bits, doubled for fp32 = 4352


def _bytes(engine, zero_stage=0, world_size=2, dtype="float32"):
    return predict(
        INFO,
        PLAN,
        DEFAULT_MODULES,
        engine=engine,
        zero_stage=zero_stage,
        world_size=world_size,
        dtype=dtype,
        batch_size=2,
        seq_len=4,
    )["bytes"]


@pytest.mark.parametrize(
    "engine,stage,expected",
    [
        # params (all 500, frozen too), grads (250 trainable), AdamW 2 fp32 states (8 B) per trainable
        ("ddp", 0, dict(params=2000, grads=1000, optimizer=2000, transient=0)),
        ("single", 0, dict(params=2000, grads=1000, optimizer=2000, transient=0)),
        ("deepspeed", 0, dict(params=2000, grads=1000, optimizer=2000, transient=0)),
        # ZeRO keeps an fp32 master partition (4 B per trainable element) even in fp32
        ("deepspeed", 1, dict(params=2000, grads=1000, optimizer=1500, transient=0)),
        ("deepspeed", 2, dict(params=2000, grads=500, optimizer=1500, transient=0)),
        ("deepspeed", 3, dict(params=1000, grads=500, optimizer=1500, transient=400)),
        ("fsdp2", 0, dict(params=1000, grads=500, optimizer=1000, transient=400)),
        ("fsdp1", 0, dict(params=1000, grads=500, optimizer=1000, transient=400)),
    ],
)
def test_bytes_per_engine_fp32(engine, stage, expected):
    b = _bytes(engine, stage)
    for key, value in expected.items():
        assert b[key] == value, key
    assert b["activations"] == 2 * ACT_BLOCK_FP32  # two blocks above the boundary
    assert b["total"] == sum(expected.values()) + 2 * ACT_BLOCK_FP32


def test_deepspeed_bf16_keeps_fp32_master_weights():
    b = _bytes("deepspeed", 1, dtype="bfloat16")
    assert b["params"] == 1000 and b["grads"] == 500
    assert b["optimizer"] == 250 * (8 + 4) / 2
    assert b["activations"] == 2 * ACT_BLOCK_FP32 / 2


def test_frozen_blocks_cost_no_gradient_or_optimizer_state():
    frozen = predict(
        INFO,
        ["frozen"] * 4,
        DEFAULT_MODULES,
        engine="ddp",
        world_size=1,
        dtype="float32",
        batch_size=2,
        seq_len=4,
    )
    assert frozen["params_trainable"] == 50  # final norm + head
    assert frozen["bytes"]["grads"] == 50 * 4 and frozen["bytes"]["optimizer"] == 50 * 8
    assert frozen["bytes"]["activations"] == 0


@pytest.mark.parametrize("k", range(5))
def test_flops_fraction_of_frozen_prefix(k):
    info = dict(
        INFO, group_params={"embeddings": 50, "final_norm": 0, "head": 0}, head_matmul_params=0
    )
    p = predict(info, ["frozen"] * k + ["full"] * (4 - k), DEFAULT_MODULES, batch_size=2, seq_len=4)
    f = (4 - k) / 4
    assert p["flops_fraction"] == pytest.approx((2 + 4 * f) / 6)


def test_flops_by_hand_with_head_and_gaps():
    # forward 2·8·(400 + 40) = 7040; backward 2 blocks 4·8·100 each + head 4·8·40 = 6400 + 1280
    p = predict(INFO, PLAN, DEFAULT_MODULES, batch_size=2, seq_len=4)
    assert p["flops_forward"] == 7040 and p["flops_backward"] == 7680
    assert p["flops_full_per_step"] == 7040 + 4 * 3200 + 1280
    # a frozen block above the boundary still passes the input gradient down: 2·N·T
    q = predict(
        INFO, ["full", "frozen", "frozen", "frozen"], DEFAULT_MODULES, batch_size=2, seq_len=4
    )
    assert q["flops_backward"] == 3200 + 3 * 1600 + 1280
    # training the embeddings moves the boundary below block 0
    e = predict(
        INFO, ["frozen"] * 4, dict(DEFAULT_MODULES, embeddings="full"), batch_size=2, seq_len=4
    )
    assert e["flops_backward"] == 4 * 1600 + 1280


def test_fractions_and_errors():
    full = predict(INFO, ["full"] * 4, DEFAULT_MODULES)
    assert full["flops_fraction"] == 1.0 and full["memory_fraction"] == 1.0
    part = predict(INFO, PLAN, DEFAULT_MODULES)
    assert 0 < part["memory_fraction"] < 1 and part["trainable_fraction"] == 250 / 500
    with pytest.raises(UserError, match="engine"):
        predict(INFO, PLAN, DEFAULT_MODULES, engine="megatron")
    with pytest.raises(UserError, match="world_size"):
        predict(INFO, PLAN, DEFAULT_MODULES, world_size="2")
    with pytest.raises(UserError, match="dtype"):
        predict(INFO, PLAN, DEFAULT_MODULES, dtype="int8")


def test_cost_and_report_import_without_torch():
    import subprocess
    import sys

    code = "import sys, lfdist.cost, lfdist.report; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
