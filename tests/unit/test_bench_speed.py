"""benchmarks/gpu/run.sh --tiny on the CPU: the GPU benchmark's own path (plain loop and lfdist
engines through the real launcher, one after another), exact where it can be."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_speed_benchmark_tiny_runs_plain_loop_and_engines_on_the_same_data(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "gpu", "run.sh")
    cmd = ["bash", script, "--tiny", "--engines", "ddp,fsdp2", "--out", str(tmp_path)]
    env = dict(os.environ, LFDIST_CACHE=os.environ.get("LFDIST_CACHE", str(tmp_path / "cache")))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "speed-tiny.json").read_text())
    rows = {(r["plan"], r["run"]): r for r in result["rows"]}
    runs = ["plain fp32", "lfdist ddp", "lfdist fsdp2"]
    assert sorted(rows) == sorted((p, r) for p in ("full", "top quarter") for r in runs)
    assert all("error" not in r for r in rows.values())
    for plan in ("full", "top quarter"):
        plain = rows[plan, "plain fp32"]
        assert plain["ratio"] == 1.0
        for run in runs[1:]:
            r = rows[plan, run]
            # same weights, data, order, lr schedule and clipping: the same losses
            assert r["losses"] == pytest.approx(plain["losses"], abs=1e-5), (plan, run)
            assert r["precision"] == "fp32" and r["ratio"] > 0
            assert r["predicted"]["engine"] == run.split()[-1]
            assert r["predicted_gib"] > 0 and r["peak_gib"] > 0  # peak RSS on a CPU
    top = rows["top quarter", "lfdist ddp"]
    assert top["predicted"]["flops_fraction"] < 1 and top["plan_over_full"] > 0
    md = (tmp_path / "speed-tiny.md").read_text()
    assert "| top quarter | lfdist fsdp2 | fp32 |" in md
