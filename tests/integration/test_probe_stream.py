"""`lfdist probe` in process streams the blocks where the whole model would not fit, with the
whole probe's numbers."""

import pytest
import torch

from lfdist import pipeline
from lfdist.config import config_from_dict
from lfdist.train import measure


def _cfg(**probe):
    return config_from_dict(
        {
            "model": {"spec": "tiny:llama"},
            "data": {"spec": "synthetic:lm:200", "seq_len": 32},
            "probe": {"samples": 24, "batch_size": 8, **probe},
        }
    )


def test_probe_streams_where_the_model_would_not_fit(tmp_path, monkeypatch):
    whole = pipeline.probe(_cfg(), str(tmp_path / "whole.json"), progress=False)
    assert "streamed" not in whole.data_info  # plenty of memory: the whole model
    monkeypatch.setattr(measure, "available_memory_bytes", lambda: 10_000)  # nothing fits
    got = pipeline.probe(_cfg(), str(tmp_path / "streamed.json"), progress=False)
    memory = got.data_info["streamed"]
    assert 0 < memory["peak_resident_param_bytes"] < memory["total_param_bytes"] / 3
    compared = [
        f for f in ("sum", "sumsq", "ce_sum", "sketch") if getattr(whole.stats, f) is not None
    ]
    assert "sum" in compared
    for field in compared:
        assert torch.equal(getattr(got.stats, field), getattr(whole.stats, field)), field
    assert got.curves == whole.curves
    # asked for whole, or a pass that needs the whole model: not streamed
    for probe in ({"stream_layers": False}, {"gradnorm": True}):
        kept = pipeline.probe(_cfg(**probe), str(tmp_path / "kept.json"), True, progress=False)
        assert "streamed" not in kept.data_info


def test_eval_streams_a_language_model_where_it_would_not_fit(monkeypatch):
    cfg = _cfg()
    whole = pipeline.evaluate_model(cfg)
    assert "streamed" not in whole
    monkeypatch.setattr(measure, "available_memory_bytes", lambda: 10_000)  # nothing fits
    got = pipeline.evaluate_model(cfg)
    memory = got.pop("streamed")
    assert 0 < memory["peak_resident_param_bytes"] < memory["total_param_bytes"] / 3
    assert got["examples"] == whole["examples"] and got["targets"] == whole["targets"]
    assert got["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert got["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-5)


@pytest.mark.parametrize(
    "spec, data",
    [
        ("tiny:bert", "synthetic:classify:300"),  # pooler + classifier on [CLS]
        ("tiny:llama", "synthetic:classify:300"),  # score on the last real token
        ("pkg:minilm-l6", "pkg:bbc-news"),  # a base checkpoint: the head is the model's seeded init
    ],
)
def test_eval_streams_a_classifier_through_its_own_head(spec, data, monkeypatch):
    cfg = config_from_dict(
        {
            "model": {"spec": spec, "task": "classify"},
            "data": {"spec": data, "seq_len": 32, "max_eval_examples": 24},
        }
    )
    whole = pipeline.evaluate_model(cfg)
    assert "streamed" not in whole
    monkeypatch.setattr(measure, "available_memory_bytes", lambda: 10_000)  # nothing fits
    got = pipeline.evaluate_model(cfg)
    memory = got.pop("streamed")
    assert 0 < memory["peak_resident_param_bytes"] < memory["total_param_bytes"]
    assert got["examples"] == whole["examples"] == 24
    assert got["accuracy"] == whole["accuracy"]
    assert got["loss"] == pytest.approx(whole["loss"], rel=1e-5)
