"""Load the model and the tokenized data a run needs, from its config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lfdist.config import RunConfig


@dataclass
class Prepared:
    loaded: Any  # lfdist.model.specs.Loaded
    train: dict[str, torch.Tensor]
    heldout: dict[str, torch.Tensor]
    data_info: dict[str, Any]


def prepare(cfg: RunConfig) -> Prepared:
    from lfdist.data import load_task_data, load_text_data
    from lfdist.model.specs import load_model

    d = cfg.data
    num_labels = 2
    if cfg.model.task == "classify":
        # The classifier head's width comes from the data's labels.
        num_labels = len(
            load_text_data(d.spec, "classify", d.text_column, d.label_column).label_names
        )
    loaded = load_model(
        cfg.model.spec,
        cfg.model.task,
        num_labels=num_labels,
        dtype=cfg.model.dtype,
        seed=cfg.train.seed,
    )
    train, heldout, info = load_task_data(
        d.spec,
        cfg.model.task,
        loaded.tokenizer,
        d.seq_len,
        heldout_fraction=d.heldout_fraction,
        text_column=d.text_column,
        label_column=d.label_column,
        max_examples=d.max_examples,
        eval_spec=d.eval_spec,
    )
    heldout = _evenly_spaced(heldout, d.max_eval_examples)
    return Prepared(loaded, train, heldout, {**info, "n_eval": len(heldout.get("input_ids", []))})


def _evenly_spaced(data: dict[str, torch.Tensor], limit: int | None) -> dict[str, torch.Tensor]:
    """At most `limit` examples spread over the whole set (splits keep class order)."""
    n = len(data.get("input_ids", []))
    if limit is None or n <= limit:
        return data
    idx = torch.linspace(0, n - 1, limit).round().long()
    return {k: v[idx] for k, v in data.items()}
