"""`python -m lfdist.bench.gpu --tiny` on the CPU: the GPU memory check's own path, exact where
it can be."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_script_tiny_mode_measures_what_the_cost_model_predicts(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "lfdist.bench.gpu", "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "tiny_cpu.json").read_text())
    rows = result["rows"]
    assert [(r["plan"], r["activation_checkpointing"]) for r in rows] == [
        ("full", False),
        ("full", True),
        ("top quarter", False),
        ("top quarter", True),
    ]
    for r in rows:
        pred, meas = r["predicted"], r["measured"]
        # tiny:llama in bf16: 336,960 parameters, 2 bytes each, whatever the plan
        assert meas["params"] == pred["params"] == 2 * 336960
        for key in ("grads", "optimizer"):
            assert meas[key] == pred[key], (r["plan"], key)
        if r["activation_checkpointing"]:
            assert meas["activations"] is None  # hidden from saved-tensor hooks
        else:
            assert meas["activations"] == pred["activations"], r["plan"]
        assert r["peak_kind"] == "process peak RSS" and r["step_s_median"] > 0
    # top quarter = 2 of 8 blocks (2·36992) + final norm 64 + head 20480, bf16 grads
    assert rows[2]["measured"]["grads"] == 2 * (2 * 36992 + 64 + 20480)
    assert result["card"] == {"device": "cpu"}
    assert "not GPU numbers" in (tmp_path / "tiny_cpu.md").read_text()
