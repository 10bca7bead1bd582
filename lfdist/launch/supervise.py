"""Run torchrun or the deepspeed launcher as one job, and say in one line how it ended.

- The launcher runs in its own session, so a terminal's Ctrl-C reaches lfdist alone, and lfdist
  forwards SIGTERM/SIGINT to every process of the job (torchrun puts each rank in a session of
  its own, so a process group does not reach them: the tree is walked in /proc). The ranks then
  stop at the next step boundary with a checkpoint; a second signal, or a job still alive after
  the grace period, gets SIGKILL.
- The launcher dies with lfdist (PR_SET_PDEATHSIG), and each rank with its launcher (worker.py).
- Its own output (and torchrun's failure summary) goes to out/logs/launcher.log, each rank's to
  out/logs/rank-N.log; rank 0's prints (out/logs/console.log) are copied to lfdist's stdout as
  they come. What lfdist prints when the job fails is the one line made here.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from lfdist.job import console_log, logs_dir, rank_log, read_reports

GRACE_S = 120.0  # how long a signalled job may take to checkpoint and exit before SIGKILL
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Ended:
    returncode: int
    signal: int | None  # the signal lfdist received and forwarded, if any


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(sig: int = signal.SIGTERM, prctl=None) -> None:
    """Ask the kernel to send `sig` to this process when its parent exits (Linux only)."""
    prctl = prctl or _prctl()
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def launcher_log(out: str, node_rank: int = 0) -> str:
    name = "launcher.log" if node_rank == 0 else f"launcher-node{node_rank}.log"
    return os.path.join(logs_dir(out), name)


def supervise(
    argv: list[str], env: dict[str, str], out: str, pass_fds=(), node_rank: int = 0
) -> Ended:
    """Run the launcher command to its end; forward SIGTERM/SIGINT to the whole job."""
    received: list[int] = []
    state: dict = {"proc": None, "since": None}

    def on_signal(signum, _frame):
        received.append(signum)
        state["since"] = state["since"] or time.monotonic()
        if state["proc"] is not None:
            _signal_tree(state["proc"].pid, signal.SIGKILL if len(received) > 1 else signum)

    main = threading.current_thread() is threading.main_thread()
    handlers = {}
    if main:  # signal handlers can only be installed from the main thread
        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    os.makedirs(logs_dir(out), exist_ok=True)
    console = _Console(console_log(out) if node_rank == 0 else None)  # rank 0 runs on node 0
    try:
        with open(launcher_log(out, node_rank), "ab") as log:
            proc = subprocess.Popen(
                argv,
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
                pass_fds=tuple(pass_fds),
                # libc resolved here: loading a library in a forked child can deadlock.
                preexec_fn=functools.partial(die_with_parent, signal.SIGTERM, _prctl()),
            )
        state["proc"] = proc
        if received:  # a signal that came while the job was starting
            _signal_tree(proc.pid, received[0])
        while True:
            try:
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                console.copy()
                if state["since"] and time.monotonic() - state["since"] > GRACE_S:
                    _signal_tree(proc.pid, signal.SIGKILL)
    finally:
        console.copy()
        for s, h in handlers.items():
            signal.signal(s, h)
        if state["proc"] is not None and state["proc"].poll() is None:
            _signal_tree(state["proc"].pid, signal.SIGKILL)
            state["proc"].wait()
    return Ended(code, received[0] if received else None)


class _Console:
    """Copies what rank 0 appends to out/logs/console.log to this process's stdout."""

    def __init__(self, path: str | None):
        self.path = path
        self.offset = os.path.getsize(path) if path and os.path.exists(path) else 0

    def copy(self) -> None:
        if self.path is None:
            return
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # whole lines only; the rest comes with the next copy
        if end:
            self.offset += end
            sys.stdout.write(data[:end].decode(errors="replace"))
            sys.stdout.flush()


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_tree(pid: int, sig: int) -> None:
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def kill_leftover_ranks(out: str) -> None:
    """SIGKILL any rank of this job still alive (its pid recorded in its log's first line)."""
    job_file = os.path.join(out, "job.json")
    for pid in _rank_pids(out):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
        except OSError:
            continue
        if b"lfdist.launch.worker" in cmdline and os.fsencode(job_file) in cmdline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _rank_pids(out: str) -> list[int]:
    pids = []
    folder = logs_dir(out)
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if re.fullmatch(r"rank-\d+\.log", name):
            with open(os.path.join(folder, name), errors="replace") as f:
                m = re.search(r"pid (\d+)", f.readline())
            if m:
                pids.append(int(m.group(1)))
    return pids


# ----------------------------------------------------------------------------- one line


def resume_command() -> str:
    """The command the user ran, with --resume: what to type to continue the run."""
    args = [a for a in sys.argv[1:] if a != "--overwrite"]
    if args[:1] in (["train"], ["run"]):
        return "lfdist " + shlex.join(args + ([] if "--resume" in args else ["--resume"]))
    return "the same `lfdist train` command with --resume"


def dead_rank(out: str, ranks: range) -> tuple[int, str] | None:
    """The rank that died first, with how: the first `killed` report (its monitor saw the
    signal), else a rank of this node that ended with no report at all."""
    reports = read_reports(out)
    killed = [r for r in reports if r.kind == "killed"]
    if killed:
        return killed[0].rank, killed[0].message
    reported = {r.rank for r in reports}
    silent = [r for r in ranks if r not in reported and os.path.exists(rank_log(out, r))]
    return (silent[0], "ended without a report") if silent else None
