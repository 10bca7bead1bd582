"""The user-facing operations behind the CLI: probe, select, train, run, eval, export.

Each takes typed config and paths, validates before writing, and returns what it made.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from dataclasses import replace

from lfdist.config import RunConfig
from lfdist.errors import UserError
from lfdist.job import Job
from lfdist.plan import Plan, atomic_write_text, save_plan

log = logging.getLogger(__name__)


def _refuse_overwrite(path: str, what: str) -> None:
    if os.path.exists(path):
        raise UserError(f"{what} {path!r} already exists; choose another --out or delete it first")


def _check_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(
            f"folder {parent!r} for {path!r} does not exist; create it or choose another --out"
        )
    _check_writable(parent, path)


def _check_writable(folder: str, path: str) -> None:
    # Trying is the only test that also sees read-only mounts and immutable folders (and root,
    # for whom os.access says yes to everything); an O_TMPFILE file leaves no name behind.
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        # ENOENT for a folder that exists: a pseudo file system such as /proc.
        why = "it takes no new files" if e.errno == errno.ENOENT else (e.strerror or str(e))
        raise UserError(
            f"cannot write in {folder!r} for {path!r} ({why}); choose another --out or make "
            "that folder writable"
        ) from None


def check_out_folder(out: str, flag: str = "--out") -> None:
    """An output folder: not an existing file, and its nearest existing ancestor writable."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{flag} {out!r} is an existing file, not a folder; give a folder path")
    folder = os.path.abspath(out)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {out!r} lies under the file {folder!r}; give a folder path")
    _check_writable(folder, out)


def check_inputs(cfg: RunConfig) -> None:
    """What the model's config alone can refuse, before any weight or data is loaded."""
    from lfdist.model.headers import read_index
    from lfdist.model.positions import check_seq_len
    from lfdist.model.specs import check_spec, resolve_folder

    folder = None if cfg.model.spec.startswith("tiny:") else resolve_folder(cfg.model.spec)
    if folder is None and not cfg.model.spec.startswith("tiny:"):
        check_spec(cfg.model.spec)  # a mistyped local path is one line here, not a hub request
    check_seq_len(cfg.model.spec, cfg.data.seq_len)
    if folder is not None:
        read_index(folder)  # empty, truncated or garbage safetensors: one line, not a traceback


def one_process_for_single(cfg: RunConfig) -> RunConfig:
    """`single` is one process without a process group: more would train unsynchronised copies."""
    if cfg.train.engine != "single" or cfg.train.nproc == 1:
        return cfg
    log.info("engine single runs 1 process (train.nproc=%d ignored)", cfg.train.nproc)
    return replace(cfg, train=replace(cfg.train, nproc=1))


def probe(cfg: RunConfig, out: str, overwrite: bool = False, progress: bool = True):
    """Forward-only probe of the model on calibration data; writes probe.json."""
    from lfdist.train.prepare import prepare

    if not overwrite:
        _refuse_overwrite(out, "probe file")
    _check_parent(out)
    check_inputs(cfg)
    prepared = None
    if cfg.probe.orchestrator == "ray":
        from lfdist.orchestrate.probe import ray_probe

        result = ray_probe(cfg, progress=progress)
    else:
        prepared = prepare(cfg)
        result = _local_probe(cfg, prepared, progress)
    if cfg.probe.pilots or cfg.probe.pilot_steps or cfg.probe.critical_steps:
        _pilots(cfg, result, prepared or prepare(cfg))
    if "pilot" not in result.curves:  # the probe's own share of the run, for salf's plan
        from lfdist.probe.pilot_budget import probe_only

        seq_len = int(result.data_info["seq_len"])
        n = int(result.data_info.get("n_samples") or 0)
        halving = result.curves.get("halving")
        why = {}
        if halving is not None:
            why["skipped"] = halving.get("skipped") or "the halving estimator ran instead"
        result.curves["pilot"] = probe_only(
            result.model_info, cfg.train, seq_len, n, cfg.probe.pilot_budget, **why
        )
    result.save(out)
    return result


def _local_probe(cfg: RunConfig, prepared, progress: bool):
    """In this process: the whole model, or one block at a time where it would not fit."""
    from lfdist.probe import run_probe
    from lfdist.probe.stream import streams

    if streams(cfg.probe, prepared.source):
        return _streamed_probe(cfg, prepared)
    return run_probe(
        prepared.loaded.model,
        prepared.train,
        cfg.model.task,
        batch_size=cfg.probe.batch_size,
        samples=cfg.probe.samples,
        progress=progress,
        gradnorm=cfg.probe.gradnorm,
        data_fingerprint=prepared.data_info.get("fingerprint"),
    )


def _streamed_probe(cfg: RunConfig, prepared):
    """The probe with one block resident at a time (lfdist.probe.stream): run_probe's numbers
    for models that do not fit this process whole."""
    from lfdist.probe.run import evenly_spaced
    from lfdist.probe.stream import stream_probe

    log.info("probe: streaming the model's blocks one at a time (probe.stream_layers)")
    result, memory = stream_probe(
        prepared.source,
        evenly_spaced(prepared.train, cfg.probe.samples),
        batch_size=cfg.probe.batch_size,
        data_fingerprint=prepared.data_info.get("fingerprint"),
    )
    result.data_info["streamed"] = memory
    return result


