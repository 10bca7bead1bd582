"""The tokenized data a run needs and where its model comes from (no weights loaded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lfdist.config import RunConfig


@dataclass
class Prepared:
    source: Any  # lfdist.model.source.ModelSource: where the weights are, none loaded
    tokenizer: Any
    train: dict[str, torch.Tensor]
    heldout: dict[str, torch.Tensor]
    data_info: dict[str, Any]
    _loaded: Any = field(default=None, repr=False)

    @property
    def loaded(self):
        """The whole model in this process (lfdist.model.specs.Loaded), loaded on first use:
        probing needs it; training and the launcher never touch it."""
        if self._loaded is None:
            from lfdist.model.specs import Loaded

            s = self.source
            self._loaded = Loaded(s.load_whole(), self.tokenizer, s.spec, s.task)
        return self._loaded


def prepare(cfg: RunConfig) -> Prepared:
    """The tokenized data and the model's source: tokenizing needs the tokenizer only."""
    from lfdist.data import load_task_data, load_text_data
    from lfdist.model.source import ModelSource
    from lfdist.model.specs import tokenizer_for

    d = cfg.data
    num_labels = 2
    if cfg.model.task == "classify":
        # The classifier head's width comes from the data's labels.
        num_labels = len(
            load_text_data(d.spec, "classify", d.text_column, d.label_column).label_names
        )
    tokenizer = tokenizer_for(cfg.model.spec)
    source = ModelSource(
        cfg.model.spec,
        cfg.model.task,
        num_labels=num_labels,
        dtype=cfg.model.dtype,
        seed=cfg.train.seed,
        pad_token_id=tokenizer.pad_token_id,
    )
    train, heldout, info = load_task_data(
        d.spec,
        cfg.model.task,
        tokenizer,
        d.seq_len,
        heldout_fraction=d.heldout_fraction,
        text_column=d.text_column,
        label_column=d.label_column,
        max_examples=d.max_examples,
        eval_spec=d.eval_spec,
    )
    heldout = _evenly_spaced(heldout, d.max_eval_examples)
    n_eval = len(heldout.get("input_ids", []))
    return Prepared(source, tokenizer, train, heldout, {**info, "n_eval": n_eval})


def _evenly_spaced(data: dict[str, torch.Tensor], limit: int | None) -> dict[str, torch.Tensor]:
    """At most `limit` examples spread over the whole set (splits keep class order)."""
    n = len(data.get("input_ids", []))
    if limit is None or n <= limit:
        return data
    idx = torch.linspace(0, n - 1, limit).round().long()
    return {k: v[idx] for k, v in data.items()}
