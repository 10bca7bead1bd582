"""Checkpoints: plan + trainable weights + optimizer + scheduler + RNG + data position.

Written into a temporary folder, checksummed, then renamed into place, so a crash or a
kill never leaves a checkpoint that looks complete but is not. `latest` names the newest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil

import torch
import torch.distributed as dist

from lfdist.errors import UserError

CHECKSUMS = "checksums.json"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str, step: int, engine, world, plan_path: str, extra: dict) -> str:
    """Collective: every rank calls. Returns the final folder."""
    from safetensors.torch import save_file

    name = f"step-{step:06d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".{name}.tmp")
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    engine.save(tmp)
    trainable = engine.full_trainable_state()
    torch.save(rng_state(), os.path.join(tmp, f"rng-rank{world.rank}.pt"))
    if world.is_main:
        save_file(
            {k: v.contiguous() for k, v in trainable.items()},
            os.path.join(tmp, "trainable.safetensors"),
        )
        shutil.copy(plan_path, os.path.join(tmp, "plan.yaml"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(
                {"step": step, "data_position": step, "world_size": world.world_size, **extra}, f
            )
    _barrier()
    if world.is_main:
        sums = {f: _sha256(os.path.join(tmp, f)) for f in _all_files(tmp)}
        with open(os.path.join(tmp, CHECKSUMS), "w") as f:
            json.dump(sums, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    _barrier()
    return final


def _all_files(folder: str) -> list[str]:
    """Every file below folder (engines such as DeepSpeed write subfolders), relative, sorted."""
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, f), folder) for f in files]
    return sorted(f for f in out if f != CHECKSUMS)


def verify(folder: str) -> None:
    path = os.path.join(folder, CHECKSUMS)
    if not os.path.isfile(path):
        raise UserError(
            f"checkpoint {folder!r} is incomplete (no {CHECKSUMS}); resume from an earlier one"
        )
    with open(path) as f:
        sums = json.load(f)
    for name, digest in sums.items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file) or _sha256(file) != digest:
            raise UserError(
                f"checkpoint file {file!r} is missing or corrupt (checksum mismatch); resume from an earlier checkpoint"
            )


def latest_checkpoint(root: str) -> str | None:
    pointer = os.path.join(root, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(root, f.read().strip())


def load_checkpoint(folder: str, engine, world) -> dict:
    """Collective. Restores engine state and this rank's RNG; returns state.json."""
    verify(folder)
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    if state["world_size"] != world.world_size:
        raise UserError(
            f"checkpoint {folder!r} was written by {state['world_size']} ranks but this run has "
            f"{world.world_size}; resume with --nproc {state['world_size']}"
        )
    engine.load(folder)
    set_rng_state(torch.load(os.path.join(folder, f"rng-rank{world.rank}.pt"), weights_only=False))
    return state
