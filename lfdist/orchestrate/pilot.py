"""The salf pilot fine-tunes (lfdist.probe.pilot) as parallel Ray tasks, one per depth.

The driver sizes the pilots to the budget exactly as the serial `run_pilots` does, from the
model's skeleton (no weights on the driver); each task loads its own replica of the pre-trained
model from the run's ModelSource and runs the same `run_depth` (the run's own training step
through lfdist.train.local), so the record is the serial one (same seeds, one thread each); the
base model's held-out score is one more task. Tasks whose worker dies are retried by Ray.
"""

from __future__ import annotations

import contextlib
import os

from lfdist.config import RunConfig
from lfdist.orchestrate.probe import MAX_ATTEMPTS


def _replica(source, threads: int):
    import torch

    torch.set_num_threads(threads)
    return source.load_whole().to("cuda" if torch.cuda.is_available() else "cpu")


def _pilot_task(source, train: dict, heldout: dict, tc, depth: int, lengths, threads: int):
    from lfdist.probe.pilot import run_depth

    return run_depth(_replica(source, threads), train, heldout, source.task, tc, depth, lengths)


def _base_task(source, heldout: dict, tc, threads: int):
    from lfdist.probe.pilot import score_base

    return score_base(_replica(source, threads), heldout, source.task, tc)


@contextlib.contextmanager
def _pilot_tasks(cfg: RunConfig, n_tasks: int):
    """(the pilot task and the base-score task as Ray remote functions, threads per task)
    inside a Ray session sized for n_tasks at once: a GPU each where there are GPUs, retried
    where a worker dies."""
    import ray

    from lfdist.orchestrate.cluster import ray_session, threads_per_actor

    cpus = max(os.cpu_count() or 1, n_tasks)
    with ray_session(cfg.probe.ray_address, num_cpus=cpus) as res:
        threads = threads_per_actor(res, n_tasks)
        gpu = {"num_gpus": 1} if res.gpus >= 1 else {}
        remote = ray.remote(
            num_cpus=threads, max_retries=MAX_ATTEMPTS - 1, scheduling_strategy="SPREAD", **gpu
        )
        yield remote(_pilot_task), remote(_base_task), threads


def ray_pilots(
    cfg: RunConfig,
    source,
    data: dict,
    *,
    depths: str = "auto",
    steps: int | None = None,
    budget: float | None = None,
    probe_examples: int = 0,
    heldout_samples: int | None = None,
    min_share: float | None = None,
) -> dict:
    """`lfdist.probe.pilot.run_pilots` with one Ray task per depth (a GPU each where there are
    GPUs), each on its own replica of `source` (lfdist.model.source.ModelSource); returns the
    same `curves["pilot"]` record."""
    import ray

    from lfdist.model.info import model_info
    from lfdist.probe.pilot import (
        HELDOUT_SAMPLES,
        PILOT_BUDGET,
        assemble_pilots,
        size_pilots,
        stderr_log,
    )

    tc, task = cfg.train, cfg.model.task
    sizing = (depths, steps, budget or PILOT_BUDGET, heldout_samples or HELDOUT_SAMPLES)
    info = model_info(source.skeleton(), task)  # shapes only: no weights on the driver
    plan, train, heldout, extra = size_pilots(
        info, data, task, tc, *sizing, probe_examples, min_share
    )
    if plan.get("skipped"):
        stderr_log(f"pilots: skipped, {plan['skipped']}")
        return {**plan, **extra, "seconds": [0.0]}
    stderr_log(f"pilots (Ray, one task per depth): {plan['budget_note']}")
    with _pilot_tasks(cfg, len(plan["depths"])) as (task_fn, base_fn, threads):
        train_ref, held_ref = ray.put(train), ray.put(heldout)
        base_ref = base_fn.remote(source, held_ref, tc, threads)
        refs = [
            task_fn.remote(source, train_ref, held_ref, tc, d, plan["lengths"], threads)
            for d in plan["depths"]
        ]
        results = sorted(ray.get(refs), key=lambda r: r["depth"])
        base, base_s = ray.get(base_ref)
    results[0]["seconds"] += base_s  # as run_pilots books its one baseline pass
    stderr_log(f"pilots: {len(results)} depths done")
    return assemble_pilots(results, plan, task, base, extra)


def ray_halving(
    cfg: RunConfig,
    source,
    data: dict,
    *,
    ks: list[int],
    keep: set[int],
    survivors,
    budget: float,
    steps: int | None = None,
    probe_examples: int = 0,
    heldout_samples: int | None = None,
    min_share: float | None = None,
) -> dict:
    """`lfdist.probe.halving.run_halving` with one Ray task per candidate in every round (as
    many at once as there are workers), each on its own replica; the same record."""
    import ray

    from lfdist.model.info import model_info
    from lfdist.probe.halving import run_rounds, size_halving
    from lfdist.probe.pilot import HELDOUT_SAMPLES, stderr_log

    tc, task = cfg.train, cfg.model.task
    info = model_info(source.skeleton(), task)  # shapes only: no weights on the driver
    sizing = (budget, steps, heldout_samples or HELDOUT_SAMPLES, probe_examples, min_share)
    plan, train, heldout = size_halving(info, data, task, tc, ks, keep, *sizing)
    if plan.get("skipped"):
        stderr_log(f"halving: skipped, {plan['skipped']}")
        return {**plan, "rounds": [], "seconds": [0.0]}
    stderr_log(f"halving (Ray, one task per candidate): {plan['budget_note']}")
    L = info["n_blocks"]
    with _pilot_tasks(cfg, len(plan["candidates"])) as (task_fn, base_fn, threads):
        train_ref, held_ref = ray.put(train), ray.put(heldout)
        base, base_s = ray.get(base_fn.remote(source, held_ref, tc, threads))

        def train_round(cands: list[int], n_steps: int) -> list[dict]:
            refs = [
                task_fn.remote(source, train_ref, held_ref, tc, L - k, [n_steps], threads)
                for k in cands
            ]
            return ray.get(refs)  # in the order of cands

        record = run_rounds(plan, task, train_round, survivors, base, stderr_log)
    record["seconds"][0] += base_s
    return record
