import pytest
import torch
from torch import nn

from lfdist.constants import ENCODERS
from lfdist.errors import UserError
from lfdist.model.blocks import block_param_counts, find_blocks
from lfdist.model.tiny import N_BLOCKS, TINY, build_tiny

EXPECTED_PATHS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gemma": "model.layers",
    "phi": "model.layers",
    "gpt_neox": "gpt_neox.layers",
    "falcon": "transformer.h",
    "gpt2": "transformer.h",
    "opt": "model.decoder.layers",
    "bert": "bert.encoder.layer",
    "roberta": "roberta.encoder.layer",
    "mpnet": "mpnet.encoder.layer",
}
CASES = [(a, t) for a in TINY for t in (["classify"] if a in ENCODERS else ["lm", "classify"])]


@pytest.mark.parametrize("arch, task", CASES)
def test_block_map_every_architecture(arch, task):
    model = build_tiny(arch, task)
    bmap = find_blocks(model)
    assert bmap.path == EXPECTED_PATHS[arch]
    assert bmap.n_blocks == N_BLOCKS
    per_block, groups = block_param_counts(model)
    assert len(set(per_block)) == 1 and per_block[0] > 0  # identical blocks
    total = sum(p.numel() for p in model.parameters())
    assert sum(per_block) + sum(groups.values()) == total
    assert groups["embeddings"] > 0
    if task == "classify":
        assert groups["head"] > 0  # the classifier is its own group


def test_generic_fallback_finds_largest_uniform_list():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.tiny = nn.ModuleList([nn.Linear(1, 1)])
            self.stack = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
            self.out = nn.Linear(4, 2)

    bmap = find_blocks(Toy())
    assert (bmap.path, bmap.n_blocks) == ("stack", 3)


def test_no_blocks_is_a_clear_error():
    with pytest.raises(UserError, match="cannot find the transformer blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_tiny_models_are_seeded():
    a, b = build_tiny("gpt2", "lm", seed=3), build_tiny("gpt2", "lm", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_encoder_lm_refused():
    with pytest.raises(UserError, match="encoder"):
        build_tiny("bert", "lm")


def test_unknown_tiny_arch():
    with pytest.raises(UserError, match="unknown tiny architecture"):
        build_tiny("t5", "lm")
