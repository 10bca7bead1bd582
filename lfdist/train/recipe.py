"""The training recipe of one rank, read top to bottom: setup -> train -> finish.

setup loads the plan and data, builds the engine (which materializes only what this rank
holds), resumes and scores the base model; train runs the loop; finish saves, evaluates and
writes out/metrics.json (lfdist.train.run_metrics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from lfdist.config import RunConfig, TrainConfig
from lfdist.engines import shard_engine
from lfdist.engines.base import with_treatment_lrs
from lfdist.errors import UserError
from lfdist.job import Job, write_report
from lfdist.model.blocks import find_blocks
from lfdist.model.checkpointing import checkpoint_trainable_blocks
from lfdist.model.materialize import prepare as prepare_model
from lfdist.plan import Plan, load_plan
from lfdist.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lfdist.train.collective import gather_objects
from lfdist.train.evaluate import evaluate
from lfdist.train.feed import StepFeeder
from lfdist.train.loop import train_loop
from lfdist.train.measure import BackwardTracer, peak_memory_bytes
from lfdist.train.prepare import Prepared, prepare
from lfdist.train.redraw import LisaSchedule
from lfdist.train.resume import check_resume
from lfdist.train.run_metrics import digest, run_metrics, write_metrics
from lfdist.train.stops import step_boundary, stop_signal
from lfdist.train.tracking import Tracker


@dataclass(frozen=True)
class Added:
    """What the job adds to the model after the plan and before the engine shards it: the
    backward tracer, activation checkpointing and the frozen-prefix cache."""

    tracer: BackwardTracer
    checkpointed: list[int]
    cache: Any  # lfdist.train.prefix_cache's cache, or None


def add_before_sharding(model, plan: Plan, prepared: Prepared, cfg: RunConfig) -> Added:
    tc = cfg.train
    tracer = BackwardTracer(find_blocks(model).blocks(model))
    checkpointed = checkpoint_trainable_blocks(model) if tc.activation_checkpointing else []
    cache = _prefix_cache(model, plan, prepared, cfg) if tc.cache_frozen_prefix else None
    return Added(tracer, checkpointed, cache)


@dataclass
class Run:
    """One rank's run as setup built it."""

    job: Job
    world: Any
    cfg: RunConfig
    tc: TrainConfig  # cfg.train with the plan's treatment lrs
    plan: Plan
    prepared: Prepared
    source: Any  # lfdist.model.source.ModelSource
    applied: Any  # lfdist.model.apply.Applied: the plan's trainable and frozen counts
    added: Added
    redraw: LisaSchedule | None
    engine: Any
    build_s: float
    start: int = 0  # the first step (a resumed run's checkpoint step)
    eval_before: dict | None = None
    frozen_before: str | None = None

    @property
    def ckpt_root(self) -> str:
        return os.path.join(self.job.out, "checkpoints")


def run_training(job: Job, world) -> None:
    run = setup(job, world)
    result = train(run)
    finish(run, result)


def setup(job: Job, world) -> Run:
    cfg = job.config
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    if world.device.type == "cpu" and cfg.train.cpu_lean_malloc:
        _return_freed_memory()
    prepared = prepare(cfg)
    plan = load_plan(job.plan)
    # PEFT treatments' lrs from the plan (lr_scale) unless the config names them: engines read tc.
    tc = with_treatment_lrs(cfg.train, plan.options.get("lr_scale"))
    if plan.strategy == "lisa" and tc.cache_frozen_prefix:
        raise UserError(
            "--cache-frozen-prefix cannot run a lisa plan: its frozen prefix changes with every "
            "draw; drop the flag"
        )
    resume_from = latest_checkpoint(os.path.join(job.out, "checkpoints")) if job.resume else None
    if resume_from is not None:  # again here (the launcher checked and printed the changes)
        check_resume(resume_from, cfg.record(), plan)
    run = _build(job, world, cfg, tc, plan, prepared)
    engine, redraw = run.engine, run.redraw
    if world.is_main:
        print(f"{tc.engine}: model materialized and wrapped in {run.build_s:.1f} s", flush=True)
    torch.manual_seed(tc.seed)  # dropout draws start from the seed, whatever loading consumed
    if job.debug.check_frozen:
        run.frozen_before = digest(engine.full_frozen_state())
    if resume_from is not None:
        if redraw is not None:  # the checkpoint's optimizer holds the draw of its step
            redraw.at(engine, _checkpoint_step(resume_from))
        with _every_block(redraw, engine):
            run.start = load_checkpoint(resume_from, engine, world)["step"]
    if world.is_main:
        os.makedirs(run.ckpt_root, exist_ok=True)
    # The base model's quality on the same held-out set: the reference the run is judged by.
    if _evaluates(run) and run.start == 0 and tc.eval_before:
        run.eval_before = _evaluate(run)
    return run


