"""Launching that is safe, end to end on 2 gloo ranks of tiny llama: a signal reaches the whole
job and leaves a checkpoint that --resume continues; a killed launcher takes its ranks with it;
a dead rank is one line naming it, its signal and the resume command; a second job on the same
folder is refused; bad input on one rank is one line, once."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lfdist.config import config_from_dict
from lfdist.errors import UserError
from lfdist.job import Debug, Fault, Job
from lfdist.launch.run import launch_training
from tests.helpers import slow_job_script

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PREFIX = ["frozen"] * 5 + ["full"] * 3


def _cfg(steps: int):
    return config_from_dict(
        {
            "model": {"spec": "tiny:llama"},
            "data": {"spec": "synthetic:lm:200", "seq_len": 32},
            "train": {"engine": "fsdp2", "nproc": 2, "steps": steps, "batch_size": 2},
        }
    )


@pytest.fixture
def plan(tmp_path) -> str:
    from lfdist.model.tiny import build_tiny
    from lfdist.plan import save_plan
    from tests.helpers import make_plan

    path = str(tmp_path / "plan.yaml")
    save_plan(make_plan(build_tiny("llama", "lm"), PREFIX), path)
    return path


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _job_processes(out: Path) -> list[int]:
    """Every live process whose command line names this run's job file (torchrun and ranks)."""
    needle = os.fsencode(str(out / "job.json"))
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmd = f.read()
                with open(f"/proc/{name}/stat") as f:
                    zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                continue
            if needle in cmd and not zombie:
                found.append(int(name))
    return found


def _wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _training_started(out: Path):
    log = out / "logs" / "rank-0.log"
    return log.exists() and "step 2/" in log.read_text(errors="replace")


def _rank_pid(out: Path, rank: int) -> int:
    first = (out / "logs" / f"rank-{rank}.log").read_text().splitlines()[0]
    return int(first.split(" pid ")[1].split()[0])


def _start_slow_job(plan: str, out: Path, steps: int) -> subprocess.Popen:
    """launch_training in a process of its own, every step slowed to >= 0.3 s."""
    code = slow_job_script(
        "lfdist.launch.run:launch_training", _cfg(steps).to_dict(), plan, str(out)
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigterm_stops_the_whole_job_with_a_checkpoint_that_resume_continues(tmp_path, plan):
    out = tmp_path / "run"
    proc = _start_slow_job(plan, out, steps=40)
    try:
        _wait_for(lambda: _training_started(out), 240, "training to start")
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert took < 30, took
    assert _job_processes(out) == []
    latest = (out / "checkpoints" / "latest").read_text()
    step = int(latest.removeprefix("step-"))
    assert 2 <= step < 40
    line = stderr.strip().splitlines()[-1]
    assert line == (
        f"lfdist: stopped by SIGTERM; checkpoint after step {step} in "
        f"{out}/checkpoints/{latest}; continue with: the same `lfdist train` command with --resume"
    )
    resumed = launch_training(Job(_cfg(steps=40), plan, str(out), resume=True, evaluate=False))
    assert resumed["resumed_from"] == step
    assert list(resumed["losses"]) == [str(i) for i in range(40)]


def test_a_killed_launcher_takes_its_ranks_with_it(tmp_path, plan):
    out = tmp_path / "run"
    proc = _start_slow_job(plan, out, steps=400)
    try:
        _wait_for(lambda: _training_started(out), 240, "training to start")
        assert len(_job_processes(out)) == 5  # torchrun, two rank monitors, two ranks
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        _wait_for(lambda: not _job_processes(out), 45, "the ranks to exit")
    finally:
        proc.kill()
        for pid in _job_processes(out):
            os.kill(pid, signal.SIGKILL)
    # torchrun got SIGTERM from the kernel when its parent died and passed it on: the ranks
    # stopped at a step boundary and checkpointed, so the run can continue.
    assert (out / "checkpoints" / "latest").read_text().startswith("step-")


def _cli(*args, out: Path, steps: int) -> subprocess.Popen:
    argv = [sys.executable, "-m", "lfdist.cli", "train", "--model", "tiny:llama"]
    argv += ["--data", "synthetic:lm:200", "--seq-len", "32", "--nproc", "2"]
    argv += ["--steps", str(steps), "--out", str(out), *args, "train.batch_size=2"]
    return subprocess.Popen(
        argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_second_job_on_a_folder_is_refused_and_a_dead_rank_is_one_line(tmp_path, plan):
    out = tmp_path / "run"
    first = _cli("--plan", plan, out=out, steps=2000)
    try:
        _wait_for(lambda: _training_started(out), 240, "training to start")
        second = _cli("--plan", plan, out=out, steps=2000)
        _, err = second.communicate(timeout=240)
        assert second.returncode == 2
        lock_holder = (out / ".lock").read_text().strip()
        assert err.strip().splitlines()[-1] == (
            f"lfdist: error: another lfdist job (pid {lock_holder}) is running in {str(out)!r}; "
            "wait for it to end or choose another --out"
        )
        os.kill(_rank_pid(out, 1), signal.SIGKILL)
        _, err = first.communicate(timeout=90)
    finally:
        first.kill()
    assert first.returncode == 1
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert [line for line in lines if line.startswith("lfdist:")] == [lines[-1]]
    args = (
        f"train --model tiny:llama --data synthetic:lm:200 --seq-len 32 --nproc 2 --steps 2000 "
        f"--out {out} --plan {plan} train.batch_size=2 --resume"
    )
    assert lines[-1] == (
        f"lfdist: rank 1 was killed by SIGKILL; its output is in {out}/logs/rank-1.log; "
        f"continue from the last checkpoint with: lfdist {args}"
    )
    assert _job_processes(out) == []
    assert (out / "logs" / "rank-1.log").read_text().startswith("=== rank 1 pid ")


def test_bad_input_found_on_one_rank_is_one_line_once(tmp_path, plan):
    debug = Debug(inject_faults=(Fault("user", 1, rank=1),))
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        launch_training(Job(_cfg(steps=3), plan, str(out), evaluate=False, debug=debug))
    assert str(e.value) == "injected bad input on rank 1 at step 1"
    # Rank 0's traceback (the broken collective) stays in its log, not on the terminal.
    assert "Traceback" in (out / "logs" / "rank-0.log").read_text()


@pytest.mark.deepspeed
def test_a_killed_rank_is_named_under_the_deepspeed_launcher(tmp_path, plan):
    # The deepspeed launcher reports the exit code of whichever rank it polls first; the rank's
    # own monitor is what names rank 1 and its signal.
    from lfdist.errors import JobFailed

    cfg = config_from_dict(
        {
            **_cfg(steps=4).to_dict(),
            "train": {**_cfg(steps=4).to_dict()["train"], "engine": "deepspeed", "zero_stage": 2},
        }
    )
    debug = Debug(inject_faults=(Fault("kill", 2, rank=1),))
    out = tmp_path / "run"
    with pytest.raises(JobFailed) as e:
        launch_training(Job(cfg, plan, str(out), evaluate=False, debug=debug))
    assert str(e.value) == (
        f"rank 1 was killed by SIGKILL; its output is in {out}/logs/rank-1.log; continue from "
        "the last checkpoint with: the same `lfdist train` command with --resume"
    )
    assert _job_processes(out) == []
