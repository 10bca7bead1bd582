"""Train / held-out split and the one call a recipe makes: spec -> tensors + data info."""

from __future__ import annotations

import logging
import random

from lfdist.data.sources import TextData, fingerprint, load_text_data
from lfdist.data.tokenize import tokenize
from lfdist.errors import UserError

log = logging.getLogger(__name__)


def split_heldout(data: TextData, fraction: float, seed: int = 0) -> tuple[TextData, TextData]:
    """Deterministic (train, held-out) split of the examples; stratified by class when labelled.

    round(n * fraction) examples are held out (at least 1 when fraction > 0), picked evenly from
    a seeded shuffle sorted by class, so each class keeps its share. Both parts keep the original
    order of the examples.
    """
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"held-out fraction {fraction} must be in [0, 1); e.g. 0.1 holds out 10%")
    n = len(data.texts)
    n_held = 0 if fraction == 0 else max(1, round(n * fraction))
    if n_held == 0:
        return data, data.subset([])
    if n_held >= n:
        raise UserError(
            f"cannot hold out {fraction:.0%} of {n} example(s) and keep any for "
            "training; give more data (separate .txt documents by blank lines), a "
            "smaller held-out fraction or separate eval data"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    if data.labels is not None:
        order.sort(key=lambda i: data.labels[i])  # stable: shuffled within each class
    # Every (n / n_held)-th position of the class-sorted order: proportional per class.
    held = {order[p] for p in range(n) if (p + 1) * n_held // n > p * n_held // n}
    train = [i for i in range(n) if i not in held]
    return data.subset(train), data.subset(sorted(held))


def load_task_data(
    spec: str | TextData,
    task: str,
    tokenizer,
    seq_len: int,
    heldout_fraction: float = 0.1,
    text_column: str = "text",
    label_column: str = "label",
    max_examples: int | None = None,
    eval_spec: str | TextData | None = None,
    seed: int = 0,
) -> tuple[dict, dict, dict]:
    """(train tensors, held-out tensors, info) for `task`.

    `spec` may be a spec string or already-loaded TextData (load it first to learn num_labels
    before building the model). With `eval_spec`, that data is the held-out set and nothing is
    split off; its class names must be among the training data's. `max_examples` caps the
    training examples only. info: fingerprint (of all the data before the split),
    eval_fingerprint, n_texts, n_examples, n_heldout, label_names, num_labels, task, seq_len.
    """
    data = _as_data(spec, task, text_column, label_column)
    if eval_spec is None and task == "lm" and len(data.texts) * heldout_fraction < 1:
        return _split_stream(data, tokenizer, seq_len, heldout_fraction, max_examples)
    if eval_spec is None:
        train, heldout = split_heldout(data, heldout_fraction, seed)
    else:
        train, heldout = data, _as_data(eval_spec, task, text_column, label_column)
        if task == "classify":
            heldout = relabel(heldout, data.label_names)
    train_t = tokenize(train, tokenizer, task, seq_len, max_examples)
    held_t = tokenize(heldout, tokenizer, task, seq_len) if heldout.texts else _empty(task, seq_len)
    info = {
        "fingerprint": data.fingerprint,
        "eval_fingerprint": heldout.fingerprint,
        "task": task,
        "seq_len": seq_len,
        "n_texts": len(train.texts),
        "n_examples": int(train_t["input_ids"].shape[0]),
        "n_heldout": int(held_t["input_ids"].shape[0]),
        "label_names": None if data.label_names is None else list(data.label_names),
        "num_labels": data.num_labels,
        "heldout_split": "eval data" if eval_spec is not None else "documents",
    }
    return train_t, held_t, info


def _split_stream(
    data: TextData, tokenizer, seq_len: int, fraction: float, max_examples: int | None
) -> tuple[dict, dict, dict]:
    """Too few documents to hold some out (a .txt of plain lines is one document): pack the
    whole token stream and hold out its last chunks, so no held-out token was trained on."""
    packed = tokenize(data, tokenizer, "lm", seq_len)
    n = int(packed["input_ids"].shape[0])
    n_held = max(1, round(n * fraction))
    if n_held >= n:
        raise UserError(
            f"the data is {n} chunk(s) of {seq_len} tokens, too little to hold out {fraction:.0%} "
            "and keep any for training; give more text, a shorter --seq-len or --eval-data"
        )
    n_train = n - n_held if max_examples is None else min(n - n_held, max_examples)
    train = {k: v[:n_train] for k, v in packed.items()}
    heldout = {k: v[n - n_held :] for k, v in packed.items()}
    log.info(
        "data: %d document(s), too few to hold out %.0f%% by document; held out the last %d of "
        "%d chunks of %d tokens instead",
        len(data.texts),
        100 * fraction,
        n_held,
        n,
        seq_len,
    )
    info = {
        "fingerprint": data.fingerprint,
        "eval_fingerprint": f"{data.fingerprint}:last {n_held} of {n} chunks of {seq_len}",
        "task": "lm",
        "seq_len": seq_len,
        "n_texts": len(data.texts),
        "n_examples": n_train,
        "n_heldout": n_held,
        "label_names": None,
        "num_labels": None,
        "heldout_split": "token stream",
    }
    return train, heldout, info


def relabel(data: TextData, names: tuple[str, ...]) -> TextData:
    """`data` with its class ids mapped onto `names` (the training data's classes)."""
    index = {name: k for k, name in enumerate(names)}
    unknown = sorted(set(data.label_names) - set(index))
    if unknown:
        raise UserError(
            f"eval data has classes {unknown} that the training data lacks "
            f"(training classes: {list(names)}); use eval data with the same classes"
        )
    labels = tuple(index[data.label_names[k]] for k in data.labels)
    return TextData(data.texts, labels, names, fingerprint(data.texts, labels, names))


def _as_data(spec: str | TextData, task: str, text_column: str, label_column: str) -> TextData:
    if isinstance(spec, TextData):
        if task == "classify" and spec.labels is None:
            raise UserError(
                "task 'classify' needs labelled data, but this data has no labels; "
                "give labelled data or use task 'lm'"
            )
        return spec
    return load_text_data(spec, task, text_column, label_column)


def _empty(task: str, seq_len: int) -> dict:
    import torch

    ids = torch.zeros((0, seq_len), dtype=torch.long)
    labels = torch.zeros((0,), dtype=torch.long) if task == "classify" else ids.clone()
    return {"input_ids": ids, "attention_mask": ids.clone(), "labels": labels}
