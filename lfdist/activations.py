"""Bytes one transformer block saves for backward (pure arithmetic, no torch).

Llama-style blocks (RMSNorm, SDPA attention with grouped KV heads, gated MLP), per token in
dtype bytes b, hidden H, MLP width I, a heads, KV width K = kv_heads·H/a:

    (6b + 8)·H + 4b·I + 2b·K + 4a + 8

read off Hugging Face's modules with saved-tensor hooks (tests/unit/test_cost.py measures it
exactly on tiny llama, mistral and qwen2 in bf16 and fp32): six H-wide tensors in dtype
(each norm's output before and after its weight, q, attention output), each norm's input in
fp32 (4 bytes, which in fp32 is the residual stream itself), four I-wide MLP tensors (gate,
its SiLU, up, their product), k and v, SDPA's fp32 log-sum-exp, the norms' fp32 rstd.
The attention-score matrix is never saved: SDPA recomputes it. Another SDPA backend can
differ (the math backend would store the T x T scores).

Any other block: 34·B·T·H bytes at 16 bits (Korthikanti et al. 2022, "Reducing activation
recomputation in large transformer models", GPT blocks with a 4H MLP), scaled by dtype, also
without the 5·a·T² score term.
"""

from __future__ import annotations

from typing import Any

GATED_LLAMA_STYLE = ("llama", "mistral", "qwen2")
KORTHIKANTI_16BIT = 34


def _llama_style(model_info: dict[str, Any]) -> bool:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    return model_info.get("model_type") in GATED_LLAMA_STYLE and all(
        model_info.get(k) for k in keys
    )


def block_activation_bytes(
    model_info: dict[str, Any], batch_size: int, seq_len: int, dtype_bytes: int
) -> int:
    """Bytes saved for backward by one block on batch_size x seq_len tokens."""
    b = dtype_bytes
    tokens = batch_size * seq_len
    hidden = int(model_info.get("hidden_size") or 0)
    if not _llama_style(model_info):
        return KORTHIKANTI_16BIT * tokens * hidden * b // 2
    heads = int(model_info["num_attention_heads"])
    kv_width = int(model_info["num_key_value_heads"]) * hidden // heads
    per_token = (
        (6 * b + 8) * hidden
        + 4 * b * int(model_info["intermediate_size"])
        + 2 * b * kv_width
        + 4 * heads
        + 8
    )
    return tokens * per_token


def lm_head_activation_bytes(
    model_info: dict[str, Any],
    batch_size: int,
    seq_len: int,
    dtype_bytes: int,
    norm_trains: bool,
    head_trains: bool,
) -> int:
    """What the final norm, LM head and loss save: fp32 log-softmax (4·V per token), the int64
    targets, the loss scalar, and the H-wide input of each of norm weight and head weight that
    trains (measured exactly on tiny llama by tests/unit/test_bench_gpu.py)."""
    tokens = batch_size * seq_len
    vocab = int(model_info.get("vocab_size") or 0)
    hidden = int(model_info.get("hidden_size") or 0)
    widths = int(norm_trains) + int(head_trains)
    return tokens * (4 * vocab + 8 + widths * dtype_bytes * hidden) + 4


def rotary_bytes(model_info: dict[str, Any], seq_len: int, dtype_bytes: int) -> int:
    """cos and sin (1 x T x head_dim each), saved once and shared by every block that needs
    input gradients; 0 outside Llama-style models."""
    if not _llama_style(model_info):
        return 0
    head_dim = int(model_info["hidden_size"]) // int(model_info["num_attention_heads"])
    return 2 * seq_len * head_dim * dtype_bytes
