"""Analytic cost model: per-rank memory and training FLOPs of a plan on an engine.

Pure arithmetic on the probe's `model_info` (no torch), so `select` can cost every
candidate plan in microseconds and benchmarks can print predicted next to measured.

Assumptions (each is a number a benchmark can check):
- `dtype` is the model's dtype as loaded, `precision` the run's (lfdist.precision; auto:
  bf16-mixed for bf16 models). DDP, FSDP and `single` hold frozen parameters in `dtype` and
  trainable ones, their gradients and AdamW's exp_avg and exp_avg_sq in the precision's
  trainable dtype: under bf16-mixed 4 + 4 + 8 bytes per trainable element and 2 per frozen one
  (tests/distributed/test_precision.py measures it); pure bf16 2 + 2 + 4. Activations are in the
  compute dtype. Under bf16-mixed, autocast (DDP, FSDP1, single) keeps bf16 copies of the
  trainable weights for the step and FSDP2 all-gathers each block in bf16: both counted as
  transient. DeepSpeed holds every parameter and gradient in `dtype` and its ZeRO optimizers
  keep an fp32 master copy plus two fp32 states (12 bytes) of their partition, in fp32 runs
  too (measured: `lfdist bench memory` in fp32, tests/distributed/test_cost_deepspeed_bf16.py
  in bf16); pure bf16 asks it for bf16 masters and states (6 bytes). AdamW's per-tensor step
  counter is left out.
- frozen parameters get no gradient and no optimizer state on any engine.
- treatments: `lora` trains r·(in + out) adapter elements per targeted projection (the
  attention projections, `per_block_lora_in_out`; r from the plan's options) plus the block's
  biases (norm weights on bias-free models); adapters add to the parameters held. `mask`
  trains one score per projection weight element, also added to the parameters held.
- sharding: ddp/single replicate everything; fsdp1/fsdp2 shard parameters (frozen included),
  gradients and optimizer states by world size; ZeRO-1 partitions optimizer states, ZeRO-2
  also gradients, ZeRO-3 also parameters (frozen included).
- FSDP and ZeRO-3 all-gather one block at a time: the largest block in `dtype` is added as
  transient memory.
- activations saved for backward, per block at or above the backward boundary (lfdist.activations).
  With activation checkpointing (non-reentrant, trainable blocks only) a trainable block keeps
  only its input, B·T·H in `dtype`, plus one block's full activations while it is recomputed.
  LM heads add the fp32 log-softmax, B·T·V·4 bytes, the targets and the inputs of the final
  norm and head weights that train; Llama-style models add the shared rotary cos/sin.
- FLOPs: forward 2·N·tokens over blocks and head; backward 2·N·tokens for the input gradient of
  every stage at or above the boundary plus 2·N_trainable·tokens for weight gradients; with
  activation checkpointing each checkpointed block's forward runs twice. A frozen prefix with
  trainable fraction f of block parameters costs (2 + 4f)/6 of full fine-tuning. Attention's T²
  FLOPs, norms and LoRA's own forward matmuls are ignored; so is the boundary block's skipped
  input gradient (at most 2/(6L) of the total).
- the total is the sum of the parts, not a simulated peak: gradients grow while activations are
  freed during backward, and the loss's logits temporaries (bf16 logits, their fp32 copy, their
  gradient) and optimizer-step temporaries are not counted. benchmarks/gpu compares it with
  torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

from typing import Any

from lfdist.activations import block_activation_bytes, lm_head_activation_bytes, rotary_bytes
from lfdist.constants import ENGINES
from lfdist.errors import UserError
from lfdist.precision import BYTES, Precision
from lfdist.precision import resolve as resolve_precision

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
GIB = 2**30
FP32_ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq in fp32 (DeepSpeed, whatever the dtype)
MASTER_BYTES = 4  # DeepSpeed's fp32 master partition (kept whatever the dtype)
DEFAULT_LORA_RANK = 8  # lfdist.model.treatments.LORA_DEFAULTS (not imported: it pulls torch)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")


def _check(engine, zero_stage, world_size, dtype, batch_size, seq_len, lora_rank) -> None:
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if engine == "deepspeed" and zero_stage not in (0, 1, 2, 3):
        raise UserError(f"zero_stage={zero_stage!r} is not a ZeRO stage; use 0, 1, 2 or 3")
    for name, value in (
        ("world_size", world_size),
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("lora_rank", lora_rank),
    ):
        _positive_int(name, value)
    if dtype not in DTYPE_BYTES:
        raise UserError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")


def optimizer_bytes_per_element(
    engine: str, zero_stage: int, dtype: str, precision: str = "auto"
) -> int:
    """AdamW state bytes per trainable element, before sharding (DeepSpeed: with its master)."""
    prec = resolve_precision(_dtype_name(dtype), precision)
    b = DTYPE_BYTES[dtype]
    if engine == "deepspeed":
        if prec.name == "bf16":  # bf16_master_weights_and_grads + bf16_optimizer_states
            return 3 * b
        # ZeRO (stage >= 1) keeps an fp32 master partition even in fp32; stage 0 with 16 bits.
        if zero_stage >= 1 or b < 4:
            return FP32_ADAM_STATE_BYTES + MASTER_BYTES
    return 2 * BYTES[prec.trainable]  # torch.optim.AdamW: states typed like the parameter


def _dtype_name(dtype: str) -> str:
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)


def run_precision(dtype: str, precision: str = "auto") -> Precision:
    return resolve_precision(_dtype_name(dtype), precision)


def added_elements(model_info: dict[str, Any], treatments: list[str], lora_rank: int) -> list[int]:
    """Elements a treatment adds to each block (LoRA adapters, mask scores); 0 elsewhere."""
    hidden = int(model_info.get("hidden_size") or 0)
    L = len(treatments)
    # Old probe.json files lack the sizes: q, k, v, o taken as H x H, all weights masked.
    in_out = model_info.get("per_block_lora_in_out") or [8 * hidden] * L
    projections = model_info.get("per_block_projection_params") or model_info["per_block_params"]
    out = []
    for i, t in enumerate(treatments):
        if t == "lora":
            out.append(lora_rank * in_out[i])
        elif t == "mask":
            out.append(projections[i])
        else:
            out.append(0)
    return out


def trainable_elements(
    model_info: dict[str, Any],
    treatments: list[str],
    modules: dict[str, str] | None = None,
    lora_rank: int = DEFAULT_LORA_RANK,
) -> list[int]:
    """Trainable elements per block: what gets a gradient and optimizer state."""
    per_block = model_info["per_block_params"]
    bias = model_info.get("per_block_bias_params") or [0] * len(per_block)
    added = added_elements(model_info, treatments, lora_rank)
    out = []
    for i, t in enumerate(treatments):
        if t == "full":
            out.append(per_block[i])
        elif t == "bias":
            out.append(bias[i])
        elif t == "lora":
            out.append(added[i] + bias[i])
        else:  # mask: the scores; frozen: nothing
            out.append(added[i])
    return out


def _head_matmul_params(model_info: dict[str, Any]) -> int:
    # A tied LM head has no parameters of its own but still costs a V x H matmul.
    return int(model_info.get("head_matmul_params") or model_info["group_params"].get("head", 0))


def _boundary(model_info, modules, train_el) -> int:
    """The lowest stage backward reaches: -1 embeddings, 0..L-1 blocks, L head, L+1 none."""
    per_block, groups = model_info["per_block_params"], model_info["group_params"]
    trainable_stages = [i for i, n in enumerate(train_el) if n > 0]
    if modules.get("embeddings") == "full" and groups.get("embeddings", 0) > 0:
        return -1
    if trainable_stages:
        return trainable_stages[0]
    head_train = modules.get("head") == "full" and groups.get("head", 0)
    if head_train or (modules.get("final_norm") == "full" and groups.get("final_norm", 0)):
        return len(per_block)
    return len(per_block) + 1


def _flops(model_info, modules, train_el, tokens, ckpt) -> tuple[float, float]:
    """(forward, backward) FLOPs for `tokens` tokens; recompute counts as backward."""
    per_block = model_info["per_block_params"]
    head_n = _head_matmul_params(model_info)
    head_train = model_info["group_params"].get("head", 0) if modules.get("head") == "full" else 0
    boundary = _boundary(model_info, modules, train_el)
    fwd = 2.0 * tokens * (sum(per_block) + head_n)
    bwd = 0.0
    for i, n in enumerate(per_block):
        if i >= boundary:
            bwd += 2.0 * tokens * (n + train_el[i])
        if ckpt and train_el[i] > 0:
            bwd += 2.0 * tokens * n
    if boundary <= len(per_block):
        bwd += 2.0 * tokens * (head_n + (head_n if head_train else 0))
    return fwd, bwd


def _activations(model_info, modules, train_el, b, batch_size, seq_len, ckpt) -> float:
    tokens = batch_size * seq_len
    hidden = int(model_info.get("hidden_size") or 0)
    full_block = block_activation_bytes(model_info, batch_size, seq_len, b)
    boundary = max(0, _boundary(model_info, modules, train_el))
    above = range(boundary, len(model_info["per_block_params"]))
    checkpointed = [i for i in above if ckpt and train_el[i] > 0]
    acts = (len(above) - len(checkpointed)) * full_block
    if checkpointed:  # inputs kept, one block recomputed at a time
        acts += len(checkpointed) * tokens * hidden * b + full_block
    if len(above):
        acts += rotary_bytes(model_info, seq_len, b)
    if model_info.get("task", "lm") == "lm":
        groups = model_info["group_params"]
        norm, head = (
            modules.get(g) == "full" and groups.get(g, 0) > 0 for g in ("final_norm", "head")
        )
        acts += lm_head_activation_bytes(model_info, batch_size, seq_len, b, norm, head)
    return float(acts)


def _memory(model_info, treatments, modules, train_el, added, settings) -> dict[str, float]:
    engine, zero_stage, w, dtype, precision, batch_size, seq_len, ckpt = settings
    prec = run_precision(dtype, precision)
    b = DTYPE_BYTES[dtype]
    per_block = model_info["per_block_params"]
    groups = model_info["group_params"]
    total = sum(per_block) + sum(groups.values()) + sum(added)
    trainable = sum(train_el) + sum(n for g, n in groups.items() if modules.get(g) == "full")
    fsdp = engine in ("fsdp1", "fsdp2")
    zero = zero_stage if engine == "deepspeed" else 0
    shard_params = fsdp or zero >= 3
    # DeepSpeed holds the module in `dtype` (its masters are in the optimizer's bytes).
    b_train = b if engine == "deepspeed" else BYTES[prec.trainable]
    b_compute = BYTES[prec.compute]
    params = ((total - trainable) * b + trainable * b_train) / (w if shard_params else 1)
    grads = trainable * b_train / (w if fsdp or zero >= 2 else 1)
    opt_per_el = optimizer_bytes_per_element(engine, zero_stage, dtype, precision)
    optim = trainable * opt_per_el / (w if fsdp or zero >= 1 else 1)
    acts = _activations(model_info, modules, train_el, b_compute, batch_size, seq_len, ckpt)
    largest = max(per_block, default=0)
    transient = largest * b if shard_params and w > 1 else 0
    if prec.mixed and engine != "deepspeed":
        if engine == "fsdp2":  # one block all-gathered in the compute dtype at a time
            transient = largest * b_compute
        else:  # autocast's compute-dtype copies of the trainable weights, for the step
            transient += trainable * b_compute
    return {
        "params": params,
        "grads": grads,
        "optimizer": optim,
        "activations": acts,
        "transient": float(transient),
        "total": params + grads + optim + acts + transient,
        "_trainable": trainable,
        "_total": total,
        # weight + gradient + AdamW state (+ DeepSpeed's master) per trainable element
        "_b_trainable": b_train * 2 + opt_per_el,
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
    activation_checkpointing: bool = False,
    precision: str = "auto",
) -> dict[str, Any]:
    """Per-rank bytes and per-rank FLOPs for one optimizer step, plus fractions of full FT.

    Full fine-tuning is the same model, engine and modules with every block `full`.
    """
    _check(engine, zero_stage, world_size, dtype, batch_size, seq_len, lora_rank)
    if len(treatments) != len(model_info["per_block_params"]):
        raise ValueError(
            f"{len(treatments)} treatments for {len(model_info['per_block_params'])} blocks"
        )
    ckpt = bool(activation_checkpointing)
    prec = run_precision(dtype, precision)
    settings = (engine, zero_stage, world_size, dtype, precision, batch_size, seq_len, ckpt)
    tokens = batch_size * seq_len

    def cost(ts):
        el = trainable_elements(model_info, ts, modules, lora_rank)
        added = added_elements(model_info, ts, lora_rank)
        mem = _memory(model_info, ts, modules, el, added, settings)
        fwd, bwd = _flops(model_info, modules, el, tokens, ckpt)
        return mem, fwd, bwd

    mem, fwd, bwd = cost(treatments)
    mem_full, fwd_full, bwd_full = cost(["full"] * len(treatments))
    trainable, total = mem.pop("_trainable"), mem.pop("_total")
    per_trainable = mem.pop("_b_trainable")
    return {
        "engine": engine,
        "zero_stage": zero_stage if engine == "deepspeed" else None,
        "world_size": world_size,
        "dtype": dtype,
        "precision": prec.name,
        "bytes_per_trainable_param": per_trainable,
        "bytes_per_frozen_param": DTYPE_BYTES[dtype],
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lora_rank": lora_rank,
        "activation_checkpointing": ckpt,
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


def predict_plan(model_info: dict[str, Any], plan, **settings) -> dict[str, Any]:
    """`predict` for a Plan: its treatments, modules and LoRA rank (plan.options)."""
    rank = plan.options.get("lora_rank")
    settings.setdefault("lora_rank", DEFAULT_LORA_RANK if rank is None else rank)
    return predict(model_info, plan.treatments, plan.modules, **settings)
