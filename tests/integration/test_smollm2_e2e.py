"""The end-to-end path on the real SmolLM2-135M from its package (slow: minutes on 2 cores)."""

import json
import os

import pytest

from lfdist.cli import main

pytestmark = pytest.mark.slow


def _cli(*argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code


def test_smollm2_probe_select_train_export(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    probe, plan, run, hf = (str(tmp_path / n) for n in ("probe.json", "plan.yaml", "run", "hf"))
    common = ["--model", "pkg:smollm2-135m", "--data", "pkg:python-docs", "--seq-len", "64"]
    assert _cli("probe", *common, "--samples", "8", "--out", probe) == 0
    assert (
        _cli("select", "--probe", probe, "--strategy", "top", "--option", "n=4", "--out", plan) == 0
    )
    assert (
        _cli(
            "train",
            *common,
            "--plan",
            plan,
            "--engine",
            "fsdp2",
            "--nproc",
            "2",
            "--steps",
            "2",
            "--out",
            run,
            "train.batch_size=1",
            "data.max_examples=64",
            "data.max_eval_examples=8",
        )
        == 0
    )
    m = json.load(open(os.path.join(run, "metrics.json")))
    assert m["per_rank"][0]["backward_blocks"] == [26, 27, 28, 29]
    # SmolLM2 block: q,o 576x576 + k,v 576x192 + MLP 3 x 576x1536 + 2 norms of 576 = 3,540,096;
    # the head is tied to the frozen embeddings, so 4 blocks and the final norm are all that train.
    assert m["params"]["trainable"] == 4 * 3_540_096 + 576
    assert m["plan"]["modules"]["head"] == "tied"
    assert m["eval"]["perplexity"] < 100
    assert _cli("export", "--checkpoint", run, "--out", hf) == 0
    exported = AutoModelForCausalLM.from_pretrained(hf)
    from lfdist.model.specs import load_model

    base = load_model("pkg:smollm2-135m").model
    sd, bd = exported.state_dict(), base.state_dict()
    for name in bd:
        if name.startswith("model.layers.") and int(name.split(".")[2]) < 26:
            assert torch.equal(sd[name], bd[name]), name
    assert not torch.equal(
        sd["model.layers.29.mlp.down_proj.weight"], bd["model.layers.29.mlp.down_proj.weight"]
    )
