"""Training through Ray Train: `TorchTrainer` schedules the ranks, the rank code is lfdist's own.

Ray only schedules and exports the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and opens the process group (gloo on CPU, nccl on GPU); every worker then runs the
same `lfdist.launch.worker.run_job` -> `lfdist.train.recipe.run_training` as under torchrun or the
deepspeed launcher, so FSDP2, DeepSpeed and the rest behave the same. Validation, the run
folder's lock and the job, result and error files (lfdist.job) are those of
`lfdist.launch.run.launch_training`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import replace

from lfdist.config import RunConfig
from lfdist.errors import JobFailed, UserError
from lfdist.job import Job, raise_reported_error, read_metrics


def ray_train(job: Job, overwrite: bool = False) -> dict:
    """Train `job.plan` as job.config says on `train.nproc` Ray Train workers; returns
    metrics.json. Joins `probe.ray_address` / RAY_ADDRESS when given, else starts a local Ray
    for the run.
    """
    from lfdist.launch.folder import open_run
    from lfdist.launch.run import keep_checkpoint_settings, validate
    from lfdist.orchestrate.cluster import ray_session

    out = job.out
    cfg = keep_checkpoint_settings(job.config, out, job.resume)
    job = replace(job, config=cfg)
    validate(cfg, job.plan, out, job.resume, overwrite)  # nothing is written on bad input
    nproc = cfg.train.nproc
    failure = None
    with ray_session(cfg.probe.ray_address, num_cpus=max(os.cpu_count() or 1, nproc)) as res:
        use_gpu = res.gpus >= 1
        have = res.gpus if use_gpu else res.cpus
        if have < nproc:
            kind = "GPUs" if use_gpu else "CPUs"
            raise UserError(
                f"the Ray cluster has {have:g} {kind} but train.nproc={nproc} workers need "
                f"{nproc}; lower train.nproc or add nodes"
            )
        with open_run(job, overwrite):
            with _stop_requests(out) as received:
                try:
                    _trainer(cfg, job, use_gpu).fit()
                except Exception as e:  # noqa: BLE001 — the ranks' own reports say more, below
                    failure = e
    if received:  # the ranks stopped at a step boundary with a checkpoint, or had finished
        from lfdist.launch.run import check_ended

        check_ended(out, 0 if failure is None else 1, received[0], range(nproc), 0, cfg.train.steps)
    _raise_rank_error(out, failure)
    return read_metrics(out)


@contextlib.contextmanager
def _stop_requests(out: str):
    """SIGTERM/SIGINT to this process become a stop request the ranks read from out/ (they run
    in Ray worker threads, where no signal handler can be installed): every rank stops at the
    next step boundary with a checkpoint, as under torchrun. A second signal stops waiting."""
    import signal

    from lfdist.job import clear_stop_file, write_stop_file

    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)
        if len(received) > 1:
            raise KeyboardInterrupt
        write_stop_file(out, signum)

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        yield received
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        clear_stop_file(out)


def _trainer(cfg: RunConfig, job: Job, use_gpu: bool):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from lfdist.launch.commands import base_env

    tc = cfg.train
    # OMP_NUM_THREADS, LFDIST_ENGINE and, for DeepSpeed on CPU only, DS_ACCELERATOR=cpu: set in
    # the workers' environment before they start, as the torchrun/deepspeed builders do.
    env = base_env(tc.nproc, tc.engine, cuda=use_gpu)
    return TorchTrainer(
        _train_worker,
        train_loop_config={"job": job.to_dict(), "cwd": os.getcwd()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.nproc, use_gpu=use_gpu),
        run_config=RunConfig(
            name=f"ray-train-{time.strftime('%Y%m%d-%H%M%S')}",  # Ray Train's own run folder
            storage_path=os.path.join(job.out, "ray"),
            failure_config=FailureConfig(max_failures=0),  # lfdist resumes from its own checkpoints
            worker_runtime_env={"env_vars": env},
        ),
    )


def _train_worker(config: dict) -> None:
    """One Ray Train worker = one rank. Ray has opened the process group already."""
    import torch.distributed as dist

    from lfdist.launch.worker import report_failure, run_job

    job = Job.from_dict(config["job"])
    rank = int(os.environ.get("RANK", 0))
    if os.path.isdir(config["cwd"]):  # Ray Train moves workers to its own folder; relative data
        os.chdir(config["cwd"])  # and DeepSpeed config paths mean the driver's, as under torchrun
    try:
        run_job(job)
    except Exception as e:
        report_failure(job, rank, e)
        raise
    # The gloo exit rule (SPEC 8), as Ray Train needs it: end every rank together and close the
    # group here. No os._exit: Ray Train must see this function return; it then stops the worker
    # actors itself, so the interpreter-exit abort never runs.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()


def _raise_rank_error(out: str, failure: Exception | None) -> None:
    raise_reported_error(out)
    if failure is not None:
        first = str(failure).strip().splitlines()
        raise JobFailed(
            f"training under Ray Train failed: {type(failure).__name__}: "
            f"{first[0] if first else ''}"
        ) from failure
