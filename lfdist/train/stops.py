"""How a rank learns it should stop at a step boundary: a signal, Ray's stop file, or a fault a
test injected. The loop makes every rank agree (in the step's health all-reduce)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from lfdist.errors import UserError
from lfdist.job import Fault, Job, read_stop_file, signal_name, stop_requested


def step_boundary(job: Job, world) -> Callable[[int], bool]:
    """Called at the start of each step: fires the faults a test injected into this rank and
    says whether this rank is asked to stop; the loop makes every rank agree, so all stop at
    one step."""
    faults = [f for f in job.debug.inject_faults if f.rank in (None, world.rank)]

    def at(step: int) -> bool:
        for fault in faults:
            _fire(fault, step, world.rank)
        # The stop file (Ray Train) is read once, on rank 0; the all-reduce tells the others.
        return bool(stop_requested() or (world.is_main and read_stop_file(job.out)))

    return at


def stop_signal(out: str) -> str:
    """What stopped the run, in words (metrics.json's stopped.signal)."""
    signum = stop_requested() or read_stop_file(out)
    return signal_name(signum) if signum else "a stop request on another rank"


def _fire(fault: Fault, step: int, rank: int) -> None:
    if fault.kind == "sleep" and step >= fault.step:
        time.sleep(fault.seconds)
    elif step != fault.step:
        return
    elif fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.kind == "crash":
        raise RuntimeError(f"injected crash on rank {rank} at step {step}")
    elif fault.kind == "user":
        raise UserError(f"injected bad input on rank {rank} at step {step}")
