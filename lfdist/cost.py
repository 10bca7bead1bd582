"""Analytic cost model: per-rank memory and training FLOPs of a plan on an engine.

Pure arithmetic on the probe's `model_info` (no torch), so `select` can cost every
candidate plan in microseconds and benchmarks can print predicted next to measured.

Assumptions (each is a number a benchmark can check):
- parameters and gradients are held in `dtype`; AdamW keeps 2 fp32 states (8 bytes) per
  trainable element, and the optimizer only ever sees trainable parameters; DeepSpeed's ZeRO
  optimizers also keep an fp32 master copy (4 bytes) of their partition, in fp32 runs too
  (measured: `lfdist bench memory`).
- frozen parameters get no gradient and no optimizer state on any engine.
- sharding: ddp/single replicate everything; fsdp1/fsdp2 shard parameters (frozen included),
  gradients and optimizer states by world size; ZeRO-1 partitions optimizer states, ZeRO-2
  also gradients, ZeRO-3 also parameters (frozen included).
- FSDP and ZeRO-3 all-gather one block at a time: the largest block in `dtype` is added as
  transient memory.
- activations saved for backward, per block at or above the backward boundary:
  34·B·T·H bytes at 16 bits (Korthikanti et al. 2022, "Reducing activation recomputation"),
  scaled by dtype; the 5·a·T² attention-score term is left out because SDPA/flash attention
  recompute scores instead of storing them. LM heads add fp32 logits, B·T·V·4 bytes.
- FLOPs: forward 2·N·tokens over blocks and head; backward 2·N·tokens for the input gradient of
  every stage at or above the boundary plus 2·N_trainable·tokens for weight gradients. A frozen
  prefix with trainable fraction f of block parameters costs (2 + 4f)/6 of full fine-tuning.
  Attention's T² FLOPs and norms are ignored; the boundary block's skipped input gradient is
  ignored too (at most 2/(6L) of the total).
"""

from __future__ import annotations

from typing import Any

from lfdist.errors import UserError

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
ENGINES = ("single", "ddp", "fsdp1", "fsdp2", "deepspeed")
GIB = 2**30
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq in fp32
MASTER_BYTES = 4  # DeepSpeed's fp32 master partition (kept whatever the dtype)
ACT_BYTES_PER_TOKEN_HIDDEN_16BIT = 34
DEFAULT_LORA_RANK = 8


