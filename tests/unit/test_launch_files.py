"""The launcher's side of a job, without starting one: the typed job file, the rank error
protocol, the run folder's rules and lock, validation that writes nothing, the one line for a
dead rank."""

import dataclasses
import json
import os
import signal

import pytest

from lfdist.config import config_from_dict
from lfdist.errors import JobFailed, UserError
from lfdist.job import (
    Debug,
    Fault,
    Job,
    raise_reported_error,
    read_job,
    read_reports,
    write_job,
    write_report,
)
from lfdist.launch.folder import check_run_folder, clear_results, run_lock
from lfdist.launch.supervise import dead_rank, descendants, resume_command


def _cfg(**train):
    return config_from_dict(
        {
            "model": {"spec": "tiny:llama"},
            "data": {"spec": "synthetic:lm:200", "seq_len": 32},
            "train": {"engine": "fsdp2", "nproc": 2, "steps": 3, "batch_size": 2, **train},
        }
    )


def test_job_file_round_trips_with_its_debug_section(tmp_path):
    debug = Debug(check_frozen=True, stop_after=3, inject_faults=(Fault("kill", 2, rank=1),))
    job = Job(_cfg(), "plan.yaml", str(tmp_path), resume=True, evaluate=False, debug=debug)
    write_job(job)
    back = read_job(str(tmp_path / "job.json"))
    assert back == dataclasses.replace(job, plan=os.path.abspath("plan.yaml"))  # for the ranks
    assert back.plan == os.path.abspath("plan.yaml") and back.out == str(tmp_path)
    raw = json.loads((tmp_path / "job.json").read_text())
    assert sorted(raw) == ["config", "debug", "evaluate", "out", "plan", "resume"]
    assert "zero_stage" not in raw["config"]["train"]  # an fsdp2 run has no ZeRO stage
    assert raw["debug"]["inject_faults"] == [{"kind": "kill", "step": 2, "rank": 1, "seconds": 0.0}]
    assert Job.from_dict({**raw, "debug": {}}).debug == Debug()


def test_writing_a_job_removes_a_stale_error_file(tmp_path):
    write_report(str(tmp_path), 0, "crash", "old")
    write_job(Job(_cfg(), "p.yaml", str(tmp_path)))
    assert not (tmp_path / "error.txt").exists()


def test_bad_input_on_one_rank_wins_over_the_crashes_it_caused(tmp_path):
    # Rank 1 refuses its input; rank 0 then crashes on the broken collective. Before, only
    # rank 0 wrote user errors, and the launcher printed "see the rank output above".
    out = str(tmp_path)
    write_report(out, 0, "crash", "RuntimeError: Connection closed by peer")
    write_report(out, 1, "user", "loss became nan at step 3;\nlower train.lr")
    assert [(r.rank, r.kind) for r in read_reports(out)] == [(0, "crash"), (1, "user")]
    with pytest.raises(UserError) as e:
        raise_reported_error(out)
    assert str(e.value) == "loss became nan at step 3; lower train.lr"


def test_a_crash_names_its_rank_and_log(tmp_path):
    out = str(tmp_path)
    write_report(out, 1, "crash", "ValueError: boom")
    with pytest.raises(JobFailed) as e:
        raise_reported_error(out)
    assert str(e.value) == (
        f"training failed on rank 1: ValueError: boom (traceback in {out}/logs/rank-1.log)"
    )


def test_no_report_raises_nothing(tmp_path):
    raise_reported_error(str(tmp_path))


