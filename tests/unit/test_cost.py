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


# ---------------------------------------------------------------- dtype-following optimizer state


@pytest.mark.parametrize(
    "engine,stage,precision,optimizer",
    [
        # bf16-mixed (the default for bf16): fp32 exp_avg + exp_avg_sq = 8 B per trainable
        # element (250 of them); pure bf16: 4 B
        ("ddp", 0, "auto", 250 * 8),
        ("fsdp2", 0, "bf16-mixed", 250 * 8 / 2),
        ("ddp", 0, "bf16", 250 * 4),
        ("fsdp2", 0, "bf16", 250 * 4 / 2),
        # ZeRO: fp32 master + two fp32 states = 12 B, partitioned over 2 ranks; pure bf16: 6 B
        ("deepspeed", 2, "auto", 250 * 12 / 2),
        ("deepspeed", 3, "auto", 250 * 12 / 2),
        ("deepspeed", 2, "bf16", 250 * 6 / 2),
    ],
)
def test_optimizer_state_follows_the_precision(engine, stage, precision, optimizer):
    p = predict(
        INFO, PLAN, DEFAULT_MODULES, engine=engine, zero_stage=stage, world_size=2,
        dtype="bfloat16", precision=precision, batch_size=2, seq_len=4,
    )  # fmt: skip
    assert p["bytes"]["optimizer"] == optimizer


def test_bf16_mixed_prices_trainable_in_fp32_and_frozen_in_bf16():
    kw = dict(engine="ddp", world_size=1, dtype="bfloat16", batch_size=2, seq_len=4)
    mixed = predict(INFO, PLAN, DEFAULT_MODULES, **kw)
    pure = predict(INFO, PLAN, DEFAULT_MODULES, precision="bf16", **kw)
    assert mixed["precision"] == "bf16-mixed" and pure["precision"] == "bf16"
    # 250 trainable elements (fp32 masters), 250 frozen (bf16)
    assert mixed["bytes"]["params"] == 250 * 4 + 250 * 2
    assert mixed["bytes"]["grads"] == 250 * 4
    assert mixed["bytes_per_trainable_param"] == 16 and mixed["bytes_per_frozen_param"] == 2
    assert pure["bytes"]["params"] == 500 * 2 and pure["bytes_per_trainable_param"] == 8
    assert mixed["bytes"]["activations"] == pure["bytes"]["activations"]  # both compute in bf16
    with pytest.raises(UserError, match="train.precision=fp32 trains in float32"):
        predict(INFO, PLAN, DEFAULT_MODULES, precision="fp32", **kw)


# ---------------------------------------------------------------- LoRA rank, LoRA biases, masks

# Per block: 3 bias-like elements, attention projections with in + out = 20 in all, 60 weight
# elements in projections.
LORA_INFO = dict(
    INFO,
    per_block_bias_params=[3] * 4,
    per_block_lora_in_out=[20] * 4,
    per_block_projection_params=[60] * 4,
)


def _lora(treatments, rank=None, **kw):
    kw = dict(dict(engine="ddp", world_size=1, dtype="float32", batch_size=2, seq_len=4), **kw)
    if rank is not None:
        kw["lora_rank"] = rank
    return predict(LORA_INFO, treatments, DEFAULT_MODULES, **kw)


def test_lora_rank_and_biases_by_hand():
    p = _lora(["frozen", "frozen", "lora", "lora"], rank=4)
    # per lora block: 4·20 = 80 adapters + 3 biases; plus final norm 10 and head 40
    assert p["params_trainable"] == 2 * 83 + 50
    assert p["params_total"] == 500 + 2 * 80  # adapters are new parameters; biases are not
    assert p["bytes"]["params"] == 660 * 4 and p["bytes"]["grads"] == 216 * 4
    assert p["bytes"]["optimizer"] == 216 * 8
    r16 = _lora(["frozen", "frozen", "lora", "lora"], rank=16)
    assert r16["params_trainable"] == 2 * (16 * 20 + 3) + 50
    assert _lora(["frozen"] * 3 + ["lora"])["params_trainable"] == 8 * 20 + 3 + 50  # default r=8