def _check(
    engine: str, zero_stage: int, world_size: int, dtype: str, batch_size: int, seq_len: int
) -> None:
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if engine == "deepspeed" and zero_stage not in (0, 1, 2, 3):
        raise UserError(f"zero_stage={zero_stage!r} is not a ZeRO stage; use 0, 1, 2 or 3")
    for name, value in (
        ("world_size", world_size),
        ("batch_size", batch_size),
        ("seq_len", seq_len),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if dtype not in DTYPE_BYTES:
        raise UserError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")


def trainable_elements(
    model_info: dict[str, Any],
    treatments: list[str],
    modules: dict[str, str],
    lora_rank: int = DEFAULT_LORA_RANK,
) -> list[int]:
    """Trainable elements per block: what gets a gradient and optimizer state."""
    per_block = model_info["per_block_params"]
    bias = model_info.get("per_block_bias_params") or [0] * len(per_block)
    hidden = int(model_info.get("hidden_size") or 0)
    out = []
    for i, t in enumerate(treatments):
        if t == "full" or t == "mask":  # mask: one real-valued score per weight element
            out.append(per_block[i])
        elif t == "bias":
            out.append(bias[i])
        elif t == "lora":  # approximate: q, k, v, o taken as H x H, A and B each r x H
            out.append(4 * 2 * lora_rank * hidden)
        else:
            out.append(0)
    return out


def _head_matmul_params(model_info: dict[str, Any]) -> int:
    # A tied LM head has no parameters of its own but still costs a V x H matmul.
    return int(model_info.get("head_matmul_params") or model_info["group_params"].get("head", 0))


def _flops(model_info, treatments, modules, train_el, tokens) -> tuple[float, float]:
    """(forward, backward) FLOPs for `tokens` tokens."""
    per_block = model_info["per_block_params"]
    groups = model_info["group_params"]
    head_n = _head_matmul_params(model_info)
    head_train = groups.get("head", 0) if modules.get("head") == "full" else 0
    # Stages bottom to top: embeddings (-1), blocks 0..L-1, head (L). Embedding lookups cost no
    # matmul FLOPs, but training them moves the boundary below every block.
    trainable_stages = [i for i, n in enumerate(train_el) if n > 0]
    if modules.get("embeddings") == "full" and groups.get("embeddings", 0) > 0:
        boundary = -1
    elif trainable_stages:
        boundary = trainable_stages[0]
    elif head_train or (modules.get("final_norm") == "full" and groups.get("final_norm", 0)):
        boundary = len(per_block)
    else:
        boundary = len(per_block) + 1  # nothing trains: no backward at all
    fwd = 2.0 * tokens * (sum(per_block) + head_n)
    bwd = 0.0
    for i, n in enumerate(per_block):
        if i >= boundary:
            bwd += 2.0 * tokens * (n + train_el[i])
    if boundary <= len(per_block):
        bwd += 2.0 * tokens * (head_n + (head_n if head_train else 0))
    return fwd, bwd


def _memory(
    model_info,
    treatments,
    modules,
    train_el,
    engine,
    zero_stage,
    world_size,
    dtype,
    batch_size,
    seq_len,
) -> dict[str, float]:
    b = DTYPE_BYTES[dtype]
    per_block = model_info["per_block_params"]
    groups = model_info["group_params"]
    total = sum(per_block) + sum(groups.values())
    adapters = sum(e for e, t in zip(train_el, treatments) if t == "lora")
    group_train = sum(n for g, n in groups.items() if modules.get(g) == "full")
    trainable = sum(train_el) + group_train
    w = world_size
    fsdp = engine in ("fsdp1", "fsdp2")
    zero = zero_stage if engine == "deepspeed" else 0
    shard_params = fsdp or zero >= 3
    shard_grads = fsdp or zero >= 2
    shard_optim = fsdp or zero >= 1
    # ZeRO (stage >= 1) keeps an fp32 master partition even in fp32; stage 0 only with 16 bits.
    master = engine == "deepspeed" and (zero_stage >= 1 or b < 4)
    opt_per_el = ADAM_STATE_BYTES + (MASTER_BYTES if master else 0)
    params = (total + adapters) * b / (w if shard_params else 1)
    grads = trainable * b / (w if shard_grads else 1)
    optim = trainable * opt_per_el / (w if shard_optim else 1)
    hidden = int(model_info.get("hidden_size") or 0)
    tokens = batch_size * seq_len
    trainable_blocks = [i for i, n in enumerate(train_el) if n > 0]
    boundary = (
        0
        if modules.get("embeddings") == "full"
        else (trainable_blocks[0] if trainable_blocks else len(per_block))
    )
    saved_blocks = len(per_block) - boundary
    acts = saved_blocks * ACT_BYTES_PER_TOKEN_HIDDEN_16BIT * tokens * hidden * b / 2
    if model_info.get("task", "lm") == "lm":
        acts += tokens * int(model_info.get("vocab_size") or 0) * 4
    transient = max(per_block, default=0) * b if shard_params and w > 1 else 0
    return {
        "params": params,
        "grads": grads,
        "optimizer": optim,
        "activations": float(acts),
        "transient": float(transient),
        "total": params + grads + optim + acts + transient,
        "_trainable": trainable,
        "_total": total + adapters,
    }


def predict(
    model_info: dict[str, Any],
    treatments: list[str],
    modules: dict[str, str],
    engine: str = "fsdp2",
    zero_stage: int = 2,
    world_size: int = 1,
    dtype: str = "bfloat16",
    batch_size: int = 4,
    seq_len: int = 512,
    lora_rank: int = DEFAULT_LORA_RANK,
) -> dict[str, Any]:
    """Per-rank bytes and per-rank FLOPs for one optimizer step, plus fractions of full FT.

    Full fine-tuning is the same model, engine and modules with every block `full`.
    """
    _check(engine, zero_stage, world_size, dtype, batch_size, seq_len)
    if len(treatments) != len(model_info["per_block_params"]):
        raise ValueError(
            f"{len(treatments)} treatments for {len(model_info['per_block_params'])} blocks"
        )
    args = (engine, zero_stage, world_size, dtype, batch_size, seq_len)
    tokens = batch_size * seq_len
    full = ["full"] * len(treatments)

    def cost(ts):
        el = trainable_elements(model_info, ts, modules, lora_rank)
        mem = _memory(model_info, ts, modules, el, *args)
        fwd, bwd = _flops(model_info, ts, modules, el, tokens)
        return mem, fwd, bwd

    mem, fwd, bwd = cost(treatments)
    mem_full, fwd_full, bwd_full = cost(full)
    trainable, total = mem.pop("_trainable"), mem.pop("_total")
    for k in ("_trainable", "_total"):
        mem_full.pop(k)
    return {
        "engine": engine,
        "zero_stage": zero_stage if engine == "deepspeed" else None,
        "world_size": world_size,
        "dtype": dtype,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "params_total": int(total),
        "params_trainable": int(trainable),
        "trainable_fraction": trainable / max(1, total),
        "bytes": {k: float(v) for k, v in mem.items()},
        "gib_per_rank": mem["total"] / GIB,
        "gib_per_rank_full": mem_full["total"] / GIB,
        "memory_fraction": mem["total"] / mem_full["total"] if mem_full["total"] else 1.0,
        "flops_forward": fwd,
        "flops_backward": bwd,
        "flops_per_step": fwd + bwd,
        "flops_full_per_step": fwd_full + bwd_full,
        "flops_fraction": (fwd + bwd) / (fwd_full + bwd_full) if fwd_full + bwd_full else 1.0,
    }