def _pilots(cfg: RunConfig, result, prepared) -> None:
    """Pilot fine-tunes (salf's `pilot` estimator, `critical`) through the run's own training
    step (lfdist.train.local), salf's sized to probe.pilot_budget of the run."""
    from lfdist.probe.pilot import attach, run_critical, run_pilots

    pc, tc = cfg.probe, cfg.train
    data, task = prepared.train, cfg.model.task
    if (pc.pilots or pc.pilot_steps) and pc.pilot_kind == "halving":
        attach(result, "halving", _halving(cfg, result, prepared))
    elif pc.pilots or pc.pilot_steps:
        sizing = dict(
            depths=pc.pilot_depths,
            steps=pc.pilot_steps or None,
            budget=pc.pilot_budget,
            probe_examples=int(result.data_info.get("n_samples") or 0),
            min_share=pc.pilot_min_share,
        )
        if pc.orchestrator == "ray":  # one Ray task per depth, the serial loop's numbers
            from lfdist.orchestrate.pilot import ray_pilots

            record = ray_pilots(cfg, prepared.source, data, **sizing)
        else:
            record = run_pilots(prepared.loaded.model, data, task, tc, **sizing)
        attach(result, "pilot", record)
    if pc.critical_steps:
        model = prepared.loaded.model
        attach(result, "critical", run_critical(model, data, task, tc, steps=pc.critical_steps))


def _halving(cfg: RunConfig, result, prepared) -> dict:
    """salf's halving rounds: candidates from the probe's trace, salf's rule for who continues."""
    from functools import partial

    from lfdist.probe.halving import run_halving
    from lfdist.select.salf import TOLERANCE, decide, trace_gain
    from lfdist.select.salf_halving import candidates, survivors

    pc, tc, task = cfg.probe, cfg.train, cfg.model.task
    L = int(result.model_info["n_blocks"])
    constant = [i for i in result.curves.get("constant_spaces", []) if i < L]
    gain, _ = trace_gain(list(result.deviation), constant)
    trace_pick = decide("target", gain, [1.0] * L, [True] * L, 0.02)  # salf's trace default
    ks = candidates(gain, trace_pick)
    rule = partial(survivors, task, run_steps=tc.steps, tolerance=TOLERANCE[task])
    sizing = dict(
        ks=ks,
        keep={0, min(trace_pick, max(0, L - 2))},
        survivors=rule,
        budget=pc.pilot_budget,
        steps=pc.pilot_steps or None,
        probe_examples=int(result.data_info.get("n_samples") or 0),
        min_share=pc.pilot_min_share,
    )
    if pc.orchestrator == "ray":  # one Ray task per candidate and round
        from lfdist.orchestrate.pilot import ray_halving

        return ray_halving(cfg, prepared.source, prepared.train, **sizing)
    return run_halving(prepared.loaded.model, prepared.train, task, tc, **sizing)


def select(
    probe_path: str, strategy: str, budget: dict, options: dict, out: str, overwrite: bool = False
) -> Plan:
    from lfdist.probe import load_probe
    from lfdist.select import select_plan

    if not overwrite:
        _refuse_overwrite(out, "plan file")
    _check_parent(out)
    plan = select_plan(load_probe(probe_path), strategy, budget, options)
    save_plan(plan, out)
    return plan


def train(job: Job, dry_run: bool = False, nodes=None, overwrite: bool = False) -> dict | None:
    """`lfdist train`: the job under torchrun/deepspeed, or Ray Train (train.launcher)."""
    from lfdist.launch.commands import Nodes
    from lfdist.launch.run import launch_training

    check_out_folder(job.out)
    check_inputs(job.config)
    job = replace(job, config=one_process_for_single(job.config))
    if job.config.train.launcher == "ray":
        from lfdist.orchestrate.train import ray_train

        if dry_run:
            raise UserError(
                "--dry-run prints torchrun/deepspeed commands; Ray Train has none to print"
            )
        return ray_train(job, overwrite=overwrite)
    return launch_training(job, dry_run=dry_run, nodes=nodes or Nodes(), overwrite=overwrite)


def evaluate_model(cfg: RunConfig) -> dict:
    from lfdist.probe.stream import stream_eval, streams
    from lfdist.train.evaluate import evaluate
    from lfdist.train.prepare import prepare

    check_inputs(cfg)
    prepared = prepare(cfg)
    # A model that would not fit whole is run one block at a time, as the probe is
    # (probe.stream_layers decides both; None: by the memory available).
    if streams(cfg.probe, prepared.source, whole_passes=False):
        scores, memory = stream_eval(
            prepared.source, prepared.heldout, batch_size=cfg.train.batch_size
        )
        scores["streamed"] = memory
    else:
        scores = evaluate(
            prepared.loaded.model, prepared.heldout, cfg.model.task, cfg.train.batch_size
        )
    # what was scored, so the JSON says it on its own
    return {"model": cfg.model.spec, "data": cfg.data.eval_spec or cfg.data.spec, **scores}


