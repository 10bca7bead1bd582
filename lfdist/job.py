"""The job a launcher hands its ranks, and the files they share in the run folder.

One module for torchrun, the deepspeed launcher and Ray Train alike:
- out/job.json   what to run (a typed `Job`), written by the launching process;
- out/error.txt  how ranks report what ended them, one line per report, any rank may write;
- out/logs/      each rank's own output (rank-N.log), the launcher's (launcher.log) and what
                 rank 0 prints for the user (console.log);
- out/metrics.json  the result, written by rank 0.
Stdlib only: the launcher reads these files without importing torch.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import asdict, dataclass, field
from typing import Any

from lfdist.config import RunConfig, config_from_dict
from lfdist.errors import JobFailed, UserError

FAULT_KINDS = ("kill", "crash", "user", "sleep")


@dataclass(frozen=True)
class Fault:
    """A failure a test injects into one rank at the start of one step (0-based)."""

    kind: str  # kill: SIGKILL itself; crash: raise RuntimeError; user: raise UserError; sleep
    step: int
    rank: int | None = None  # None: every rank
    seconds: float = 0.0  # for sleep: every step from `step` on sleeps this long

    def __post_init__(self):
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {self.kind!r} is not one of {FAULT_KINDS}")


@dataclass(frozen=True)
class Debug:
    """Test-only switches; never set by the CLI."""

    check_frozen: bool = False  # digest the frozen weights before and after training
    stop_after: int | None = None  # a simulated preemption: stop (with a checkpoint) here
    inject_faults: tuple[Fault, ...] = ()
    load_whole: bool = False  # every rank loads the whole model (the old path), to compare


@dataclass(frozen=True)
class Job:
    config: RunConfig
    plan: str  # the plan file (job.json holds its absolute path)
    out: str  # the run folder (job.json holds its absolute path)
    resume: bool = False
    evaluate: bool = True
    debug: Debug = field(default_factory=Debug)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.record(),
            "plan": os.path.abspath(self.plan),  # the ranks' (and Ray workers') cwd may differ
            "out": os.path.abspath(self.out),
            "resume": self.resume,
            "evaluate": self.evaluate,
            "debug": asdict(self.debug),
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Job:
        debug = dict(data.get("debug") or {})
        faults = tuple(Fault(**f) for f in debug.pop("inject_faults", ()))
        return Job(
            config=config_from_dict(data["config"]),
            plan=data["plan"],
            out=data["out"],
            resume=bool(data.get("resume", False)),
            evaluate=bool(data.get("evaluate", True)),
            debug=Debug(**debug, inject_faults=faults),
        )


def job_path(out: str) -> str:
    return os.path.join(out, "job.json")


def write_job(job: Job) -> str:
    """out/job.json (the folder exists); a stale error file or stop request of an earlier run
    is removed."""
    clear_errors(job.out)
    clear_stop_file(job.out)
    path = job_path(job.out)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(job.to_dict(), f, indent=1)
    os.replace(tmp, path)
    return path


def read_job(path: str) -> Job:
    with open(path) as f:
        return Job.from_dict(json.load(f))


def read_metrics(out: str) -> dict:
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- rank logs


def logs_dir(out: str) -> str:
    return os.path.join(out, "logs")


def rank_log(out: str, rank: int) -> str:
    return os.path.join(logs_dir(out), f"rank-{rank}.log")


def console_log(out: str) -> str:
    """What rank 0 prints for the user; the launching process copies it to its stdout."""
    return os.path.join(logs_dir(out), "console.log")


# ----------------------------------------------------------------------------- error protocol
# error.txt holds one line per report, "<rank>\t<kind>\t<message>": kind `user` (bad input, the
# message is for the user as it is), `crash` (a bug or a broken peer; the traceback is in the
# rank's log), `killed` (written by the rank's monitor process: a signal killed the rank) or
# `stopped` (a requested stop, the message names the step). Every rank writes its own report
# with one O_APPEND write, so reports from several ranks never interleave, and no report
# depends on another rank staying alive long enough to write it.

ERROR_FILE = "error.txt"


@dataclass(frozen=True)
class Report:
    rank: int
    kind: str  # user | crash | killed | stopped
    message: str


def error_path(out: str) -> str:
    return os.path.join(out, ERROR_FILE)


def clear_errors(out: str) -> None:
    if os.path.exists(error_path(out)):
        os.remove(error_path(out))


def write_report(out: str, rank: int, kind: str, message: str) -> None:
    line = f"{rank}\t{kind}\t{' '.join(str(message).split())}\n".encode()
    try:
        fd = os.open(error_path(out), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError:
        pass  # the run folder is gone: nobody is left to read the report


def read_reports(out: str) -> list[Report]:
    try:
        with open(error_path(out)) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    reports = []
    for line in lines:
        rank, kind, message = (line.split("\t", 2) + ["", ""])[:3]
        if rank.isdigit() and kind:
            reports.append(Report(int(rank), kind, message))
    return reports


def raise_reported_error(out: str) -> None:
    """In the launching process: the first bad-input report as a UserError (bad input is the
    cause a user can fix, whatever crashed on the other ranks after it), else the first crash."""
    reports = read_reports(out)
    for r in reports:
        if r.kind == "user":
            raise UserError(r.message)
    for r in reports:
        if r.kind == "crash":
            raise JobFailed(
                f"training failed on rank {r.rank}: {r.message} (traceback in "
                f"{rank_log(out, r.rank)})"
            )


# ----------------------------------------------------------------------------- stop requests
# Set by a signal handler in the rank (SIGTERM from a scheduler or a launcher that forwards it,
# SIGINT); read by the training loop at step boundaries, where the ranks agree and checkpoint.

_stop_signal: list[int] = []


def request_stop(signum: int, _frame=None) -> None:
    if not _stop_signal:
        _stop_signal.append(signum)


def stop_requested() -> int | None:
    """The signal that asked this process to stop, if any."""
    return _stop_signal[0] if _stop_signal else None


# Ranks that cannot install signal handlers (Ray Train runs the rank's code in a thread of its
# worker actor) read a stop request from a file in out/ instead: the launching process writes
# the signal it received there, and every rank sees it at its next step boundary.

STOP_FILE = ".stop"


def stop_file(out: str) -> str:
    return os.path.join(out, STOP_FILE)


def write_stop_file(out: str, signum: int) -> None:
    tmp = stop_file(out) + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(int(signum)))
    os.replace(tmp, stop_file(out))


def read_stop_file(out: str) -> int | None:
    try:
        with open(stop_file(out)) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def clear_stop_file(out: str) -> None:
    if os.path.exists(stop_file(out)):
        os.remove(stop_file(out))


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
