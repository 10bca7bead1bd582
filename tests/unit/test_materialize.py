"""Models built on the meta device and filled from safetensors, checked against whole loads.

- the fingerprint of a meta-device skeleton equals the loaded model's, on every tiny
  architecture and on the packaged models; the checkpoint's headers name every parameter with
  its shape;
- a replica filled from the files equals the whole load bit for bit (LoRA, mask, tied
  embeddings, buffers included);
- the launcher's validate() never loads weights: from_pretrained, load_model and safe_open
  are booby-trapped while it runs on a generated checkpoint folder.
"""

import dataclasses
import json
import os

import pytest
import torch

from lfdist.constants import ENCODERS
from lfdist.engines.fill import fill_from_files
from lfdist.errors import UserError
from lfdist.model.blocks import find_blocks, fingerprint
from lfdist.model.headers import read_index
from lfdist.model.materialize import locate, prepare
from lfdist.model.source import ModelSource
from lfdist.model.tiny import TINY, build_tiny
from tests.helpers import make_plan

CASES = [(a, "classify" if a in ENCODERS else "lm") for a in TINY]


def _source(arch, task):
    return ModelSource(f"tiny:{arch}", task, pad_token_id=256)


@pytest.mark.parametrize("arch, task", CASES)
def test_skeleton_fingerprint_and_headers_match_the_loaded_model(arch, task, tmp_path, monkeypatch):
    monkeypatch.setenv("LFDIST_CACHE", str(tmp_path))
    source = _source(arch, task)
    skeleton = source.skeleton()
    assert all(p.is_meta for p in skeleton.parameters())
    assert not any(b.is_meta for b in skeleton.buffers())
    assert source.fingerprint() == fingerprint(build_tiny(arch, task))
    index = read_index(source.weights_folder())
    located = locate(skeleton, index)
    assert [n for n, (key, _) in located.items() if key is None] == []
    assert all(index[key].shape == shape for key, shape in located.values())


@pytest.mark.parametrize("arch, task", CASES)
def test_replica_from_files_equals_the_whole_load(arch, task, tmp_path, monkeypatch):
    monkeypatch.setenv("LFDIST_CACHE", str(tmp_path))
    source = _source(arch, task)
    n = find_blocks(build_tiny(arch, task)).n_blocks
    treatments = ["frozen"] * (n - 3) + ["lora", "mask", "full"]
    plan = make_plan(build_tiny(arch, task), treatments)
    whole = prepare(dataclasses.replace(source, whole=True), plan).model
    u = prepare(source, plan)
    meta, filler = u.model, u.filler
    fill_from_files(filler, meta, torch.device("cpu"))  # what DDP and ZeRO-1/2 ranks run
    expected = dict(whole.state_dict())
    got = dict(meta.state_dict())
    assert sorted(got) == sorted(expected)
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    buffers = dict(whole.named_buffers())
    assert all(torch.equal(buffers[k], b) for k, b in meta.named_buffers())
    assert [n for n, p in meta.named_parameters() if p.requires_grad] == [
        n for n, p in whole.named_parameters() if p.requires_grad
    ]
    if getattr(whole.config, "tie_word_embeddings", False):
        emb, head = meta.get_input_embeddings(), meta.get_output_embeddings()
        assert head is None or head.weight is emb.weight


def _packaged(spec, task):
    from lfdist.model.packaged import PACKAGES, package_dir

    if package_dir(PACKAGES[spec[4:]][0]) is None:
        pytest.skip(f"{spec} is not installed")
    return ModelSource(spec, task, num_labels=5 if task == "classify" else 2, pad_token_id=0)


@pytest.mark.parametrize("spec, task", [("pkg:smollm2-135m", "lm"), ("pkg:minilm-l6", "classify")])
def test_packaged_skeleton_matches_loaded_model_and_headers(spec, task):
    source = _packaged(spec, task)
    source.check_weights()  # every parameter in the headers, same shape (the head excepted)
    assert source.fingerprint() == fingerprint(source.load_whole())


def _generated_folder(tmp_path):
    folder = tmp_path / "gen"
    build_tiny("llama", "lm").save_pretrained(folder)
    (folder / "lfdist_tokenizer.json").write_text("{}")  # the byte tokenizer's note
    return str(folder)


def test_validate_never_loads_weights(tmp_path, monkeypatch):
    import safetensors
    import transformers

    from lfdist.config import config_from_dict
    from lfdist.launch.run import validate
    from lfdist.plan import save_plan

    folder = _generated_folder(tmp_path)
    plan_path = str(tmp_path / "plan.yaml")
    save_plan(make_plan(build_tiny("llama", "lm"), ["frozen"] * 6 + ["full"] * 2), plan_path)

    def trap(*a, **k):
        raise AssertionError("the launcher loaded weights")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", trap)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", trap)
    monkeypatch.setattr("lfdist.model.specs.load_model", trap)
    monkeypatch.setattr(safetensors, "safe_open", trap)
    monkeypatch.setattr("safetensors.torch.load_file", trap)
    cfg = config_from_dict(
        {
            "model": {"spec": folder},
            "data": {"spec": "synthetic:lm:64", "seq_len": 16},
            "train": {"engine": "fsdp2", "nproc": 2, "steps": 1, "batch_size": 2},
        }
    )
    validate(cfg, plan_path, str(tmp_path / "out"), resume=False)
    assert not os.path.exists(tmp_path / "out")


def test_validate_refuses_weights_that_do_not_fit_the_config(tmp_path):
    folder = _generated_folder(tmp_path)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["intermediate_size"] = 96
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(UserError, match=r"has shape \[128, 64\] but the config builds \[96, 64\]"):
        ModelSource(folder).check_weights()


def test_head_missing_from_a_base_checkpoint_gets_the_models_init():
    source = _packaged("pkg:minilm-l6", "classify")
    whole = source.load_whole()
    u = prepare(source, make_plan(whole, ["frozen"] * 4 + ["full"] * 2))
    meta, filler = u.model, u.filler
    fill_from_files(filler, meta, torch.device("cpu"))  # what DDP and ZeRO-1/2 ranks run
    expected, got = whole.state_dict(), meta.state_dict()
    # Everything the checkpoint holds is read bit for bit; the new head is drawn from the seed,
    # the same in the whole load (probe, eval, pilots) and in the ranks' fill.
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    assert torch.equal(got["classifier.bias"], torch.zeros(5))
    assert got["classifier.weight"].std().item() == pytest.approx(0.02, rel=0.1)
