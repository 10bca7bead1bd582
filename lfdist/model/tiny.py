"""Seeded random-init models built from configs (`tiny:<arch>`): about 8 blocks, hidden 64.

Tests and examples use them so nothing is downloaded; every listed architecture exercises
the block map.
"""

from __future__ import annotations

from lfdist.constants import ENCODERS
from lfdist.errors import UserError

N_BLOCKS = 8
HIDDEN = 64
VOCAB = 320  # >= ByteTokenizer.vocab_size

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=N_BLOCKS, num_attention_heads=4
)
_DECODER = dict(_COMMON, intermediate_size=128, max_position_embeddings=512)
TINY = {
    "llama": ("LlamaConfig", dict(_DECODER, num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(_DECODER, num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(_DECODER, num_key_value_heads=2)),
    "gemma": ("GemmaConfig", dict(_DECODER, num_key_value_heads=2, head_dim=16)),
    "phi": ("PhiConfig", dict(_DECODER)),
    "gpt_neox": ("GPTNeoXConfig", dict(_DECODER)),
    "falcon": (
        "FalconConfig",
        dict(
            _COMMON,
            new_decoder_architecture=False,
            multi_query=True,
            parallel_attn=True,
            bias=False,
        ),
    ),
    # GPT2Config maps hidden_size, num_hidden_layers, ... to n_embd, n_layer, ...
    "gpt2": ("GPT2Config", dict(_COMMON, n_inner=128, n_positions=512)),
    "opt": (
        "OPTConfig",
        dict(
            _COMMON,
            ffn_dim=128,
            word_embed_proj_dim=HIDDEN,
            max_position_embeddings=512,
            pad_token_id=256,
        ),
    ),
    "bert": ("BertConfig", dict(_DECODER, type_vocab_size=2)),
    "roberta": (
        "RobertaConfig",
        dict(_DECODER, type_vocab_size=1, pad_token_id=256, max_position_embeddings=520),
    ),
    "mpnet": ("MPNetConfig", dict(_DECODER, pad_token_id=256, max_position_embeddings=520)),
}


def tiny_config(arch: str, num_labels: int = 2):
    import transformers

    if arch not in TINY:
        raise UserError(
            f"unknown tiny architecture {arch!r}; choose one of {', '.join(sorted(TINY))}"
        )
    cls_name, kwargs = TINY[arch]
    # Special ids are the ByteTokenizer's (set at construction: configs validate them).
    ids = {"pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 258}
    return getattr(transformers, cls_name)(**{**ids, **kwargs}, num_labels=num_labels)


def build_tiny(arch: str, task: str, num_labels: int = 2, seed: int = 0):
    """A seeded random-init model: the same arch, task and seed give the same weights."""
    import torch
    import transformers

    cfg = tiny_config(arch, num_labels)
    if task == "lm" and arch in ENCODERS:
        raise UserError(
            f"tiny:{arch} is an encoder; use --task classify (or a decoder such as tiny:llama)"
        )
    auto = (
        transformers.AutoModelForCausalLM
        if task == "lm"
        else transformers.AutoModelForSequenceClassification
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(cfg)
    return model