def _touch(path, text=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_run_folder_with_user_files_is_refused_unless_overwrite(tmp_path):
    _touch(tmp_path / "notes.txt", "mine")
    _touch(tmp_path / "data.csv")
    with pytest.raises(UserError, match=r"not an lfdist training run \(data.csv, notes.txt\)"):
        check_run_folder(str(tmp_path), resume=False, overwrite=False, has_checkpoint=False)
    check_run_folder(str(tmp_path), resume=False, overwrite=True, has_checkpoint=False)


def test_finished_run_without_checkpoints_is_refused_unless_overwrite(tmp_path):
    _touch(tmp_path / "job.json", "{}")
    _touch(tmp_path / "metrics.json", "{}")
    with pytest.raises(UserError, match="finished run whose checkpoints/ is gone"):
        check_run_folder(str(tmp_path), resume=False, overwrite=False, has_checkpoint=False)
    check_run_folder(str(tmp_path), resume=False, overwrite=True, has_checkpoint=False)


def test_run_folder_rules(tmp_path):
    check_run_folder(str(tmp_path / "new"), False, False, False)  # absent: fine
    check_run_folder(str(tmp_path), False, False, False)  # empty: fine
    _touch(tmp_path / "job.json", "{}")  # a run that failed before its first checkpoint
    _touch(tmp_path / "logs/rank-0.log")
    check_run_folder(str(tmp_path), False, False, False)
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        check_run_folder(str(tmp_path), False, False, True)
    with pytest.raises(UserError, match="no checkpoint in"):
        check_run_folder(str(tmp_path), True, False, False)
    with pytest.raises(UserError, match="pass one of them"):
        check_run_folder(str(tmp_path), True, True, True)
    _touch(tmp_path / "file")
    with pytest.raises(UserError, match="is an existing file"):
        check_run_folder(str(tmp_path / "file"), False, False, False)


def test_overwrite_clears_results_and_keeps_user_files(tmp_path):
    for name in ("metrics.json", "error.txt", "checkpoints/latest", "logs/rank-0.log", "mine.txt"):
        _touch(tmp_path / name)
    clear_results(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["mine.txt"]


def test_second_lock_on_one_folder_is_refused(tmp_path):
    with run_lock(str(tmp_path)):
        with pytest.raises(UserError) as e:
            with run_lock(str(tmp_path)):
                pass
        assert str(e.value) == (
            f"another lfdist job (pid {os.getpid()}) is running in {str(tmp_path)!r}; wait for "
            "it to end or choose another --out"
        )
    with run_lock(str(tmp_path)):  # released with the first
        pass
    assert not (tmp_path / ".lock").exists()  # and its file removed


def test_lock_file_stays_while_a_rank_still_holds_the_job_descriptor(tmp_path):
    with run_lock(str(tmp_path)) as fd:
        rank_fd = os.dup(fd)  # what torchrun's ranks inherit: the same open file description
    try:
        assert (tmp_path / ".lock").exists()  # a rank of a killed launcher still runs
        with pytest.raises(UserError, match="another lfdist job"):
            with run_lock(str(tmp_path)):
                pass
    finally:
        os.close(rank_fd)
    with run_lock(str(tmp_path)):
        pass
    assert not (tmp_path / ".lock").exists()


def test_lock_taken_on_a_removed_file_is_taken_again(tmp_path, monkeypatch):
    import fcntl

    from lfdist.launch import folder

    path = tmp_path / ".lock"
    real = fcntl.flock
    calls = []

    def flock_after_removal(fd, op):
        # the previous job removes its lock file between our open and our flock
        if not calls and path.exists():
            os.unlink(path)
        calls.append(op)
        return real(fd, op)

    monkeypatch.setattr(folder.fcntl, "flock", flock_after_removal)
    path.write_text("")
    with run_lock(str(tmp_path)) as fd:
        assert os.fstat(fd).st_ino == os.stat(path).st_ino  # the lock guards the file in place
    assert len(calls) >= 2


@pytest.fixture
def plan_path(tmp_path):
    from lfdist.model.tiny import build_tiny
    from lfdist.plan import save_plan
    from tests.helpers import make_plan

    path = str(tmp_path / "plan.yaml")
    save_plan(make_plan(build_tiny("llama", "lm"), ["frozen"] * 5 + ["full"] * 3), path)
    return path


def _ds(tmp_path, content) -> str:
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


DS_PROBLEMS = {
    "missing": (None, "does not exist"),
    "malformed": ("{not json", "is not valid JSON"),
    "list": ([{"zero_optimization": {"stage": 2}}], "must be a JSON object"),
    "batch": ({"train_batch_size": 6}, "train_batch_size=6 does not match"),
    "stage": ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3 conflicts"),
    "optimizer": ({"optimizer": {"type": "Adam"}}, "has an 'optimizer' section"),
}


@pytest.mark.parametrize("problem", sorted(DS_PROBLEMS))
def test_deepspeed_config_problems_are_refused_before_anything_is_written(
    tmp_path, plan_path, problem
):
    from lfdist.launch.run import launch_training

    content, message = DS_PROBLEMS[problem]
    path = str(tmp_path / "absent.json") if content is None else _ds(tmp_path, content)
    cfg = _cfg(engine="deepspeed", zero_stage=2, deepspeed_config=path)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=message):
        launch_training(Job(cfg, plan_path, str(out)))
    assert not out.exists()


def _checkpoint(out, **state):
    _touch(out / "checkpoints/step-000002/state.json", json.dumps({"step": 2, **state}))
    _touch(out / "checkpoints/latest", "step-000002")
    _touch(out / "job.json", "{}")


@pytest.mark.parametrize(
    "train, message",
    [
        (
            {"engine": "deepspeed", "zero_stage": 2, "nproc": 4},
            "written by 2 ranks but this run has 4; deepspeed cannot reshard its checkpoint: "
            "resume with --nproc 2",
        ),
        (
            {"engine": "fsdp2"},
            "written by engine deepspeed but this run uses fsdp2; resume with --engine deepspeed",
        ),
    ],
)
def test_resume_on_another_world_size_or_engine_writes_nothing(tmp_path, plan_path, train, message):
    from lfdist.launch.run import launch_training

    out = tmp_path / "run"
    _checkpoint(out, world_size=2, engine="deepspeed")
    (out / "checkpoints/step-000002/plan.yaml").write_text(open(plan_path).read())
    before = sorted(str(p) for p in out.rglob("*"))
    with pytest.raises(UserError, match=message):
        launch_training(Job(_cfg(**train), plan_path, str(out), resume=True))
    assert sorted(str(p) for p in out.rglob("*")) == before  # no error.txt, no lock, no logs


def _ranks_started(out, n=2):
    for r in range(n):
        _touch(out / f"logs/rank-{r}.log", f"=== rank {r} pid {1000 + r}\n")


def test_dead_rank_is_the_one_its_monitor_saw_killed(tmp_path):
    # Rank 1 is SIGKILLed; rank 0 then crashes on the broken collective and reports first.
    _ranks_started(tmp_path)
    write_report(str(tmp_path), 0, "crash", "RuntimeError: Connection closed by peer")
    write_report(str(tmp_path), 1, "killed", "was killed by SIGKILL")
    assert dead_rank(str(tmp_path), range(2)) == (1, "was killed by SIGKILL")


def test_a_rank_that_left_no_report_is_the_dead_one(tmp_path):
    _ranks_started(tmp_path)
    write_report(str(tmp_path), 1, "crash", "RuntimeError: Connection closed by peer")
    assert dead_rank(str(tmp_path), range(2)) == (0, "ended without a report")


def test_no_dead_rank_when_every_rank_reported(tmp_path):
    _ranks_started(tmp_path)
    write_report(str(tmp_path), 0, "crash", "x")
    write_report(str(tmp_path), 1, "user", "y")
    assert dead_rank(str(tmp_path), range(2)) is None


def test_resume_command_repeats_the_users_command(monkeypatch):
    argv = ["lfdist", "train", "--plan", "my plan.yaml", "--out", "o", "--overwrite"]
    monkeypatch.setattr("sys.argv", argv)
    assert resume_command() == "lfdist train --plan 'my plan.yaml' --out o --resume"
    monkeypatch.setattr("sys.argv", ["lfdist", "train", "--out", "o", "--resume"])
    assert resume_command() == "lfdist train --out o --resume"
    monkeypatch.setattr("sys.argv", ["pytest"])
    assert resume_command() == "the same `lfdist train` command with --resume"


def test_descendants_walks_the_process_tree():
    import subprocess
    import sys
    import time

    child = subprocess.Popen(
        [sys.executable, "-c", "import subprocess; subprocess.run(['sleep', '30'])"]
    )
    try:
        for _ in range(200):  # until the child has started its own child
            below = descendants(child.pid)
            if below:
                break
            time.sleep(0.05)
        assert len(below) == 1  # the sleep, a grandchild of this process
        assert child.pid in descendants(os.getpid()) and below[0] in descendants(os.getpid())
    finally:
        for p in descendants(child.pid):
            os.kill(p, signal.SIGKILL)
        child.kill()
        child.wait()


def _cli_train(capsys, out, plan, *extra) -> tuple[int, str]:
    from lfdist.cli import main

    argv = ["train", "--model", "tiny:llama", "--data", "synthetic:lm:200", "--seq-len", "32"]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--plan", plan, "--out", str(out), *extra])
    return e.value.code, capsys.readouterr().err


def test_cli_refuses_a_folder_of_user_files_and_touches_nothing(tmp_path, plan_path, capsys):
    out = tmp_path / "mine"
    _touch(out / "thesis.tex", "chapter 1")
    code, err = _cli_train(capsys, out, plan_path)
    assert code == 2
    assert err == (
        f"lfdist: error: --out {str(out)!r} holds files that are not an lfdist training run "
        "(thesis.tex); choose an empty or new folder, or pass --overwrite to write into it anyway\n"
    )
    assert os.listdir(out) == ["thesis.tex"] and (out / "thesis.tex").read_text() == "chapter 1"
    code, err = _cli_train(capsys, out, plan_path, "--overwrite", "--resume")
    assert (code, err.splitlines()[-1]) == (
        2,
        "lfdist: error: --resume continues a run and --overwrite starts it over; pass one of them",
    )
    assert os.listdir(out) == ["thesis.tex"]


LAUNCHER = """
import os, signal, subprocess, sys, time
out = sys.argv[1]
def got(signum, _):
    open(os.path.join(out, f"{os.getpid()}.sig"), "w").write(str(signum))
signal.signal(signal.SIGTERM, got)
# Like torchrun: the "rank" in a session of its own, out of reach of a process-group signal.
rank = subprocess.Popen([sys.executable, "-c", sys.argv[2], out], start_new_session=True)
rank.wait()
print("launcher done")
"""
RANK = """
import os, signal, sys, time
out = sys.argv[1]
signal.signal(signal.SIGTERM, lambda s, f: (
    open(os.path.join(out, f"{os.getpid()}.sig"), "w").write(str(s)), sys.exit(0)))
open(os.path.join(out, "ready.tmp"), "w").write(str(os.getpid()))
os.replace(os.path.join(out, "ready.tmp"), os.path.join(out, "ready"))
time.sleep(60)
"""


def test_supervise_forwards_sigterm_to_ranks_in_their_own_sessions(tmp_path):
    import sys
    import threading
    import time

    from lfdist.launch.supervise import supervise

    def send_when_ready():
        for _ in range(400):
            if (tmp_path / "ready").exists():
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends to lfdist

    # Earlier tests in the same process (DeepSpeed, Ray) may have installed their own handler.
    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=send_when_ready, daemon=True).start()
    argv = [sys.executable, "-c", LAUNCHER, str(tmp_path), RANK]
    ended = supervise(argv, dict(os.environ), str(tmp_path), node_rank=1)
    assert ended.signal == signal.SIGTERM
    rank_pid = (tmp_path / "ready").read_text()
    assert (tmp_path / f"{rank_pid}.sig").read_text() == str(int(signal.SIGTERM))
    assert len(list(tmp_path.glob("*.sig"))) == 2  # the launcher got it too
    # Node 1's launcher output has a file of its own; node 0's rank 0 console is not copied.
    assert (tmp_path / "logs/launcher-node1.log").read_text() == "launcher done\n"
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_an_out_under_a_file_is_one_line(tmp_path):
    from lfdist.launch.folder import make_run_folder

    _touch(tmp_path / "file")
    with pytest.raises(UserError) as e:
        make_run_folder(str(tmp_path / "file" / "run"))
    assert str(e.value) == (
        f"cannot create --out {str(tmp_path / 'file' / 'run')!r} (Not a directory); choose a "
        "writable folder"
    )


