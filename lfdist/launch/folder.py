"""The run folder of a training job: whether it may be written, and a lock held for the run.

Checked before anything is written, so a refused launch leaves the folder as it was.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from lfdist.errors import UserError
from lfdist.job import Job, write_job

# What a training job writes into its folder; anything else there is the user's.
OURS = (
    "job.json",
    "job.json.tmp",
    "error.txt",
    "metrics.json",
    "metrics.jsonl",
    "tensorboard",
    "wandb",
    "checkpoints",
    "logs",
    ".lock",
    "ray",
)
# What --overwrite removes: the earlier run's results, never the user's files.
RESULTS = tuple(n for n in OURS if n not in ("job.json", "job.json.tmp", ".lock"))


def check_run_folder(out: str, resume: bool, overwrite: bool, has_checkpoint: bool) -> None:
    """Refuse a folder holding the user's files or a finished run, unless overwrite."""
    if resume and overwrite:
        raise UserError("--resume continues a run and --overwrite starts it over; pass one of them")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out!r} is an existing file, not a folder; give a folder path")
    if resume:
        if not has_checkpoint:
            raise UserError(f"--resume: no checkpoint in {out!r}; drop --resume to start a new run")
        return
    entries = set(os.listdir(out)) if os.path.isdir(out) else set()
    if overwrite or not entries:
        return
    foreign = sorted(entries - set(OURS))
    if foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UserError(
            f"--out {out!r} holds files that are not an lfdist training run ({listed}); choose "
            "an empty or new folder, or pass --overwrite to write into it anyway"
        )
    if has_checkpoint:
        raise UserError(
            f"output folder {out!r} already holds a run; pass --resume to continue it, "
            "--overwrite to start it over, or choose another --out"
        )
    if "metrics.json" in entries:
        raise UserError(
            f"output folder {out!r} holds a finished run whose checkpoints/ is gone; pass "
            "--overwrite to start it over, or choose another --out"
        )


def make_run_folder(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create --out {out!r} ({e.strerror or e}); choose a writable folder"
        ) from None


def clear_results(out: str) -> None:
    """--overwrite: the earlier run's results go (a stale `latest` would mislead a resume)."""
    for name in RESULTS:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


@contextmanager
def open_run(job: Job, overwrite: bool, owner: bool = True) -> Iterator[int | None]:
    """The launch sequence torchrun and Ray share, once validation passed: create out/, lock it,
    clear an earlier run's results on --overwrite, write out/job.json; yields the lock's
    descriptor. Multi-node runs share out/: only its owner (node 0) locks and clears it."""
    make_run_folder(job.out)
    with run_lock(job.out) if owner else nullcontext(None) as fd:
        if overwrite and owner:
            clear_results(job.out)
        write_job(job)
        yield fd


@contextmanager
def run_lock(out: str) -> Iterator[int]:
    """An exclusive flock on out/.lock for as long as the job runs; yields the descriptor.

    The launcher passes the descriptor on to torchrun/deepspeed, so the lock is held until the
    last process of the job is gone, even when the launcher itself is killed first. The file is
    removed on release when no process of the job holds it any more (_remove_if_free).
    """
    path = os.path.join(out, ".lock")
    fd = _acquire(path, out)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)
        _remove_if_free(path)


def _acquire(path: str, out: str) -> int:
    """The flocked descriptor of `path`. A lock taken on a file that its last holder removed in
    the meantime guards nothing (the next job would create a new file), so then try again."""
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(
                f"cannot write in --out {out!r} ({e.strerror or e}); choose a writable folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"another lfdist job (pid {holder}) is running in {out!r}; wait for it to end or "
                "choose another --out"
            ) from None
        if _same_file(fd, path):
            return fd
        os.close(fd)
    raise UserError(f"cannot lock {path!r}: it keeps being removed; is another job cleaning it?")


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _remove_if_free(path: str) -> None:
    """Remove the lock file only under a lock of our own: ranks of a killed launcher that still
    hold the job's descriptor keep it (and the folder stays locked); a job that starts in the
    meantime holds it and keeps it. A job opening it just before the removal finds the file
    gone once it holds the lock (_acquire) and locks a new one."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return
    try:
        if _same_file(fd, path):
            os.unlink(path)
    finally:
        os.close(fd)
