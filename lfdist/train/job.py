"""Wires one rank: model + plan + data + engine + loop + checkpoints + metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from lfdist.engines import build_engine
from lfdist.engines.base import optimizer_lrs, with_treatment_lrs
from lfdist.errors import UserError
from lfdist.job import Fault, Job, read_stop_file, signal_name, stop_requested, write_report
from lfdist.model.blocks import find_blocks
from lfdist.model.checkpointing import checkpoint_trainable_blocks
from lfdist.plan import atomic_write_text, load_plan
from lfdist.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lfdist.train.evaluate import evaluate
from lfdist.train.feed import StepFeeder
from lfdist.train.loop import train_loop
from lfdist.train.measure import BackwardTracer, peak_memory_bytes
from lfdist.train.prepare import prepare
from lfdist.train.redraw import LisaSchedule
from lfdist.train.resume import check_resume
from lfdist.train.tracking import Tracker


def _gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_training(job: Job, world) -> None:
    cfg = job.config
    tc = cfg.train
    out = job.out
    ckpt_root = os.path.join(out, "checkpoints")
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)

    if world.device.type == "cpu" and tc.cpu_lean_malloc:
        _return_freed_memory()
    prepared = prepare(cfg)
    plan = load_plan(job.plan)
    # PEFT treatments' lrs from the plan (lr_scale) unless the config names them: engines read tc.
    tc = with_treatment_lrs(tc, plan.options.get("lr_scale"))
    lisa = plan.strategy == "lisa"
    if lisa and tc.cache_frozen_prefix:
        raise UserError(
            "--cache-frozen-prefix cannot run a lisa plan: its frozen prefix changes with every "
            "draw; drop the flag"
        )
    resume_from = latest_checkpoint(ckpt_root) if job.resume else None
    if resume_from is not None:  # again here (the launcher checked and printed the changes)
        check_resume(resume_from, cfg.record(), plan)
    built = {}

    def setup(model, applied) -> None:
        # After the plan, before the engine shards: hooks and wrappers on the whole module tree.
        built["applied"] = applied
        built["tracer"] = BackwardTracer(find_blocks(model).blocks(model))
        act = checkpoint_trainable_blocks(model) if tc.activation_checkpointing else []
        built["checkpointed"] = act
        built["cache"] = (
            _prefix_cache(model, plan, prepared, cfg) if tc.cache_frozen_prefix else None
        )
        built["redraw"] = LisaSchedule(plan, model) if lisa else None

    # The engine materializes the model from its source: only what this rank holds.
    source = prepared.source.with_plan(plan, setup, whole=job.debug.load_whole)
    t_build = time.perf_counter()
    engine = build_engine(tc.engine, source, tc, world)
    build_s = time.perf_counter() - t_build
    if world.is_main:
        print(f"{tc.engine}: model materialized and wrapped in {build_s:.1f} s", flush=True)
    torch.manual_seed(tc.seed)  # dropout draws start from the seed, whatever loading consumed
    applied, tracer, cache = built["applied"], built["tracer"], built["cache"]
    checkpointed = built["checkpointed"]
    redraw = built["redraw"]
    frozen_before = _digest(engine.full_frozen_state()) if job.debug.check_frozen else None
    feeder = StepFeeder(
        prepared.train, tc.batch_size, tc.grad_accum, world.world_size, world.rank, tc.seed
    )

    start = 0
    if resume_from is not None:
        if redraw is not None:  # the checkpoint's optimizer holds the draw of its step
            redraw.at(engine, _checkpoint_step(resume_from))
        with _every_block(redraw, engine):
            start = load_checkpoint(resume_from, engine, world)["step"]
    if world.is_main:
        os.makedirs(ckpt_root, exist_ok=True)

    def save(step: int) -> None:
        extra = {
            "engine": tc.engine,
            "model": dataclasses.asdict(cfg.model),
            "num_labels": int(source.num_labels),
            "config": cfg.record(),  # what a --resume may not change (lfdist/train/resume.py)
        }
        with _every_block(redraw, engine):  # lisa: every block may have trained by now
            save_checkpoint(ckpt_root, step, engine, world, job.plan, extra)

    do_eval = job.evaluate and len(prepared.heldout.get("input_ids", []))
    # The base model's quality on the same held-out set: the reference the run is judged by.
    before = (
        evaluate(engine.model, prepared.heldout, cfg.model.task, tc.batch_size, world.device)
        if do_eval and start == 0 and tc.eval_before
        else None
    )
    last = min(tc.steps, job.debug.stop_after or tc.steps)  # a simulated preemption
    tracker = Tracker(out, tc.report_to, cfg.record(), world.is_main, resumed=start > 0)
    result = train_loop(
        engine,
        feeder,
        replace(tc, steps=last),
        world,
        start,
        save,
        tracer,
        before_micro=cache.select if cache else None,
        stop=_step_boundary(job, world),
        redraw=redraw,
        tracker=tracker,
    )
    tracker.close()
    tracer.remove()
    done = start + len(result["losses"])
    stopped = done < last  # the loop ends early only where every rank agreed to stop
    # A stopped job always saves (unless that checkpoint exists already); a finished one as asked.
    if (stopped or tc.save_final) and not (stopped and done == start and start > 0):
        save(done)
    if stopped and world.is_main:
        write_report(
            out,
            world.rank,
            "stopped",
            f"checkpoint after step {done} in {os.path.join(ckpt_root, f'step-{done:06d}')}",
        )
    do_eval = do_eval and not stopped  # a stopped job ends as soon as it can
    frozen_after = _digest(engine.full_frozen_state()) if job.debug.check_frozen else None
    memory = peak_memory_bytes(world.device)
    per_rank = _gather({"rank": world.rank, **result["counts"], "memory": memory})
    quality = None
    if cache is not None:
        cache.off()
    if do_eval:
        quality = evaluate(
            engine.model, prepared.heldout, cfg.model.task, tc.batch_size, world.device
        )
    if world.is_main:
        metrics = {
            "engine": tc.engine,
            "zero_stage": tc.zero_stage if tc.engine == "deepspeed" else None,
            "world_size": world.world_size,
            "device": str(world.device),
            # the dtypes the run held (bytes per parameter: predicted_run)
            "precision": dataclasses.asdict(engine.precision),
            # the cost model for this run as it started (engine, world, precision, batch),
            # next to the measured peak in per_rank[].memory
            "predicted_run": _predicted_run(cfg, tc, plan, prepared.source, world),
            "plan": {
                "strategy": plan.strategy,
                "treatments": plan.treatments,
                "modules": plan.modules,
                "boundary": plan.boundary,
                "predicted": plan.predicted,
            },
            "params": {"trainable": applied.trainable, "frozen": applied.frozen},
            "losses": {str(k): v for k, v in result["losses"].items()},
            "step_times": result["step_times"],
            "engine_build_seconds": build_s,
            "per_rank": per_rank,
            "data": prepared.data_info,
            "eval": quality,
            "eval_before": before,
            "resumed_from": start,
            "checkpointed_blocks": checkpointed,
            "prefix_cache": (
                {"hits": cache.hits, "misses": cache.misses, "spilled": cache.spilled}
                if cache
                else None
            ),
            "frozen_digest": {"before": frozen_before, "after": frozen_after},
            "comms": engine.comm_volume(),
            "lrs": optimizer_lrs(engine.optimizer),  # peak lr of each treatment's group
            "trained_blocks": (
                {str(k): v for k, v in result["trained_blocks"].items()} if redraw else None
            ),
            "stopped": {"step": done, "signal": _stop_signal(job.out)} if stopped else None,
        }
        _merge_metrics(os.path.join(out, "metrics.json"), metrics)


def _predicted_run(cfg, tc, plan, source, world) -> dict:
    from lfdist.cost import predict_plan
    from lfdist.model.meta_info import meta_model_info

    try:
        info = meta_model_info(source.spec, cfg.model.task, source.num_labels)
        return predict_plan(
            info,
            plan,
            engine=tc.engine,
            zero_stage=tc.zero_stage,
            world_size=world.world_size,
            dtype=cfg.model.dtype,
            precision=tc.precision,
            batch_size=tc.batch_size,
            seq_len=cfg.data.seq_len,
            activation_checkpointing=tc.activation_checkpointing,
        )
    except (UserError, KeyError, ValueError, OSError) as e:  # a model the cost model lacks
        return {"error": str(e).splitlines()[0]}


def _checkpoint_step(folder: str) -> int:
    with open(os.path.join(folder, "state.json")) as f:
        return int(json.load(f)["step"])


def _every_block(redraw, engine):
    return redraw.all_blocks_trainable(engine) if redraw is not None else contextlib.nullcontext()


def _step_boundary(job: Job, world):
    """Called at the start of each step: fires the faults a test injected into this rank and
    says whether this rank is asked to stop; the loop makes every rank agree (in the step's
    health all-reduce), so all stop at one step."""
    faults = [f for f in job.debug.inject_faults if f.rank in (None, world.rank)]

    def at(step: int) -> bool:
        for fault in faults:
            _fire(fault, step, world.rank)
        # The stop file (Ray Train) is read once, on rank 0; the all-reduce tells the others.
        return bool(stop_requested() or (world.is_main and read_stop_file(job.out)))

    return at


def _stop_signal(out: str) -> str:
    signum = stop_requested() or read_stop_file(out)
    return signal_name(signum) if signum else "a stop request on another rank"


def _fire(fault: Fault, step: int, rank: int) -> None:
    import signal
    import time

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


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _merge_metrics(path: str, metrics: dict) -> None:
    # A resumed run extends the losses of the run it continues.
    if metrics["resumed_from"] and os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        metrics["losses"] = {
            **{k: v for k, v in old.get("losses", {}).items() if int(k) < metrics["resumed_from"]},
            **metrics["losses"],
        }
    atomic_write_text(path, json.dumps(metrics, indent=1, default=str))