def test_mask_trains_one_score_per_projection_weight():
    p = _lora(["frozen", "frozen", "frozen", "mask"])
    assert p["params_trainable"] == 60 + 50
    assert p["params_total"] == 500 + 60


def test_predict_plan_reads_the_lora_rank_from_plan_options():
    from lfdist.cost import predict_plan
    from lfdist.plan import BlockPlan, Fingerprint, Plan

    blocks = tuple(BlockPlan(i, f"b.{i}", t) for i, t in enumerate(["frozen"] * 3 + ["lora"]))
    plan = Plan("spafit", Fingerprint("X", 4, "0"), blocks, options={"lora_rank": 2})
    p = predict_plan(LORA_INFO, plan, engine="ddp", batch_size=2, seq_len=4)
    assert p["params_trainable"] == 2 * 20 + 3 + 50
    with pytest.raises(UserError, match="lora_rank"):
        _lora(["full"] * 4, rank=0)


def test_select_costs_spafit_with_its_lora_rank():
    from lfdist.select import select_plan
    from tests.helpers import fake_probe

    probe = fake_probe()
    probe.model_info.update(per_block_lora_in_out=[10] * 8)
    plans = {r: select_plan(probe, "spafit", options={"lora_rank": r}) for r in (4, 32)}
    # cuts 1/3, 2/3 of 8 blocks: 3 frozen, 2 bias (10 each), 3 lora (r·10 adapters + 10 biases)
    for r, plan in plans.items():
        assert plan.treatments.count("lora") == 3
        assert plan.predicted["params_trainable"] == 2 * 10 + 3 * (r * 10 + 10)


# ---------------------------------------------------------------- activations


def test_activation_checkpointing_keeps_block_inputs_and_recomputes():
    plain = predict(INFO, PLAN, DEFAULT_MODULES, dtype="float32", batch_size=2, seq_len=4)
    ckpt = predict(
        INFO,
        PLAN,
        DEFAULT_MODULES,
        dtype="float32",
        batch_size=2,
        seq_len=4,
        activation_checkpointing=True,
    )
    # two checkpointed blocks keep their input (8 tokens x H 8 x 4 B) + one block recomputed
    assert ckpt["bytes"]["activations"] == 2 * 8 * 8 * 4 + ACT_BLOCK_FP32
    assert plain["bytes"]["activations"] == 2 * ACT_BLOCK_FP32
    # the two blocks' forward runs again: 2 x 2·8·100
    assert ckpt["flops_backward"] == plain["flops_backward"] + 3200


def test_llama_block_activations_by_hand():
    from lfdist.activations import block_activation_bytes

    # Llama-3.1-8B's shape: H 4096, I 14336, 32 heads, 8 KV heads (KV width 1024), bf16.
    info = dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    # per token: 20·4096 + 8·14336 + 4·1024 + 4·32 + 8 = 81920 + 114688 + 4096 + 136
    assert block_activation_bytes(info, 1, 4096, 2) == 4096 * 200840
    # unknown architectures: 34·B·T·H at 16 bits
    assert block_activation_bytes({"hidden_size": 4096}, 1, 4096, 2) == 34 * 4096 * 4096


def _saved_bytes_per_block(arch, dtype, batch=2, seq=24):
    """Bytes of tensors saved for backward by one block, excluding the parameters themselves."""
    import torch

    from lfdist.model.tiny import build_tiny

    model = build_tiny(arch, "lm").to(dtype)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
    blocks = model.model.layers

    def saved(first_trainable):
        model.requires_grad_(False)  # embeddings too: backward must stop at the boundary
        for i, block in enumerate(blocks):
            block.requires_grad_(i >= first_trainable)
        seen = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in param_storages:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids)
        return sum(seen.values())

    n = len(blocks)
    return saved(n - 2) - saved(n - 1), model


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_block_activations_equal_measured_saved_tensors(arch, dtype_name):
    import torch

    from lfdist.activations import block_activation_bytes
    from lfdist.model.info import model_info

    measured, model = _saved_bytes_per_block(arch, getattr(torch, dtype_name))
    info = model_info(model, "lm")
    assert measured == block_activation_bytes(info, 2, 24, 4 if dtype_name == "float32" else 2)


