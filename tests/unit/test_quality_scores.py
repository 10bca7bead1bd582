"""Selection-quality scores (SPEC 6) on hand-made oracle summaries, values computed by hand."""

from __future__ import annotations

import pytest

from lfdist.bench.oracle import plan_key, prefix
from lfdist.bench.quality_scores import (
    best_within,
    cheapest_score,
    k_tol,
    separation,
    shortfall,
    within,
)


def _s(mean, std=0.0, step=1.0):
    return {"mean": mean, "std": std, "step_s": step}


ACC = {  # accuracy points on a 6-block classifier
    0: _s(95.0, 0.5, 2.0),
    1: _s(94.5, 0.5, 1.8),
    2: _s(94.2, 0.4, 1.6),
    3: _s(93.8, 0.3, 1.4),
    4: _s(90.0, 0.6, 1.2),
    5: _s(85.0, 1.0, 1.0),
}
PPL = {
    0: _s(16.0, 0.01, 2.6),
    4: _s(16.15, 0.02, 2.2),
    8: _s(16.2, 0.3, 2.0),
    16: _s(18.0, 0.1, 1.6),
}


def test_k_tol_in_the_users_metric():
    assert k_tol("classify", ACC) == 2  # 94.2 >= 95 - 1; 93.8 is 1.2 points down
    assert k_tol("lm", PPL) == 4  # 16.15 <= 16.16 (1% above 16.0); 16.2 is not
    assert k_tol("classify", ACC, tolerance=5.0) == 4
    assert within("lm", 16.0, 16.16) and not within("lm", 16.0, 16.17)


def test_cheapest_score_too_deep_and_shallow():
    deep = cheapest_score("classify", ACC, pick=4, oracle_k=2)
    assert deep["verdict"] == "too deep" and deep["shortfall"] == pytest.approx(5.0)
    assert deep["wasted_time"] == 0.0
    assert deep["saved_share"] == pytest.approx((2.0 - 1.2) / (2.0 - 1.6))  # 2.0: beyond k_tol
    shallow = cheapest_score("classify", ACC, pick=1, oracle_k=2)
    assert shallow["verdict"] == "shallow" and shallow["shortfall"] == 0.0
    assert shallow["wasted_time"] == pytest.approx(1.8 / 1.6 - 1)
    assert shallow["saved_share"] == pytest.approx(0.5)
    exact = cheapest_score("lm", PPL, pick=4, oracle_k=4)
    assert exact["verdict"] == "exact" and exact["saved_share"] == pytest.approx(1.0)
    assert cheapest_score("lm", PPL, 0, 0)["saved_share"] is None  # k_tol saves nothing


def test_shortfall_signs_and_best_within():
    assert shortfall("classify", 95.0, 93.0) == pytest.approx(2.0)
    assert shortfall("lm", 16.0, 16.8) == pytest.approx(5.0)  # percent of the perplexity
    assert shortfall("lm", 16.0, 15.2) == pytest.approx(-5.0)
    assert best_within("classify", ACC, 6, trainable=3) == 3  # k >= 3 fit; 93.8 is best
    assert best_within("lm", PPL, 30, trainable=14) == 16  # only k = 16 fits 14 blocks
    assert best_within("lm", PPL, 30, trainable=30) == 0


def test_separation_against_the_seed_spread():
    rows = {r["k"]: r for r in separation("classify", ACC)}
    assert rows[1]["gap"] == pytest.approx(0.5) and rows[1]["spread"] == pytest.approx(1.0)
    assert not rows[1]["resolved"] and rows[3]["resolved"]
    lm = {r["k"]: r for r in separation("lm", PPL)}
    assert lm[8]["spread"] == pytest.approx(100 * 0.31 / 16.0)  # 1.94% > the 1.25% gap
    assert not lm[8]["resolved"] and lm[4]["resolved"]


def test_plan_keys():
    assert plan_key(prefix(4, 1)) == "-FFF"
    lisa = plan_key(["full", "frozen"], "lisa", {"n": 1, "period": 20, "seed": 0})
    assert lisa == "F-|lisa:n=1,period=20,seed=0"
    assert plan_key(["lora", "lora"], "lora", {"lora_rank": 8, "x": 1}) == 'LL|{"lora_rank": 8}'


def test_reuse_refuses_another_recipe_but_not_another_grid(tmp_path):
    from lfdist.bench.oracle import Oracle
    from lfdist.errors import UserError

    settings = {"model": "m", "data": "d", "task": "lm", "steps": 10, "lr": 1e-4, "ks": [0, 4]}
    settings.update(seq_len=32, batch=2, warmup=0, max_examples=None, max_eval=8, n_eval=8)
    settings["seeds"] = [0]
    path = str(tmp_path / "oracle-x.json")
    first = Oracle(path, settings, 4)
    first.runs = {"FFFF": {"0": {"quality": 20.0, "median_step_s": 1.0, "trainable_params": 9}}}
    first.save()
    grown = Oracle.load(path, {**settings, "ks": [0, 1, 2, 4], "seeds": [0, 1]}, 4)
    assert grown.runs == first.runs
    with pytest.raises(UserError, match="another recipe"):
        Oracle.load(path, {**settings, "steps": 20}, 4)


def test_cheapest_score_by_predicted_flops():
    splits = {k: {**s, "flops": 1.0 - 0.1 * k} for k, s in ACC.items()}
    shallow = cheapest_score("classify", splits, pick=1, oracle_k=2, cost="flops")
    assert shallow["wasted_time"] == pytest.approx(0.9 / 0.8 - 1)
    assert shallow["saved_share"] == pytest.approx(0.1 / 0.2)
