"""One rank of a training job. The same code runs under torchrun, deepspeed and Ray Train:
they all export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.

Usage (built by lfdist.launch.commands): python -m lfdist.launch.worker JOB.json

Under torchrun and deepspeed (main()), the rank also
- writes all its output to out/logs/rank-N.log (rank 0's prints also reach the terminal), so a
  traceback stays in the run folder and never buries the launcher's one line;
- exits when its launcher is gone (PR_SET_PDEATHSIG), and treats SIGTERM/SIGINT as a request
  to stop at the next step boundary with a checkpoint (lfdist.job.request_stop);
- reports what ended it through out/error.txt (lfdist.job's error protocol).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback

from lfdist.job import Job, rank_log, read_job, request_stop, write_report


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

            deepspeed.init_distributed(dist_backend=backend)
        else:
            dist.init_process_group(backend=backend)
    return World(rank, world_size, local_rank, device)


def run_job(job: Job) -> None:
    from lfdist.train.job import run_training

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
    """Rank 0's stdout: the terminal and the rank's log file."""

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
    terminal = os.fdopen(os.dup(1), "w", buffering=1) if rank == 0 else None
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = _Tee(terminal, log) if terminal is not None else log
    sys.stderr = log


def _watch_launcher() -> None:
    from lfdist.launch.supervise import die_with_parent

    die_with_parent(signal.SIGTERM)
    if os.getppid() == 1:  # the launcher died before the request above took effect
        os._exit(1)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, request_stop)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    job = read_job(argv[0])
    rank = int(os.environ.get("RANK", 0))
    _log_to_file(job.out, rank)
    _watch_launcher()
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