def test_a_signal_is_one_line_with_the_checkpoint_and_exit_128_plus_its_number(tmp_path):
    from lfdist.launch.run import check_ended

    out = str(tmp_path)
    write_job(Job(_cfg(), "p.yaml", out))
    write_report(out, 0, "stopped", f"checkpoint after step 7 in {out}/checkpoints/step-000007")
    with pytest.raises(JobFailed) as e:
        check_ended(out, 1, signal.SIGINT, range(2))
    assert e.value.exit_code == 130
    assert str(e.value) == (
        f"stopped by SIGINT; checkpoint after step 7 in {out}/checkpoints/step-000007; "
        "continue with: the same `lfdist train` command with --resume"
    )


def test_a_signal_after_the_last_step_is_a_finished_run(tmp_path):
    from lfdist.launch.run import check_ended

    out = str(tmp_path)
    write_job(Job(_cfg(), "p.yaml", out))
    (tmp_path / "metrics.json").write_text("{}")  # written by the ranks after job.json
    check_ended(out, 1, signal.SIGTERM, range(2))  # torchrun fails on SIGTERM; the run did not
    os.utime(tmp_path / "metrics.json", (0, 0))  # a resumed run's old metrics do not count
    with pytest.raises(JobFailed, match="^stopped by SIGTERM; continue with"):
        check_ended(out, 1, signal.SIGTERM, range(2))
