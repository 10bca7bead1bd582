"""Launch a training job: validate everything first (nothing is written on bad input), then
lock the run folder, write the job file and run torchrun or the deepspeed launcher under
supervision (signals forwarded, one line for however the job ended)."""

from __future__ import annotations

import os
import sys
from dataclasses import replace

from lfdist.config import RunConfig
from lfdist.errors import JobFailed, UserError
from lfdist.job import Job, raise_reported_error, read_metrics, read_reports, write_job
from lfdist.launch.commands import Nodes, deepspeed_command, shell_line, torchrun_command
from lfdist.launch.folder import check_run_folder, make_run_folder, open_run
from lfdist.launch.supervise import (
    dead_rank,
    kill_leftover_ranks,
    launcher_log,
    resume_command,
    supervise,
)


def validate(
    cfg: RunConfig,
    plan_path: str,
    out: str,
    resume: bool,
    overwrite: bool = False,
    world_size: int | None = None,
) -> None:
    """Every check a rank would fail on, done once up front in this process; writes nothing."""
    from lfdist.model.treatments import check_engine_supports
    from lfdist.plan import load_plan
    from lfdist.train.checkpoint import latest_checkpoint
    from lfdist.train.prepare import prepare

    plan = load_plan(plan_path)
    check_engine_supports(plan, cfg.train.engine)
    world_size = world_size or cfg.train.nproc
    checkpoint = latest_checkpoint(os.path.join(out, "checkpoints"))
    check_run_folder(out, resume, overwrite, checkpoint is not None)
    check_engine_config(cfg, world_size)
    from lfdist.train.tracking import check_trackers

    check_trackers(cfg.train.report_to)
    if cfg.train.cache_frozen_prefix and cfg.train.cache_spill_dir is not None:
        from lfdist.train.prefix_cache import check_spill_dir

        check_spill_dir(cfg.train.cache_spill_dir)
    if resume:
        check_resumable(checkpoint, cfg, world_size)
        from lfdist.train.resume import check_resume

        for change in check_resume(checkpoint, cfg.record(), plan):  # plan, settings, finished
            print(f"lfdist: resume applies {change}")
    # config.json + safetensors headers + tokenizing: the weights stay where they are.
    prepared = prepare(cfg)
    plan.check_model(prepared.source.fingerprint())
    prepared.source.check_weights()
    if not plan.trainable_blocks and all(v == "frozen" for v in plan.modules.values()):
        raise UserError("the plan trains nothing; pick a strategy or budget that trains a block")
    global_batch = cfg.train.nproc * cfg.train.batch_size * cfg.train.grad_accum
    n = len(prepared.train["input_ids"])
    if n < global_batch:
        raise UserError(
            f"the training data has {n} examples but one global batch needs {global_batch}; "
            "use more data or a smaller train.batch_size"
        )


def keep_checkpoint_settings(cfg: RunConfig, out: str, resume: bool) -> RunConfig:
    """On --resume, the settings the checkpoint keeps unless given again (resume.KEEP_UNLESS_GIVEN),
    said in one line each; a missing or unreadable checkpoint is left to validate() to refuse."""
    if not resume:
        return cfg
    from dataclasses import asdict

    from lfdist.config import TrainConfig, config_from_dict
    from lfdist.train.checkpoint import latest_checkpoint
    from lfdist.train.resume import kept_settings, read_state

    try:
        folder = latest_checkpoint(os.path.join(out, "checkpoints"))
        state = read_state(folder) if folder else {}
    except UserError:
        return cfg
    kept = kept_settings(state, cfg.to_dict(), {"train": asdict(TrainConfig())})
    if not kept:
        return cfg
    merged = cfg.to_dict()
    for key, value in kept.items():
        section, name = key.split(".", 1)
        merged[section][name] = value
        print(f"lfdist: resume keeps the checkpoint's {key}={value} (give {key}=N to change it)")
    return config_from_dict(merged)


def check_engine_config(cfg: RunConfig, world_size: int) -> None:
    """DeepSpeed config problems (missing, malformed, conflicting) before anything is written."""
    if cfg.train.engine != "deepspeed":
        return
    from lfdist.engines.deepspeed import fill_config, read_config

    fill_config(read_config(cfg.train), cfg.train, world_size, cfg.model.dtype)


def check_resumable(folder: str, cfg: RunConfig, world_size: int) -> None:
    """--resume on the world size and engine that wrote the checkpoint (its state.json)."""
    from lfdist.train.resume import check_writer, read_state

    check_writer(read_state(folder), folder, cfg.train.engine, world_size)


