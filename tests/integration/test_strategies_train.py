"""probe -> select -> 2-rank DDP training for the structural strategies (spafit: bias + LoRA
strata; mask: learned masks) on tiny:llama, with frozen weights checked bit for bit."""

from __future__ import annotations

import pytest

from lfdist import pipeline
from lfdist.config import config_from_dict
from lfdist.job import Debug, Job
from lfdist.launch.run import launch_training
from lfdist.plan import load_plan


def _cfg():
    return config_from_dict(
        {
            "model": {"spec": "tiny:llama"},
            "data": {"spec": "synthetic:lm:200", "seq_len": 32},
            "probe": {"samples": 16},
            "train": {"engine": "ddp", "nproc": 2, "steps": 2, "batch_size": 2, "lr": 1e-3},
        }
    )


@pytest.fixture(scope="module")
def probe_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("probe") / "probe.json")
    pipeline.probe(_cfg(), path, progress=False)
    return path


@pytest.mark.parametrize(
    "strategy, options, treatments",
    [
        ("spafit", {"cuts": [4, 6]}, ["frozen"] * 4 + ["bias"] * 2 + ["lora"] * 2),
        ("mask", {"n": 2, "sparsity": 0.2}, ["frozen"] * 6 + ["mask"] * 2),
    ],
)
def test_structural_strategy_trains_on_two_ranks(
    tmp_path, probe_path, strategy, options, treatments
):
    plan_path = str(tmp_path / "plan.yaml")
    pipeline.select(
        probe_path, strategy, {}, {"engine": "ddp", "world_size": 2, **options}, plan_path
    )
    assert load_plan(plan_path).treatments == treatments
    m = launch_training(
        Job(
            _cfg(), plan_path, str(tmp_path / "run"), evaluate=False, debug=Debug(check_frozen=True)
        )
    )
    assert m["plan"]["treatments"] == treatments
    assert m["frozen_digest"]["before"] == m["frozen_digest"]["after"] is not None
    assert len(m["losses"]) == 2 and all(v > 0 for v in m["losses"].values())
    ranks = m["per_rank"]
    # DDP replicates: both ranks hold AdamW state for exactly the trainable elements
    trainable = m["params"]["trainable"]
    assert [r["after_step"]["optimizer_state_elements"] for r in ranks] == [2 * trainable] * 2
    assert ranks[0]["backward_blocks"] == list(
        range(treatments.index(next(t for t in treatments if t != "frozen")), 8)
    )  # never below the boundary

    # Export folds LoRA / masks into plain weights under the base names; frozen blocks stay the base.
    import os

    import torch
    from transformers import AutoModelForCausalLM

    from lfdist.model.blocks import fingerprint
    from lfdist.model.tiny import build_tiny
    from lfdist.train.export import export

    hf = export(str(tmp_path / "run"), str(tmp_path / "hf"))
    model, base = AutoModelForCausalLM.from_pretrained(hf), build_tiny("llama", "lm")
    assert fingerprint(model) == fingerprint(base)
    sd, bd = model.state_dict(), base.state_dict()
    boundary = next(i for i, t in enumerate(treatments) if t != "frozen")
    below = [n for n in bd if n.startswith("model.layers.") and int(n.split(".")[2]) < boundary]
    assert below and all(torch.equal(sd[n], bd[n]) for n in below)
    assert any(not torch.equal(sd[n], bd[n]) for n in bd if n.startswith("model.layers.7."))
    assert os.path.exists(os.path.join(hf, "lfdist_masks.safetensors")) == (strategy == "mask")
    # The merged weights, by the treatments' own definitions (export merges block by block).
    from safetensors.torch import load_file

    from lfdist.engines.shards import TrainedWeights
    from lfdist.model.treatments import unpack_bits

    weights = TrainedWeights(str(tmp_path / "run/checkpoints/step-000002"))
    trained = weights.read(weights.shapes)
    name = "model.layers.7.self_attn.q_proj.weight"
    if strategy == "mask":  # W * m, m the saved bit mask: exact
        bits = load_file(os.path.join(hf, "lfdist_masks.safetensors"))[name]
        assert torch.equal(sd[name], bd[name] * unpack_bits(bits, tuple(bd[name].shape)))
        assert (sd[name] == 0).sum() > (bd[name] == 0).sum()
    else:  # W + (alpha / r) B A with peft's defaults here: alpha 16, rank 8
        a = trained["model.layers.7.self_attn.q_proj.lora_A.default.weight"]
        b = trained["model.layers.7.self_attn.q_proj.lora_B.default.weight"]
        torch.testing.assert_close(sd[name], bd[name] + 2.0 * b @ a, rtol=0, atol=1e-6)