def run(
    cfg: RunConfig, compare_full: bool = False, resume: bool = False, overwrite: bool = False
) -> dict:
    """probe -> select -> train as configured, all under cfg.out."""
    check_out_folder(cfg.out, "out=")
    check_inputs(cfg)
    cfg = one_process_for_single(cfg)
    if cfg.probe.orchestrator == "ray" or cfg.train.launcher == "ray":
        from lfdist.orchestrate.cluster import ray_session

        # One Ray for the probe, the pilots and training (each start costs seconds).
        cpus = max(os.cpu_count() or 1, cfg.probe.workers, cfg.train.nproc)
        with ray_session(cfg.probe.ray_address, num_cpus=cpus):
            return _run(cfg, compare_full, resume, overwrite)
    return _run(cfg, compare_full, resume, overwrite)


def _run(cfg: RunConfig, compare_full: bool, resume: bool, overwrite: bool = False) -> dict:
    out = cfg.out
    if os.path.exists(os.path.join(out, "plan.yaml")) and not (resume or overwrite):
        raise UserError(
            f"output folder {out!r} already holds a run; pass --resume to continue it, "
            "--overwrite to start it over, or choose another out="
        )
    if overwrite:  # probe and select again: the plan follows the config
        for name in ("probe.json", "plan.yaml"):
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)
    probe_path, plan_path = os.path.join(out, "probe.json"), os.path.join(out, "plan.yaml")
    if not os.path.exists(plan_path):
        if cfg.select.strategy == "gradnorm":  # it ranks blocks by gradients: probe them too
            cfg = replace(cfg, probe=replace(cfg.probe, gradnorm=True))
        if cfg.select.strategy == "salf" and not cfg.probe.pilot_steps:
            cfg = replace(cfg, probe=replace(cfg.probe, pilots=True))  # sized to the budget
        if cfg.select.strategy == "critical" and not cfg.probe.critical_steps:
            cfg = replace(cfg, probe=replace(cfg.probe, critical_steps=50))  # the paper's pilot
        probe(cfg, probe_path, overwrite=True)
        select(
            probe_path,
            cfg.select.strategy,
            cfg.select.budget,
            _select_options(cfg),
            plan_path,
            overwrite=True,
        )
    if compare_full:
        log.info("training the plan (%s), then full fine-tuning to compare", plan_path)
    result = {
        "plan": plan_path,
        "train": train(
            Job(cfg, plan_path, os.path.join(out, "train"), resume=resume), overwrite=overwrite
        ),
    }
    if compare_full:
        full = train_full_reference(cfg, probe_path, out, overwrite)
        if full is None:  # the plan is full fine-tuning: a second run would repeat it
            result["full_same_as_plan"] = True
        else:
            result["full"] = full
    atomic_write_text(os.path.join(out, "summary.json"), json.dumps(result, indent=1, default=str))
    return result


def train_full_reference(
    cfg: RunConfig, probe_path: str, out: str, overwrite: bool = False
) -> dict:
    """Full fine-tuning on the same engine, steps and data: the baseline savings are measured
    against. None when the run's own plan already trains exactly what it would."""
    from lfdist.plan import load_plan

    full_plan = os.path.join(out, "plan-all.yaml")
    full = select(probe_path, "all", {}, {}, full_plan, overwrite=True)
    mine = load_plan(os.path.join(out, "plan.yaml"))
    if (mine.treatments, mine.modules) == (full.treatments, full.modules):
        return None
    log.info(
        "full fine-tuning for comparison (%s): every block, same engine, steps and data", full_plan
    )
    return train(Job(cfg, full_plan, os.path.join(out, "train-all")), overwrite=overwrite)


def _select_options(cfg: RunConfig) -> dict:
    # The cost model prices the plan for the engine and batch the run will use.
    costing = {
        "engine": cfg.train.engine,
        "zero_stage": cfg.train.zero_stage,
        "world_size": cfg.train.nproc,
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.data.seq_len,
        "dtype": cfg.model.dtype,
        "precision": cfg.train.precision,
    }
    if cfg.select.strategy == "salf":  # the pilots' cost is reported against this run's length
        costing["run_steps"] = cfg.train.steps
    return {**costing, **cfg.select.options}


def with_model_data(
    cfg: RunConfig,
    model: str | None,
    data: str | None,
    task: str | None,
    seq_len: int | None = None,
) -> RunConfig:
    m, d = cfg.model, cfg.data
    if model:
        m = replace(m, spec=model)
    if task:
        m = replace(m, task=task)
    if data:
        d = replace(d, spec=data)
    if seq_len is not None:  # --seq-len 0 is refused, not taken for "unset"
        d = replace(d, seq_len=seq_len)
    return replace(cfg, model=m, data=d)
