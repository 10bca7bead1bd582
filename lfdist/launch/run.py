"""Launch a training job: validate everything first (nothing is written on bad input), then
write the job file and run torchrun or the deepspeed launcher."""

from __future__ import annotations

import json
import os
import subprocess

from lfdist.config import RunConfig
from lfdist.errors import UserError
from lfdist.launch.commands import Nodes, deepspeed_command, shell_line, torchrun_command
from lfdist.launch.worker import raise_rank_error


def validate(cfg: RunConfig, plan_path: str, out: str, resume: bool) -> None:
    """Every check a rank would fail on, done once up front in this process."""
    from lfdist.model.blocks import fingerprint
    from lfdist.model.treatments import check_engine_supports
    from lfdist.plan import load_plan
    from lfdist.train.checkpoint import latest_checkpoint
    from lfdist.train.prepare import prepare

    plan = load_plan(plan_path)
    check_engine_supports(plan, cfg.train.engine)
    has_run = latest_checkpoint(os.path.join(out, "checkpoints")) is not None
    if has_run and not resume:
        raise UserError(
            f"output folder {out!r} already holds a run; pass --resume to continue it or choose another --out"
        )
    if resume and not has_run:
        raise UserError(f"--resume: no checkpoint in {out!r}; drop --resume to start a new run")
    prepared = prepare(cfg)
    plan.check_model(fingerprint(prepared.loaded.model))
    if not plan.trainable_blocks and all(v == "frozen" for v in plan.modules.values()):
        raise UserError("the plan trains nothing; pick a strategy or budget that trains a block")
    global_batch = cfg.train.nproc * cfg.train.batch_size * cfg.train.grad_accum
    n = len(prepared.train["input_ids"])
    if n < global_batch:
        raise UserError(
            f"the training data has {n} examples but one global batch needs {global_batch}; "
            "use more data or a smaller train.batch_size"
        )


def build_command(cfg: RunConfig, job_path: str, nodes: Nodes, cuda: bool):
    tc = cfg.train
    if tc.engine == "deepspeed":
        return deepspeed_command(job_path, tc.nproc, nodes, cuda)
    return torchrun_command(job_path, tc.nproc, tc.engine, nodes, cuda)


def launch_training(
    cfg: RunConfig,
    plan_path: str,
    out: str,
    resume: bool = False,
    dry_run: bool = False,
    nodes: Nodes = Nodes(),
    evaluate: bool = True,
    validate_first: bool = True,
    job_extra: dict | None = None,
) -> dict | None:
    import torch

    cuda = torch.cuda.is_available()
    job_path = os.path.join(out, "job.json")
    argv, env = build_command(cfg, job_path, nodes, cuda)
    if dry_run:
        print(shell_line(argv, env))
        return None
    if validate_first:
        validate(cfg, plan_path, out, resume)
    os.makedirs(out, exist_ok=True)
    error_file = os.path.join(out, "error.txt")
    if os.path.exists(error_file):
        os.remove(error_file)
    job = {
        "config": cfg.to_dict(),
        "plan": os.path.abspath(plan_path),
        "out": os.path.abspath(out),
        "resume": resume,
        "evaluate": evaluate,
        **(job_extra or {}),
    }
    with open(job_path, "w") as f:
        json.dump(job, f, indent=1)
    proc = subprocess.run(argv, env={**os.environ, **env})
    raise_rank_error(error_file)
    if proc.returncode != 0:
        raise RuntimeError(
            f"training failed with exit code {proc.returncode}; see the rank output above"
        )
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)
