"""The model description the cost model reads, from a config alone: no weights, no hub.

The model is built on the `meta` device (shapes only, no storage), so a 70B config costs a
few seconds and no memory; block map, fingerprint and parameter counts come out exactly as
they do for the loaded model.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lfdist.errors import UserError


def load_config(source: str, task: str = "lm", num_labels: int = 2):
    """A transformers config from a config.json file, a folder, tiny:<arch>, pkg:<name> or a hub id."""
    import transformers

    if source.startswith("tiny:"):
        from lfdist.model.tiny import tiny_config

        return tiny_config(source[5:], num_labels)
    kwargs = {"num_labels": num_labels} if task == "classify" else {}
    if source.endswith(".json"):
        if not os.path.isfile(source):
            raise UserError(f"model config {source!r} does not exist; check the path")
        try:
            with open(source) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"model config {source!r} is not valid JSON ({e}); fix it") from None
        d = {k: v for k, v in d.items() if not k.startswith("_")}  # our "_comment" lines
        if "model_type" not in d:
            raise UserError(f"model config {source!r} has no model_type; add it (e.g. llama)")
        try:
            return transformers.AutoConfig.for_model(d.pop("model_type"), **d, **kwargs)
        except (ValueError, KeyError) as e:
            raise UserError(f"model config {source!r}: {str(e).splitlines()[0]}") from None
    from lfdist.model.specs import _looks_like_path, resolve_folder

    folder = resolve_folder(source)
    if folder is None and ":" not in source and not _looks_like_path(source):
        from lfdist.model.hub import check_hub_id

        check_hub_id(source)  # an unreachable hub: one line in seconds, not minutes of retries
    try:
        return transformers.AutoConfig.from_pretrained(folder or source, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot read the config of {source!r} ({str(e).splitlines()[0]}); give a "
            "config.json, a folder, tiny:<arch>, pkg:<name> or a hub id you can reach"
        ) from None


def meta_model(config, task: str = "lm"):
    """The model on the meta device: every parameter with its shape, none with storage."""
    import torch
    import transformers

    auto = (
        transformers.AutoModelForCausalLM
        if task == "lm"
        else transformers.AutoModelForSequenceClassification
    )
    with torch.device("meta"):
        return auto.from_config(config)


def meta_model_info(source: str, task: str = "lm", num_labels: int = 2) -> dict[str, Any]:
    """lfdist.model.info.model_info of the model `source` names, built on meta."""
    from lfdist.model.info import model_info

    model = meta_model(load_config(source, task, num_labels), task)
    return model_info(model, task)
