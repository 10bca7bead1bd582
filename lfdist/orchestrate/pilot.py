"""The salf pilot fine-tunes (lfdist.probe.pilot) as parallel Ray tasks, one per depth.

Each task loads its own replica of the pre-trained model and runs the same `run_pilot` as the
serial `run_pilots`, so the gain curve is the same (same seeds, one thread each); tasks whose
worker dies are retried by Ray.
"""

from __future__ import annotations

import os

from lfdist.config import RunConfig
from lfdist.orchestrate.probe import MAX_ATTEMPTS, load_replica, model_spec


def _pilot_task(m: dict, train: dict, heldout: dict, depth: int, settings: dict, threads: int):
    """One depth on its own replica. Like run_pilots, the pre-trained held-out loss is measured
    apart from the pilot (each task measures the same number), so the per-depth FLOPs match."""
    import time

    import torch

    from lfdist.probe.pilot import _forward_flops, heldout_loss, run_pilot
    from lfdist.probe.run import model_info

    torch.set_num_threads(threads)
    model = load_replica(m, "cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    before = heldout_loss(model, heldout, m["task"], settings["batch_size"])
    baseline = {
        "seconds": time.perf_counter() - t0,
        "flops": _forward_flops(model_info(model, m["task"]), *heldout["input_ids"].shape),
    }
    result = run_pilot(model, train, heldout, m["task"], depth, loss_before=before, **settings)
    return result, baseline


def ray_pilots(
    cfg: RunConfig,
    data: dict,
    depths: list[int],
    *,
    steps: int,
    lr: float,
    seed: int,
    batch_size: int,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    heldout_samples: int | None = None,
    run_steps: int | None = None,
) -> dict:
    """`lfdist.probe.pilot.run_pilots` with one Ray task per depth (a GPU each where there are
    GPUs), each on its own replica; returns the same `curves["pilot"]` record."""
    import ray

    from lfdist.orchestrate.cluster import ray_session, threads_per_actor
    from lfdist.probe.pilot import HELDOUT_SAMPLES, assemble_pilots, split_calibration

    train, heldout = split_calibration(data, heldout_samples or HELDOUT_SAMPLES)
    m = model_spec(cfg)
    settings = dict(
        steps=steps,
        lr=lr,
        seed=seed,
        batch_size=batch_size,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
    )
    cpus = max(os.cpu_count() or 1, len(depths))
    with ray_session(cfg.probe.ray_address, num_cpus=cpus) as res:
        threads = threads_per_actor(res, len(depths))
        gpu = {"num_gpus": 1} if res.gpus >= 1 else {}
        task = ray.remote(
            num_cpus=threads, max_retries=MAX_ATTEMPTS - 1, scheduling_strategy="SPREAD", **gpu
        )(_pilot_task)
        train_ref, held_ref = ray.put(train), ray.put(heldout)
        refs = [task.remote(m, train_ref, held_ref, d, settings, threads) for d in depths]
        results, baselines = zip(*ray.get(refs))
    results = sorted(results, key=lambda r: r["depth"])
    results[0]["seconds"] += baselines[0]["seconds"]  # as run_pilots books its one baseline pass
    n_train, n_held = int(train["input_ids"].shape[0]), int(heldout["input_ids"].shape[0])
    seq_len = int(data["input_ids"].shape[1])
    return assemble_pilots(
        results,
        steps,
        lr,
        seed,
        batch_size,
        n_train,
        n_held,
        seq_len,
        run_steps,
        baselines[0]["flops"],
    )