def _build(job: Job, world, cfg: RunConfig, tc: TrainConfig, plan: Plan, prepared) -> Run:
    """The engine materializes the model from its source, only what this rank holds: the
    skeleton with the plan, what the job adds before sharding, then the engine's own layout."""
    source = dataclasses.replace(prepared.source, whole=job.debug.load_whole)
    t_build = time.perf_counter()
    unsharded = prepare_model(source, plan)  # on the meta device unless whole
    added = add_before_sharding(unsharded.model, plan, prepared, cfg)
    engine = shard_engine(tc.engine, unsharded, tc, world)
    redraw = LisaSchedule(plan) if plan.strategy == "lisa" else None
    build_s = time.perf_counter() - t_build
    applied = unsharded.applied
    return Run(job, world, cfg, tc, plan, prepared, source, applied, added, redraw, engine, build_s)


def train(run: Run) -> dict:
    """The loop from run.start to the last step (or a simulated preemption's step)."""
    tc, added = run.tc, run.added
    feeder = StepFeeder(
        run.prepared.train,
        tc.batch_size,
        tc.grad_accum,
        run.world.world_size,
        run.world.rank,
        tc.seed,
    )
    tracker = Tracker(run.job.out, tc.report_to, run.cfg.record(), run.world.is_main, run.start > 0)
    result = train_loop(
        run.engine,
        feeder,
        replace(tc, steps=_last_step(run)),
        run.world,
        run.start,
        lambda step: _save(run, step),
        added.tracer,
        before_micro=added.cache.select if added.cache else None,
        stop=step_boundary(run.job, run.world),
        redraw=run.redraw,
        tracker=tracker,
    )
    tracker.close()
    added.tracer.remove()
    return result


def finish(run: Run, result: dict) -> None:
    """Save (a stopped run always, a finished one as asked), evaluate, write metrics.json."""
    world, start = run.world, run.start
    done = start + len(result["losses"])
    stopped = done < _last_step(run)  # the loop ends early only where every rank agreed to stop
    if (stopped or run.tc.save_final) and not (stopped and done == start and start > 0):
        _save(run, done)
    if stopped and world.is_main:
        where = os.path.join(run.ckpt_root, f"step-{done:06d}")
        write_report(run.job.out, world.rank, "stopped", f"checkpoint after step {done} in {where}")
    ended = {
        "frozen_after": (
            digest(run.engine.full_frozen_state()) if run.job.debug.check_frozen else None
        ),
        "per_rank": gather_objects(
            {"rank": world.rank, **result["counts"], "memory": peak_memory_bytes(world.device)}
        ),
        "stopped": {"step": done, "signal": stop_signal(run.job.out)} if stopped else None,
        "eval": None,
    }
    if run.added.cache is not None:
        run.added.cache.off()
    if _evaluates(run) and not stopped:  # a stopped job ends as soon as it can
        ended["eval"] = _evaluate(run)
    if world.is_main:
        write_metrics(run.job.out, run_metrics(run, result, ended))


def _save(run: Run, step: int) -> None:
    extra = {
        "engine": run.tc.engine,
        "model": dataclasses.asdict(run.cfg.model),
        "num_labels": int(run.source.num_labels),
        "config": run.cfg.record(),  # what a --resume may not change (lfdist/train/resume.py)
    }
    with _every_block(run.redraw, run.engine):  # lisa: every block may have trained
        save_checkpoint(run.ckpt_root, step, run.engine, run.world, run.job.plan, extra)


def _last_step(run: Run) -> int:
    return min(run.tc.steps, run.job.debug.stop_after or run.tc.steps)  # a simulated preemption


def _evaluates(run: Run) -> bool:
    return bool(run.job.evaluate and len(run.prepared.heldout.get("input_ids", [])))


def _evaluate(run: Run) -> dict:
    p = run.prepared
    return evaluate(
        run.engine.model, p.heldout, run.cfg.model.task, run.tc.batch_size, run.world.device
    )


def _checkpoint_step(folder: str) -> int:
    with open(os.path.join(folder, "state.json")) as f:
        return int(json.load(f)["step"])


def _every_block(redraw, engine):
    return redraw.all_blocks_trainable(engine) if redraw is not None else contextlib.nullcontext()


def _return_freed_memory() -> None:
    """glibc raises its mmap threshold (up to 32 MiB) after the first large free, so FSDP's
    per-block all-gather buffers then come from the heap and stay resident once freed (about
    +1 GiB per rank on a 12-block 0.66B Llama, measured). A fixed 1 MiB threshold maps every
    large tensor on its own and returns it to the OS when freed; the fresh pages cost a step
    1.34x its time on a 25M Llama (measured), so it is an opt-in (train.cpu_lean_malloc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (glibc); elsewhere a harmless no-op
    except (OSError, AttributeError):
        pass


def _prefix_cache(model, plan, prepared, cfg):
    from lfdist.train.prefix_cache import install_prefix_cache

    if cfg.train.engine == "deepspeed" and cfg.train.zero_stage == 3:
        raise UserError(
            "--cache-frozen-prefix is not supported with ZeRO-3 (its parameter fetch "
            "follows the module trace); use ZeRO-1/2, FSDP2 or DDP"
        )
    n, seq = prepared.train["input_ids"].shape
    return install_prefix_cache(
        find_blocks(model).blocks(model),
        plan.boundary,
        n,
        seq,
        model.config.hidden_size,
        next(model.parameters()).dtype,
        int(cfg.train.cache_max_gib * 2**30),
        cfg.train.cache_spill_dir,
    )
