"""Names, shapes and dtypes of a checkpoint's tensors, read from the safetensors headers only.

A safetensors file starts with an 8-byte little-endian header length and a JSON header that
lists every tensor (dtype, shape, byte range), so a launcher can check a checkpoint against a
model built on the meta device without reading one weight. Sharded checkpoints name their
files in `model.safetensors.index.json` (`weight_map`).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from lfdist.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    file: str  # absolute path of the .safetensors file holding it
    dtype: str  # safetensors dtype code: F32, BF16, F16, ...
    shape: tuple[int, ...]


def read_header(path: str) -> dict[str, dict]:
    """The JSON header of one .safetensors file (without its __metadata__ entry)."""
    bad = f"{path!r} is not a readable safetensors file"
    fix = "re-save the model with save_pretrained or copy it again"
    total = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UserError(f"{bad} (empty or too short); {fix}")
        (size,) = struct.unpack("<Q", raw)
        if size > total - 8:  # a garbage length would have us read (and allocate) anything
            raise UserError(f"{bad} (its header length is past the end of the file); {fix}")
        try:
            header = json.loads(f.read(size))
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise UserError(f"{bad} (its header is not JSON); {fix}")
    header.pop("__metadata__", None)
    try:
        end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise UserError(f"{bad} (malformed header entries); {fix}") from None
    if 8 + size + end > total:
        raise UserError(f"{bad} (truncated: {total} bytes of {8 + size + end}); {fix}")
    return header


def weight_files(folder: str) -> list[str]:
    """The .safetensors files of a Hugging Face folder: the index's files, or model.safetensors."""
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return sorted({os.path.join(folder, name) for name in weight_map.values()})
    single = os.path.join(folder, SINGLE)
    if os.path.isfile(single):
        return [single]
    raise UserError(
        f"model folder {folder!r} has no {SINGLE} or {INDEX}; lfdist loads safetensors "
        "checkpoints only: re-save it with save_pretrained(safe_serialization=True)"
    )


def read_index(folder: str) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint in `folder`: name -> where it is, its dtype and shape."""
    out = {}
    for path in weight_files(folder):
        for name, entry in read_header(path).items():
            out[name] = TensorInfo(path, entry["dtype"], tuple(entry["shape"]))
    return out
