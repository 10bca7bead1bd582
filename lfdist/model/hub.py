"""Hub ids on a machine that cannot reach the hub: one bounded check instead of waiting.

Unchecked, huggingface_hub retries an unreachable hub 5 times (about 70 s) before transformers
prints an error naming the host. Here a hub id is checked once per process with a connect of
at most CONNECT_TIMEOUT_S: reachable, the id is used as it is; unreachable, a model in the
local Hugging Face cache is read from its snapshot folder (a plain local folder: no global
offline switch, and every process, Ray workers included, resolves it the same way), and any
other id is one line at once.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from lfdist.errors import UserError

CONNECT_TIMEOUT_S = 3.0
_reachable: dict[str, bool] = {}


def check_hub_id(spec: str) -> str:
    """Where to read a spec that can only be a hub id: the id itself, or, where the hub cannot
    be reached, the cached snapshot folder. Called before anything asks the hub for it."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return spec  # the user's choice: huggingface_hub reads the cache only and fails at once
    if hub_reachable(constants.ENDPOINT):
        return spec
    folder = _cached_folder(spec, constants.HF_HUB_CACHE)
    if folder is not None:
        return folder
    raise UserError(
        f"model {spec!r} is not a local folder nor in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}), and the hub ({constants.ENDPOINT}) cannot be reached from "
        "this machine; give a local folder, or download the model once where the hub is reachable"
    )


def hub_reachable(endpoint: str) -> bool:
    """Whether a TCP connection to the hub opens within CONNECT_TIMEOUT_S (asked once)."""
    if endpoint not in _reachable:
        url = urlsplit(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            with socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S):
                _reachable[endpoint] = True
        except OSError:  # no DNS, refused, timed out
            _reachable[endpoint] = False
    return _reachable[endpoint]


def _cached_folder(spec: str, cache_dir: str) -> str | None:
    """The snapshot folder the cache holds for `spec` (its main revision), or None."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(spec, "config.json", cache_dir=cache_dir)
    return os.path.dirname(config) if isinstance(config, str) else None