# ---------------------------------------------------------------- measured: one bf16 AdamW step


@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
def test_bf16_adamw_step_bytes_equal_prediction_on_tiny_llama(precision):
    """Build tiny:llama in bf16, apply a plan with every treatment, hold it as the engines do in
    `precision`, take one AdamW step and walk the parameters, gradients and optimizer states."""
    import torch

    from lfdist.cost import predict_plan
    from lfdist.engines.base import keep_trainable_in
    from lfdist.model.apply import apply_plan
    from lfdist.model.info import model_info
    from lfdist.model.tiny import build_tiny
    from lfdist.precision import resolve
    from tests.helpers import make_plan

    model = build_tiny("llama", "lm").to(torch.bfloat16)
    info = model_info(model, "lm")
    treatments = ["frozen"] * 4 + ["bias", "lora", "mask", "full"]
    plan = make_plan(model, treatments, options={"lora_rank": 4})
    apply_plan(model, plan)
    keep_trainable_in(model, resolve("bfloat16", precision))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3, fused=True)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    t = 2 if precision == "bf16" else 4  # bytes of a trainable weight, gradient, state

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    params = nbytes(model.parameters())
    grads = nbytes(p.grad for p in trainable)
    states = [s for p in trainable for s in opt.state[p].values()]
    moments = [s for s in states if s.dim() > 0]
    assert {s.dtype for s in moments} == {torch.bfloat16 if t == 2 else torch.float32}
    assert nbytes(s for s in states if s.dim() == 0) == 4 * len(trainable)  # step counters

    # By hand: a block has q 4096, k 2048, v 2048, o 4096, gate/up/down 8192 each (36864 in
    # projections) and 2 norms of 64 (36992); bias -> 128 norm weights; lora r=4 on q,k,v,o:
    # 4·(128+96+96+128) = 1792 adapters + 128 norm weights; mask -> 36864 scores; full ->
    # 36992; final norm 64, head 20480. Held: 8·36992 + embeddings 20480 + 64 + 20480 + the
    # 1792 adapters + the 36864 scores.
    trainable_el = 128 + 1792 + 128 + 36864 + 36992 + 64 + 20480
    assert sum(p.numel() for p in trainable) == trainable_el
    held = 8 * 36992 + 20480 + 64 + 20480 + 1792 + 36864
    assert params == 2 * (held - trainable_el) + t * trainable_el
    assert grads == t * trainable_el
    assert nbytes(moments) == 2 * t * trainable_el

    p = predict_plan(
        info, plan, engine="single", world_size=1, dtype="bfloat16", precision=precision
    )
    assert p["bytes"]["params"] == params
    assert p["bytes"]["grads"] == grads
    assert p["bytes"]["optimizer"] == nbytes(moments)


def test_select_costs_with_activation_checkpointing():
    from lfdist.select import select_plan
    from tests.helpers import fake_probe

    probe = fake_probe()  # 8 blocks of 100, hidden 1
    plain = select_plan(probe, "top", options={"n": 2})
    ckpt = select_plan(probe, "top", options={"n": 2, "activation_checkpointing": True})
    assert ckpt.options["activation_checkpointing"] is True
    assert ckpt.predicted["activation_checkpointing"] is True
    # two checkpointed blocks recompute their forward: 2 x 2·100·tokens more backward FLOPs
    tokens = plain.predicted["batch_size"] * plain.predicted["seq_len"]
    assert ckpt.predicted["flops_backward"] - plain.predicted["flops_backward"] == 2 * 200 * tokens
