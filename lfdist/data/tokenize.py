"""TextData -> tensors for a model: packed token streams for "lm", padded texts for "classify".

Works with Hugging Face tokenizers and lfdist's ByteTokenizer (tiny models), which share
`encode(text, add_special_tokens=...)`, `pad_token_id` and `eos_token_id`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from lfdist.data.sources import TextData
from lfdist.errors import UserError

IGNORE_INDEX = -100  # positions the loss skips (torch CrossEntropyLoss / HF models)
_BATCH = 64  # texts per tokenizer call: fast for HF tokenizers, lets "lm" stop early


def tokenize(
    data: TextData, tokenizer, task: str, seq_len: int, max_examples: int | None = None
) -> dict:
    """`input_ids`, `attention_mask` and `labels` tensors for `task`.

    "lm": all texts joined by eos into one stream, cut into full chunks of `seq_len` (the
    remainder is dropped; a stream shorter than one chunk gives one padded example); labels are
    the input ids with -100 where the mask is 0 (the HF model shifts them). "classify": each text
    truncated or right-padded to `seq_len`, with the tokenizer's special tokens when it is an HF
    tokenizer; labels are class ids [N].
    """
    if seq_len < 2:
        raise UserError(f"sequence length {seq_len} is too short; use a seq_len of at least 2")
    if max_examples is not None and max_examples < 1:
        raise UserError(
            f"max_examples={max_examples} must be at least 1; leave it unset for all data"
        )
    if task == "lm":
        return _pack_lm(data, tokenizer, seq_len, max_examples)
    if task == "classify":
        return _pad_classify(data, tokenizer, seq_len, max_examples)
    raise UserError(f"unknown task {task!r}; use lm or classify")


def is_hf_tokenizer(tokenizer) -> bool:
    # By class name, so this check never imports transformers.
    return any(c.__name__ == "PreTrainedTokenizerBase" for c in type(tokenizer).__mro__)


def pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def encode_batches(
    tokenizer, texts: Sequence[str], special: bool, max_length: int | None = None
) -> Iterator[list[list[int]]]:
    """Token ids of `texts`, `_BATCH` at a time."""
    hf = is_hf_tokenizer(tokenizer)
    for start in range(0, len(texts), _BATCH):
        chunk = list(texts[start : start + _BATCH])
        if hf:
            # The batched call runs the fast tokenizer in Rust; verbose=False silences the
            # "longer than model_max_length" warning, which is wrong for packing.
            kwargs = dict(truncation=True, max_length=max_length) if max_length else {}
            out = tokenizer(chunk, add_special_tokens=special, verbose=False, **kwargs)
            yield [list(ids) for ids in out["input_ids"]]
        else:
            ids = [tokenizer.encode(t, add_special_tokens=special) for t in chunk]
            yield [x[:max_length] for x in ids] if max_length else ids


def _separator(tokenizer) -> list[int]:
    for name in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return [int(value)]
    return []


def _pack_lm(data: TextData, tokenizer, seq_len: int, max_examples: int | None) -> dict:
    import torch

    sep = _separator(tokenizer)
    stream: list[int] = []
    need = None if max_examples is None else max_examples * seq_len
    for batch in encode_batches(tokenizer, data.texts, special=False):
        for ids in batch:
            stream += ids + sep
        if need is not None and len(stream) >= need:
            break
    if not stream:
        raise UserError("the data tokenized to 0 tokens; give data with non-empty text")
    n_chunks = len(stream) // seq_len
    if max_examples is not None:
        n_chunks = min(n_chunks, max_examples)
    if n_chunks == 0:  # shorter than one chunk: one right-padded example
        ids = torch.full((1, seq_len), pad_id(tokenizer), dtype=torch.long)
        mask = torch.zeros((1, seq_len), dtype=torch.long)
        ids[0, : len(stream)] = torch.tensor(stream, dtype=torch.long)
        mask[0, : len(stream)] = 1
    else:
        ids = torch.tensor(stream[: n_chunks * seq_len], dtype=torch.long).view(n_chunks, seq_len)
        mask = torch.ones_like(ids)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _pad_classify(data: TextData, tokenizer, seq_len: int, max_examples: int | None) -> dict:
    import torch

    if data.labels is None:
        raise UserError(
            "task 'classify' needs labelled data, but this data has no labels; give "
            "labelled data or use task 'lm'"
        )
    n = len(data.texts) if max_examples is None else min(len(data.texts), max_examples)
    ids = torch.full((n, seq_len), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    row = 0
    special = is_hf_tokenizer(tokenizer)  # CLS/SEP for BERT; the byte tokenizer adds none
    for batch in encode_batches(tokenizer, data.texts[:n], special=special, max_length=seq_len):
        for tokens in batch:
            if not tokens:
                raise UserError(f"text {row} tokenized to 0 tokens; drop it from the data")
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
            row += 1
    labels = torch.tensor(data.labels[:n], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
