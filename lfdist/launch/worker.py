"""One rank of a training job. The same code runs under torchrun, deepspeed and Ray Train:
they all export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.

Usage (built by lfdist.launch.commands): python -m lfdist.launch.worker JOB.json

Under torchrun and deepspeed (main()), the rank also
- writes all its output to out/logs/rank-N.log, so a traceback stays in the run folder and
  never buries the launcher's one line; rank 0's prints also go to out/logs/console.log, which
  the launching process copies to its own stdout (launchers close other descriptors, so a
  file is how rank 0 reaches the user's terminal);
- exits when its launcher is gone (PR_SET_PDEATHSIG), and treats SIGTERM/SIGINT as a request
  to stop at the next step boundary with a checkpoint (lfdist.job.request_stop);
- reports what ended it through out/error.txt (lfdist.job's error protocol), through a small
  monitor process when a signal killed it (_monitor).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback

from lfdist.job import (
    Job,
    console_log,
    rank_log,
    read_job,
    request_stop,
    signal_name,
    write_report,
)


def _world():
    import torch
    import torch.distributed as dist

    from lfdist.engines.base import World

    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if os.environ.get("LFDIST_ENGINE") == "deepspeed":
            import deepspeed

            from lfdist.engines.deepspeed import release_shm_name

            deepspeed.init_distributed(dist_backend=backend)
            dist.barrier()  # every rank has mapped its peers' shared buffers
            release_shm_name(rank)
        else:
            dist.init_process_group(backend=backend)
    return World(rank, world_size, local_rank, device)


def run_job(job: Job) -> None:
    from lfdist.train.recipe import run_training

    run_training(job, _world())


def report_failure(job: Job, rank: int, e: BaseException) -> int:
    """Write this rank's report of `e` (its traceback goes to stderr); returns the exit code."""
    from lfdist.errors import UserError

    if isinstance(e, UserError):
        write_report(job.out, rank, "user", str(e))
        return 2
    traceback.print_exc()
    write_report(job.out, rank, "crash", f"{type(e).__name__}: {e}")
    return 1


class _Tee:
    """Rank 0's stdout: the console file and the rank's log file."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()

    def isatty(self):
        return False

    def fileno(self):
        return self.streams[-1].fileno()


def _log_to_file(out: str, rank: int) -> None:
    """Point this process's stdout and stderr (Python's and the C runtime's) at its log."""
    path = rank_log(out, rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    log = open(path, "a", buffering=1)  # noqa: SIM115 — lives as long as the process
    log.write(f"=== rank {rank} pid {os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    if rank == 0:
        console = open(console_log(out), "a", buffering=1)  # noqa: SIM115 — as the log
        sys.stdout = _Tee(console, log)
    else:
        sys.stdout = log
    sys.stderr = log


def _monitor(job: Job, rank: int) -> None:
    """Fork: the child returns and is the rank; this process stays as its monitor.

    A rank killed by a signal (SIGKILL, the OOM killer) cannot report it, and the launchers
    report it badly (the deepspeed launcher names the exit code of whichever rank it polled
    first, not the rank). The monitor waits for the rank, writes `killed` to error.txt with
    the signal, and forwards SIGTERM/SIGINT to it. It dies with its launcher, passing SIGTERM
    on (checkpoint and stop); the rank dies with its monitor (SIGKILL: the monitor only goes
    first when something killed it hard).
    """
    from lfdist.launch.supervise import die_with_parent

    die_with_parent(signal.SIGTERM)
    if os.getppid() == 1:  # the launcher died before the request above took effect
        os._exit(1)
    child = os.fork()
    if child == 0:
        die_with_parent(signal.SIGKILL)
        if os.getppid() == 1:
            os._exit(1)
        return
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, _frame: os.kill(child, signum))
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        write_report(job.out, rank, "killed", f"was killed by {signal_name(signum)}")
        os._exit(128 + signum)
    os._exit(os.waitstatus_to_exitcode(status))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    job = read_job(argv[0])
    rank = int(os.environ.get("RANK", 0))
    _monitor(job, rank)
    _log_to_file(job.out, rank)
    for s in (signal.SIGTERM, signal.SIGINT):  # stop at the next step boundary, checkpointed
        signal.signal(s, request_stop)
    code = 0
    try:
        run_job(job)
    except Exception as e:  # noqa: BLE001 — every failure must end this rank cleanly
        code = report_failure(job, rank, e)
    _shutdown(ok=code == 0)
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo can abort at interpreter exit ("terminate called without an active exception"),
    # which makes torchrun report a failure after a good run: leave without the teardown.
    os._exit(code)


def _shutdown(ok: bool) -> None:
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


if __name__ == "__main__":
    main()
