"""Checkpoint shards on disk, written by each rank, read back without trusting the files.

Two layouts, both below a checkpoint's step folder:

- `dcp/` (DDP, FSDP1, FSDP2): torch.distributed.checkpoint. Every rank writes the shards it
  holds (`__<rank>_0.distcp`), rank 0 the index (`.metadata`); keys `model.<name>` (trainable
  parameters) and `optim.state.<name>.<exp_avg|exp_avg_sq|step>`, `optim.param_groups.*`.
  DCP reshards on load, so another world size reads it too. `scheduler.json` (rank 0) holds
  the LR schedule's position.
- `weights/rank-NNNNN.safetensors` (DeepSpeed): the slices of the trainable weights this rank
  owns, flattened; the header's metadata maps each name to its full shape and the offset of
  the slice in the flattened tensor. ZeRO-3 ranks write their partitions; ZeRO-1/2 replicate
  the weights, so rank 0 writes them whole. DeepSpeed's own files (optimizer, scheduler)
  sit next to them in `deepspeed/`.

Trust: DCP pickles its index and its non-tensor values (`torch.load(weights_only=False)` in
DefaultLoadPlanner). Here the index is unpickled with an allowlist of DCP's own metadata
classes and the values with `weights_only=True`, so a crafted checkpoint cannot run code.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
from collections.abc import Iterable

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from lfdist.errors import UserError

DCP = "dcp"
WEIGHTS = "weights"
SCHEDULER = "scheduler.json"  # native engines: the LR schedule's position, written by rank 0
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "BytesStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dtype = getattr(torch, name, None) if module == "torch" else None
        if name in _DCP_CLASSES.get(module, ()) or isinstance(dtype, torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")


class SafeReader(FileSystemReader):
    """FileSystemReader whose index is unpickled with DCP's metadata classes only."""

    def read_metadata(self, *args, **kwargs):
        path = os.path.join(self.path, ".metadata")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
            raise UserError(
                f"checkpoint index {path!r} is unreadable or not a checkpoint index ({e}); "
                "resume from an earlier checkpoint"
            ) from None
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor values (optimizer hyperparameters) load with weights_only=True."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def save_dcp(state: dict, folder: str) -> None:
    """Collective: each rank writes the shards it holds into folder/dcp."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=os.path.join(folder, DCP))


def load_dcp(state: dict, folder: str, no_dist: bool = False) -> None:
    """Fill `state` (its tensors give the layout this rank wants) from folder/dcp, in place."""
    import torch.distributed.checkpoint as dcp

    reader = SafeReader(os.path.join(folder, DCP))
    reader.read_metadata()  # refused here in one line, not inside DCP's CheckpointException
    dcp.load(
        state,
        storage_reader=reader,
        planner=SafeLoadPlanner(),
        no_dist=no_dist,
    )


# --------------------------------------------------------------------------- offline reading


class TrainedWeights:
    """The trained tensors of a checkpoint by original name, read a few at a time in one
    process (no process group): what export overlays on the base weights."""

    def __init__(self, folder: str):
        self.folder = folder
        if os.path.isfile(os.path.join(folder, DCP, ".metadata")):
            meta = SafeReader(os.path.join(folder, DCP)).read_metadata()
            self.kind = DCP
            self.shapes = {
                k.removeprefix("model."): (tuple(v.size), v.properties.dtype)
                for k, v in meta.state_dict_metadata.items()
                if k.startswith("model.") and hasattr(v, "size")
            }
        elif os.path.isdir(os.path.join(folder, WEIGHTS)):
            self.kind = WEIGHTS
            self.shapes, self._where = _partition_index(os.path.join(folder, WEIGHTS))
        else:
            raise UserError(
                f"checkpoint {folder!r} holds no trained weights (no {DCP}/ or {WEIGHTS}/)"
            )

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        unknown = [n for n in names if n not in self.shapes]
        if unknown:
            raise KeyError(unknown[0])
        if not names:
            return {}
        if self.kind == DCP:
            state = {
                f"model.{n}": torch.empty(self.shapes[n][0], dtype=self.shapes[n][1]) for n in names
            }
            with warnings.catch_warnings():  # "assuming ... a single process": it is one
                warnings.simplefilter("ignore", UserWarning)
                load_dcp(state, self.folder, no_dist=True)
            return {k.removeprefix("model."): v for k, v in state.items()}
        return {n: self._assemble(n) for n in names}

    def _assemble(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        shape, dtype = self.shapes[name]
        flat = torch.empty(int(torch.Size(shape).numel()), dtype=dtype)
        filled = 0
        for file, offset in self._where[name]:
            with safe_open(file, framework="pt") as f:
                part = f.get_tensor(name)
            flat[offset : offset + part.numel()] = part
            filled += part.numel()
        if filled != flat.numel():
            raise UserError(
                f"checkpoint weight {name!r} is incomplete ({filled} of {flat.numel()} elements "
                "in its partitions); resume or export from another checkpoint"
            )
        return flat.view(shape)


def write_partitions(folder: str, rank: int, parts: dict[str, tuple[torch.Tensor, list, int]]):
    """This rank's slices: name -> (flat slice, full shape, offset in the flattened tensor)."""
    from safetensors.torch import save_file

    os.makedirs(os.path.join(folder, WEIGHTS), exist_ok=True)
    tensors = {n: t.detach().to("cpu").contiguous() for n, (t, _, _) in parts.items()}
    meta = {n: json.dumps({"shape": list(s), "offset": int(o)}) for n, (_, s, o) in parts.items()}
    save_file(tensors, os.path.join(folder, WEIGHTS, f"rank-{rank:05d}.safetensors"), meta)


def _partition_index(folder: str):
    from safetensors import safe_open

    shapes, where = {}, {}
    for file in sorted(os.listdir(folder)):
        path = os.path.join(folder, file)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            for name in f.keys():
                info = json.loads(meta[name])
                dtype = f.get_slice(name).get_dtype()
                shapes[name] = (tuple(info["shape"]), _DTYPES[dtype])
                where.setdefault(name, []).append((path, int(info["offset"])))
    return shapes, where


_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}
