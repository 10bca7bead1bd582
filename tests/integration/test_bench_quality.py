"""`lfdist bench quality --tiny`: the oracle sweep, the scores, the files; --reuse re-scores
without training anything."""

from __future__ import annotations

import json
import os

import pytest

from lfdist.bench.quality import TINY_TASKS, run
from lfdist.cli import main


@pytest.mark.slow
def test_tiny_bench_quality_then_reuse(tmp_path, monkeypatch):
    out = str(tmp_path / "q")
    md = run(out, tiny=True)
    assert md == os.path.join(out, "quality.md")
    for name in ("quality.json", "quality.md", "quality.png", "oracle-tiny-bert.json"):
        assert os.path.isfile(os.path.join(out, name))
    with open(os.path.join(out, "quality.json")) as f:
        result = json.load(f)
    assert [t["task"]["name"] for t in result["tasks"]] == ["tiny-bert", "tiny-llama"]
    for r, spec in zip(result["tasks"], TINY_TASKS):
        assert set(map(int, r["oracle"])) >= set(spec.ks)
        assert all(len(s["quality"]) == len(spec.seeds) for s in r["oracle"].values())
        assert r["k_tol"] in spec.ks
        assert set(r["at_budget"]) == {
            "salf",
            "top",
            "bottom",
            "random",
            "gradnorm",
            "critical",
            "lisa",
            "lora",
        }
        # salf's pick at its own budget is a frozen prefix: the oracle's run of that split.
        salf = r["at_budget"]["salf"]
        assert salf["quality"] == r["oracle"][str(8 - r["budget_blocks"])]["quality"]
        assert len(salf["trained_blocks"]) == r["budget_blocks"]
        assert r["salf"]["cost"]["fraction"] > 0
        assert r["salf"]["plan_cost_fraction"] > 0  # the probe's share, pilots or not
    # tiny-bert also scores salf's pilot estimator (pilots of 2 and 4 steps, outside the budget)
    bert, llama = result["tasks"]
    sp = bert["salf_pilot"]
    assert sp["lengths"] == [2, 4] and sp["depths"] == [1, 2, 4, 8]
    assert str(sp["k"]) in bert["oracle"] and bert["cheapest"]["salf (pilot, over budget)"]
    assert llama["salf_pilot"] is None
    # tiny-llama scores salf's halving estimator outside the budget (a 2-step first round)
    over = llama["estimators"]["halving, 2-step first round (over budget)"]
    assert over["over_budget"] and over["halving"]["rounds"][0]["steps"] == 2
    assert str(over["k"]) in llama["oracle"]
    assert "salf: halving, 2-step first round (over budget)" in llama["cheapest"]
    # salf's estimators inside the 5% budget: on 8-step runs only the trace fits, and the
    # others say why they did not run
    for r in result["tasks"]:
        est = r["estimators"]
        assert est["trace"]["k"] == r["salf"]["k"] and est["trace"]["pilots_s"] == 0.0
        assert "salf: trace (in budget)" in r["cheapest"]
        assert "fewer than 4" in est["pilot"]["skipped"]
        assert "first halving round of 0 steps" in est["halving"]["skipped"]
    with open(os.path.join(out, "oracle-tiny-llama.json")) as f:
        oracle = json.load(f)
    assert oracle["settings"]["seeds"] == [0, 1] and oracle["n_blocks"] == 8

    def no_training(*args, **kwargs):
        raise AssertionError("--reuse must not train a cached plan again")

    monkeypatch.setattr("lfdist.bench.oracle.train_one", no_training)
    again = str(tmp_path / "again")
    run(again, tiny=True, reuse=out)
    with open(os.path.join(again, "quality.json")) as f:
        rescored = json.load(f)
    assert rescored["reused"] == out
    assert [t["oracle"] for t in rescored["tasks"]] == [t["oracle"] for t in result["tasks"]]


def _exit_code(argv) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_reuse_is_refused_elsewhere_and_needs_an_oracle(tmp_path, capsys):
    argv = ["bench", "memory", "--tiny", "--out", str(tmp_path / "m"), "--reuse", "x"]
    assert _exit_code(argv) == 2
    assert "--reuse is for bench quality only" in capsys.readouterr().err
    out = tmp_path / "o"
    assert (
        _exit_code(["bench", "quality", "--tiny", "--out", str(out), "--reuse", str(tmp_path)]) == 2
    )
    assert "holds no oracle-tiny-bert.json" in capsys.readouterr().err
    assert not out.exists()
