"""How many positions a model can read, from its config alone (never its weights).

A sequence longer than the model's position table either crashes inside the embedding lookup
or, for rotary models, runs on positions the model never saw while every [B, T, ...] tensor grows
without bound; so an over-long `data.seq_len` is refused before anything is loaded.
"""

from __future__ import annotations

from lfdist.errors import UserError

_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")
# These number positions from padding_idx + 1 (fairseq's convention), so the table holds
# max_position_embeddings - pad_token_id - 1 usable positions.
_PAD_OFFSET_TYPES = {
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "roberta-prelayernorm",
    "data2vec-text",
}


def usable_positions(config: dict) -> int | None:
    """The longest sequence the config allows; None when the config names no limit."""
    limit = next((config[k] for k in _POSITION_KEYS if isinstance(config.get(k), int)), None)
    if limit is None:
        text = config.get("text_config")  # multimodal wrappers keep the LM's limit inside
        return usable_positions(text) if isinstance(text, dict) else None
    pad = config.get("pad_token_id")
    if config.get("model_type") in _PAD_OFFSET_TYPES and isinstance(pad, int):
        limit -= pad + 1
    elif config.get("model_type") == "mpnet":  # MPNet's padding_idx is 1 whatever the pad token
        limit -= 2
    return limit


def model_config(spec: str) -> dict | None:
    """The model's config as a dict (ModelSource.config, the one reader); None when it cannot
    be read here (the model loader then reports the problem in its own words)."""
    from lfdist.model.source import ModelSource

    try:
        return ModelSource(spec).config().to_dict()
    except UserError:
        return None


def check_seq_len(spec: str, seq_len: int) -> None:
    """Refuse a sequence length the model cannot read (one line, before any weight loads)."""
    config = model_config(spec)
    limit = usable_positions(config) if config else None
    if limit is not None and seq_len > limit:
        raise UserError(
            f"--seq-len {seq_len} is longer than model {spec!r} can read ({limit} positions, "
            f"from its config); use --seq-len {limit} or less"
        )
