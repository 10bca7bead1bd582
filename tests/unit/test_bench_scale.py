"""benchmarks/scale: the predicted table's rows, checked by hand on Llama-3.1-8B."""

from __future__ import annotations

import os

import pytest

from lfdist.cost import GIB

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOCK_8B = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096  # 218,112,000
TOTAL_8B = 8_030_261_248
HEAD_8B = 128256 * 4096
# One Llama-3.1-8B block's saved activations per token in bf16 (lfdist.activations):
# 20·4096 + 8·14336 + 4·1024 + 4·32 + 8
ACT_TOKEN = 200840
TOKENS = 4096


def test_scale_rows_by_hand(tmp_path):
    from lfdist.bench.scale import markdown, plot, rows

    table = rows({"Llama-3.1-8B": os.path.join(ROOT, "configs/models/llama-3.1-8b.json")})
    assert len(table) == 4 * 3 * 2  # plans x engines x activation checkpointing
    row = next(
        r
        for r in table
        if (r["plan"], r["engine"], r["activation_checkpointing"]) == ("top 25%", "FSDP2", False)
    )
    trainable = 8 * BLOCK_8B + 4096 + HEAD_8B  # top 8 blocks, final norm, head
    assert row["trainable_params"] == trainable
    g = row["gib_per_rank"]["8"]
    # bf16-mixed: frozen weights in bf16, trainable ones with fp32 masters, gradients and states
    assert g["params"] * GIB == pytest.approx(((TOTAL_8B - trainable) * 2 + trainable * 4) / 8)
    assert g["grads"] * GIB == pytest.approx(trainable * 4 / 8)
    assert g["optimizer"] * GIB == pytest.approx(trainable * 8 / 8)  # fp32 AdamW states
    # 8 blocks; fp32 log-softmax 4·V, int64 targets and the bf16 inputs of the final norm's and
    # head's weights per token; the loss scalar; rotary cos + sin (4096 x 128 each, bf16)
    head = TOKENS * (4 * 128256 + 8 + 2 * 2 * 4096) + 4
    assert g["activations"] * GIB == pytest.approx(
        8 * TOKENS * ACT_TOKEN + head + 2 * 4096 * 128 * 2
    )
    assert g["transient"] * GIB == pytest.approx(BLOCK_8B * 2)
    zero2 = next(
        r
        for r in table
        if (r["plan"], r["engine"], r["activation_checkpointing"]) == ("full", "ZeRO-2", True)
    )
    # ZeRO-2 replicates the bf16 parameters: 16.06e9 bytes on every rank whatever the size
    assert zero2["gib_per_rank"]["512"]["params"] * GIB == pytest.approx(TOTAL_8B * 2)
    md = markdown(table)
    assert "Predicted by the cost model" in md and md.count("| top 10% |") == 6 + 3
    plot(table, str(tmp_path / "scale.png"))
    assert (tmp_path / "scale.png").stat().st_size > 10_000