def build_command(cfg: RunConfig, job_path: str, nodes: Nodes, cuda: bool):
    tc = cfg.train
    if tc.engine == "deepspeed":
        return deepspeed_command(job_path, tc.nproc, nodes, cuda)
    return torchrun_command(job_path, tc.nproc, tc.engine, nodes, cuda)


def launch_training(
    job: Job,
    dry_run: bool = False,
    nodes: Nodes = Nodes(),
    validate_first: bool = True,
    overwrite: bool = False,
) -> dict | None:
    """Validate, lock job.out, write out/job.json, run the job; returns out/metrics.json.

    Bad input raises UserError before anything is written; a job that fails, dies or is
    stopped by a signal raises JobFailed with one line that says how, and how to resume.
    """
    import torch

    out = job.out
    cfg = keep_checkpoint_settings(job.config, out, job.resume)
    job = replace(job, config=cfg)
    cuda = torch.cuda.is_available()
    argv, env = build_command(cfg, os.path.join(out, "job.json"), nodes, cuda)
    world_size = cfg.train.nproc * nodes.nnodes
    if validate_first:
        validate(cfg, job.plan, out, job.resume, overwrite, world_size)
    if dry_run:  # the job file the command names, so the printed line runs as it is
        make_run_folder(out)
        write_job(job)
        print(f"wrote {os.path.join(out, 'job.json')}; the launch command:", file=sys.stderr)
        print(shell_line(argv, env))
        return None
    # Multi-node runs share --out: node 0 owns the folder (lock, --overwrite), every node's
    # launcher runs and watches its own ranks.
    with open_run(job, overwrite, owner=nodes.node_rank == 0) as lock_fd:
        keep = (lock_fd,) if lock_fd is not None else ()
        ended = supervise(argv, {**os.environ, **env}, out, keep, nodes.node_rank)
        kill_leftover_ranks(out)
    first = nodes.node_rank * cfg.train.nproc
    ranks = range(first, first + cfg.train.nproc)
    check_ended(out, ended.returncode, ended.signal, ranks, nodes.node_rank, cfg.train.steps)
    return read_metrics(out)


def _how_to_continue(out: str, steps: int | None, what: str) -> str:
    """--resume, unless the latest checkpoint is the run's last step (then there is nothing to
    resume, and the run can be exported as it is)."""
    from lfdist.train.resume import finished_at

    done = finished_at(out, steps) if steps else None
    if done is not None:
        return (
            f"its final checkpoint (step {done}) is saved, so the run is complete: export it with "
            f"`lfdist export --checkpoint {out}`"
        )
    return f"{what} with: {resume_command()}"


def check_ended(
    out: str,
    returncode: int,
    signum: int | None,
    ranks: range,
    node_rank: int = 0,
    steps: int | None = None,
) -> None:
    """Raise the one line that says how a job ended, if not well (`steps`: the run's, to tell a
    complete run from one to resume)."""
    from lfdist.job import signal_name

    reports = read_reports(out)
    if signum is not None and not reports and _wrote_metrics(out):
        return  # the signal came after the last step: the ranks finished (torchrun still fails)
    if signum is not None:
        stopped = [r for r in reports if r.kind == "stopped"]
        saved = f"; {stopped[0].message}" if stopped else ""
        then = _how_to_continue(out, steps, "continue")
        raise JobFailed(f"stopped by {signal_name(signum)}{saved}; {then}", exit_code=128 + signum)
    bad_input = [r for r in reports if r.kind == "user"]
    if bad_input:  # the cause a user can fix, whatever it made the other ranks do
        raise UserError(bad_input[0].message)
    died = dead_rank(out, ranks) if returncode != 0 else None
    if died is not None:  # before crash reports: the survivors crash on the broken collective
        rank, how = died
        raise JobFailed(
            f"rank {rank} {how}; its output is in {os.path.join(out, 'logs', f'rank-{rank}.log')}"
            f"; {_how_to_continue(out, steps, 'continue from the last checkpoint')}"
        )
    raise_reported_error(out)
    if returncode == 0:
        return
    raise JobFailed(
        f"the launcher exited with code {returncode} and no rank reported why; see "
        f"{launcher_log(out, node_rank)}"
    )


def _wrote_metrics(out: str) -> bool:
    """metrics.json written by this job (not left by the run a --resume continues)."""
    try:
        return os.path.getmtime(os.path.join(out, "metrics.json")) >= os.path.getmtime(
            os.path.join(out, "job.json")
        )
    except OSError:
        return False
