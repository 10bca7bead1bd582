"""How many positions a model can read, from its config alone (never its weights).

A sequence longer than the model's position table either crashes inside the embedding lookup
or, for rotary models, runs on positions the model never saw while every [B, T, ...] tensor grows
without bound; so an over-long `data.seq_len` is refused before anything is loaded.
"""

from __future__ import annotations

import json
import os

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
    """The model's config as a dict: tiny configs, config.json of folders and pkg: models, and
    hub ids through transformers' config cache. None when it cannot be read here (the model
    loader then reports the problem)."""
    if spec.startswith("tiny:"):
        from lfdist.model.tiny import tiny_config

        try:
            return tiny_config(spec[5:]).to_dict()
        except UserError:
            return None
    from lfdist.model.specs import resolve_folder

    try:
        folder = resolve_folder(spec)
    except UserError:
        return None
    if folder is not None:
        path = os.path.join(folder, "config.json")
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None
    from lfdist.model.specs import _looks_like_path

    if ":" in spec or _looks_like_path(spec):
        return None
    from lfdist.model.hub import check_hub_id

    check_hub_id(spec)
    try:
        import transformers

        return transformers.AutoConfig.from_pretrained(spec).to_dict()
    except Exception:  # offline, unknown id: load_model reports it with its own message
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
