"""Real packaged models and data (SPEC section 7) on CPU: slow, run with `pytest -m slow`."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from lfdist.data import load_text_data
from lfdist.data.packaged import DOCS_GLOB, python_docs_folder

pytestmark = pytest.mark.slow

ENGLISH = (
    "The history of the city goes back more than two thousand years. It was founded as a small "
    "trading post on the river, and over the centuries it grew into one of the largest ports in "
    "the region. Today it is known for its museums, its parks and its busy markets."
)
CONVERT = (
    "from lfdist.model.packaged import packaged_folder; print(packaged_folder('smollm2-135m'))"
)


def test_smollm2_converts_once_into_a_sane_trainable_checkpoint(tmp_path, monkeypatch):
    import torch

    from lfdist.model.specs import load_model

    # Two processes at once, like two torchrun ranks: one converts, the other waits for it.
    env = dict(os.environ, LFDIST_CACHE=str(tmp_path), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONVERT],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folder = str(tmp_path / "models" / "smollm2-135m")
    assert [o[0].strip().splitlines()[-1] for o in outs] == [folder, folder]
    assert sum(o[1].count("converting SmolLM2 GGUF to a plain checkpoint once") for o in outs) == 1
    assert sorted(os.listdir(tmp_path / "models")) == ["smollm2-135m", "smollm2-135m.lock"]

    monkeypatch.setenv("LFDIST_CACHE", str(tmp_path))
    loaded = load_model("pkg:smollm2-135m", "lm")
    model, tokenizer = loaded.model, loaded.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings kept
    assert model.dtype == torch.float32
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 0.1e6
    ids = torch.tensor([tokenizer.encode(ENGLISH, add_special_tokens=False)])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert math.isfinite(loss) and math.exp(loss) < 100, loss
    # Trainable: the rebuilt model is not flagged quantized, so a backward pass works.
    model.train()
    model(input_ids=ids[:, :16], labels=ids[:, :16]).loss.backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_minilm_loads_as_a_classifier():
    import torch

    from lfdist.model.specs import load_model

    loaded = load_model("pkg:minilm-l6", "classify", num_labels=5)
    model = loaded.model
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_hidden_layers == 6
    assert abs(sum(p.numel() for p in model.bert.parameters()) - 22.7e6) < 0.1e6
    enc = loaded.tokenizer(["a short news article about football"], return_tensors="pt")
    with torch.no_grad():
        assert model(**enc).logits.shape == (1, 5)
    # the fresh head is drawn from the seed, whatever the caller's RNG did (pilots and evals
    # on a classifier were different on every load), and the caller's RNG is left as it was
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    again = load_model("pkg:minilm-l6", "classify", num_labels=5).model
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(again.classifier.weight, model.classifier.weight)
    other = load_model("pkg:minilm-l6", "classify", num_labels=5, seed=1).model
    assert not torch.equal(other.classifier.weight, model.classifier.weight)


def test_python_docs_loads_when_present():
    import glob

    if not glob.glob(os.path.join(python_docs_folder(), DOCS_GLOB), recursive=True):
        pytest.skip("python docs not unpacked; run bash launchers/fetch_python_docs.sh")
    data = load_text_data("pkg:python-docs", "lm")
    # python3.11-doc: 497 unique .rst.txt documents, about 1.4M words.
    assert len(data.texts) > 400 and len(set(data.texts)) == len(data.texts)
    assert sum(len(t.split()) for t in data.texts) > 1_000_000
    assert any("Python" in t for t in data.texts[:50])
