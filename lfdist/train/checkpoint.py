"""Checkpoints: plan + trainable weights + optimizer + scheduler + RNG + data position.

Layout of a run's checkpoints/ folder (format 2):

    latest                  the name of the newest complete checkpoint, `step-NNNNNN`, nothing else
    step-NNNNNN/            the state after NNNNNN optimizer steps
      state.json            step, data_position (= step: the feed is a function of the step),
                            world_size, engine, model, num_labels, config (the run's settings),
                            format
      plan.yaml             the plan the run trains: part of the checkpoint, compared on --resume
      rng-rankR.pt          rank R's RNG: python `random`, torch CPU and CUDA generator states
                            (plain tuples and tensors: loads with torch.load(weights_only=True))
      dcp/                  DDP / FSDP1 / FSDP2: trainable weights + optimizer, each rank's
                            shards (torch.distributed.checkpoint), and scheduler.json
      deepspeed/            DeepSpeed's own files (each rank's optimizer partition), frozen
                            parameters excluded, and weights/ (each rank's trainable slices)
      checksums.json        sha256 of every other file in the folder: a file missing from it,
                            or listed but absent, makes the checkpoint invalid

Sharded: every rank writes what it holds (lfdist/engines/shards.py); nothing is gathered.
Atomic: written into `.step-NNNNNN.tmp`, checksummed, renamed into place, then `latest` is
replaced, so a crash or a kill never leaves a checkpoint that looks complete but is not.
Never written when a trainable weight is not finite: the last good checkpoint stays `latest`.
Trusted only after the checks: the manifest is complete and matches, `latest` names a step
folder inside this root, and nothing is unpickled beyond plain data (weights_only=True).
Every rank must see the same folder (a shared filesystem across nodes).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil

import torch
import torch.distributed as dist

from lfdist.errors import UserError
from lfdist.train.collective import all_finite, all_ranks_agree, gather_objects

CHECKSUMS = "checksums.json"
FORMAT = 2
STEP_NAME = re.compile(r"step-\d{6}")


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
        "python": random.getstate(),  # (version, tuple of ints, gauss): plain data
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_finite(engine, world, step: int) -> None:
    """Collective: refuse to checkpoint weights that are not finite on any rank."""
    if not all_ranks_agree(all_finite(engine.trainable_shards())):
        raise UserError(
            f"the trainable weights are not finite after step {step}; no checkpoint written, the "
            "last good one is kept — lower train.lr or keep train.max_grad_norm on"
        )


def save_checkpoint(root: str, step: int, engine, world, plan_path: str, extra: dict) -> str:
    """Collective: every rank calls. Returns the final folder."""
    check_finite(engine, world, step)
    name = f"step-{step:06d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".{name}.tmp")
    if world.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    engine.save(tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng-rank{world.rank}.pt"))
    if world.is_main:
        shutil.copy(plan_path, os.path.join(tmp, "plan.yaml"))
        state = {
            "format": FORMAT,
            "step": step,
            "data_position": step,
            "world_size": world.world_size,
            **extra,
        }
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f, indent=1)
    _barrier()
    sums = _checksums(tmp, world)
    if world.is_main:
        with open(os.path.join(tmp, CHECKSUMS), "w") as f:
            json.dump(sums, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    _barrier()
    return final


def _checksums(folder: str, world) -> dict[str, str]:
    """Every rank hashes its share of the files (the shards are as many as the ranks)."""
    files = _all_files(folder)
    mine = {f: _sha256(os.path.join(folder, f)) for f in files[world.rank :: world.world_size]}
    return {k: v for part in gather_objects(mine) for k, v in sorted(part.items())}


def _all_files(folder: str) -> list[str]:
    """Every entry below folder, relative, sorted; links and special files are refused."""
    out = []
    for root, dirs, files in os.walk(folder):
        for entry in dirs + files:
            path = os.path.join(root, entry)
            if os.path.islink(path) or not (os.path.isdir(path) or os.path.isfile(path)):
                raise UserError(
                    f"checkpoint {folder!r} holds {path!r}, which is a link or not a regular file; "
                    "resume from a checkpoint lfdist wrote"
                )
        out += [os.path.relpath(os.path.join(root, f), folder) for f in files]
    return sorted(f for f in out if f != CHECKSUMS)


def verify(folder: str, world=None) -> None:
    """The manifest lists every file in the folder and each matches its digest. With a world
    (collective), each rank hashes its share of the files and all ranks raise the same line."""
    path = os.path.join(folder, CHECKSUMS)
    if not os.path.isfile(path):
        raise UserError(
            f"checkpoint {folder!r} is incomplete (no {CHECKSUMS}); resume from an earlier one"
        )
    try:
        with open(path) as f:
            sums = json.load(f)
    except ValueError:
        sums = None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise UserError(
            f"checkpoint {folder!r} has a malformed {CHECKSUMS}; resume from an earlier one"
        )
    present = set(_all_files(folder))
    missing, extra = sorted(set(sums) - present), sorted(present - set(sums))
    if missing or extra:
        what = f"{missing[0]!r} is listed but absent" if missing else f"{extra[0]!r} is not listed"
        raise UserError(
            f"checkpoint {folder!r} does not match its {CHECKSUMS} ({what}); resume from an "
            "earlier checkpoint"
        )
    names = sorted(sums)
    if world is not None:
        names = names[world.rank :: world.world_size]
    bad = [n for n in names if _sha256(os.path.join(folder, n)) != sums[n]]
    if world is not None:
        bad = sorted(n for part in gather_objects(bad[:1]) for n in part)
    if bad:
        raise UserError(
            f"checkpoint file {os.path.join(folder, bad[0])!r} is corrupt (checksum mismatch); "
            "resume from an earlier checkpoint"
        )


def latest_checkpoint(root: str) -> str | None:
    """The folder `latest` names: a `step-NNNNNN` folder directly inside root, nothing else."""
    pointer = os.path.join(root, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer, errors="replace") as f:
        name = f.read().strip()
    folder = os.path.join(root, name)
    if not STEP_NAME.fullmatch(name) or os.path.islink(folder) or not os.path.isdir(folder):
        raise UserError(
            f"{pointer!r} names {name[:80]!r}, not a step-NNNNNN checkpoint folder in "
            f"{root!r}; write the newest complete step folder's name into it"
        )
    return folder


def load_checkpoint(folder: str, engine, world) -> dict:
    """Collective. Restores engine state and this rank's RNG; returns state.json."""
    from lfdist.train.resume import check_writer, read_state

    verify(folder, world)
    state = read_state(folder)
    check_writer(state, folder, engine.name, world.world_size)
    engine.load(folder)
    rng = os.path.join(folder, f"rng-rank{world.rank}.pt")
    if os.path.isfile(rng):  # a rank the writing run did not have keeps its seeded state
        try:
            set_rng_state(torch.load(rng, weights_only=True))
        except (pickle.UnpicklingError, RuntimeError, KeyError, ValueError, TypeError) as e:
            raise UserError(
                f"checkpoint file {rng!r} is not an RNG state lfdist wrote ({str(e)[:120]}); "
                "resume from an earlier checkpoint"
            ) from None
    return state
