"""Ray probe: calibration examples sharded across actors, statistics merged exactly.

The driver tokenizes the data once, picks the same evenly spaced examples as run_probe, and cuts
them into contiguous shards on batch boundaries, so every actor runs exactly the batches the
in-process probe runs; `merge_results` then only adds float64 sums (and concatenates the
classifier sketch by global example index). Each actor holds a model replica (`num_gpus=1` where
the cluster has GPUs, else CPU actors with a set thread count), or with `probe.stream_layers`
streams the blocks one at a time (lfdist.probe.stream). An actor that dies or fails is replaced and its
shard re-run, up to `max_attempts`; then a UserError names the shard.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

from lfdist.config import RunConfig
from lfdist.errors import UserError
from lfdist.probe import ProbeResult, merge_results

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first picked example (global index among the picked ones)
    stop: int


def shard_ranges(n: int, workers: int, batch_size: int) -> list[Shard]:
    """Contiguous shards of n examples cut on batch boundaries, as even as batches allow."""
    batches = -(-n // batch_size)
    parts = min(workers, batches)
    cuts = [min(n, (k * batches // parts) * batch_size) for k in range(parts + 1)]
    return [Shard(k, cuts[k], cuts[k + 1]) for k in range(parts)]


def probe_data(cfg: RunConfig) -> tuple[dict, dict, dict]:
    """(picked calibration tensors, data info, ModelSource) for a Ray probe: the data and
    model source `prepare` makes for every other path."""
    from lfdist.train.prepare import prepare

    prepared = prepare(cfg)
    train, info = prepared.train, prepared.data_info
    n_total = int(train["input_ids"].shape[0])
    if n_total == 0:
        raise UserError(
            f"the calibration data {cfg.data.spec!r} is empty; give data with at least one example"
        )
    from lfdist.probe.run import evenly_spaced  # run_probe's own pick, so shards cover it exactly

    train = evenly_spaced(train, min(cfg.probe.samples, n_total))
    return train, dict(info), prepared.source


def ray_probe(
    cfg: RunConfig,
    progress: bool = True,
    *,
    max_attempts: int = MAX_ATTEMPTS,
    inject_faults: dict[int, int] | None = None,
) -> ProbeResult:
    """Probe as cfg says on `cfg.probe.workers` Ray actors; equals the in-process probe.

    `inject_faults` (tests): {shard: k} makes the first k attempts of that shard's actor die
    mid-probe (os._exit), to exercise the retries.
    """
    from lfdist.orchestrate.cluster import ray_session
    from lfdist.probe.stream import check_stream

    check_stream(cfg.probe)
    t0 = time.perf_counter()
    data, info, model = probe_data(cfg)
    n = int(data["input_ids"].shape[0])
    shards = shard_ranges(n, cfg.probe.workers, cfg.probe.batch_size)
    opts = {
        "batch_size": cfg.probe.batch_size,
        "gradnorm": cfg.probe.gradnorm,
        "stream": bool(cfg.probe.stream_layers),  # Ray's actors stream only when asked
        "fingerprint": info.get("fingerprint"),
    }
    with ray_session(cfg.probe.ray_address, num_cpus=max(os.cpu_count() or 1, len(shards))) as res:
        outs = _run_shards(
            res, shards, data, model, opts, max_attempts, inject_faults or {}, progress
        )
    result = merge_results([r for r, _ in outs])
    result.data_info["shards"] = [
        {"index": s.index, "examples": [s.start, s.stop], **facts}
        for s, (_, facts) in zip(shards, outs)
    ]
    result.timings["wall_s"] = time.perf_counter() - t0
    return result


class ProbeActor:
    """One model replica probing one shard; the driver wraps it with ray.remote."""

    def __init__(self, source, threads: int, device: str):
        import torch

        torch.set_num_threads(threads)
        self.source, self.device = source, device  # lfdist.model.source.ModelSource

    def probe(self, data: dict, start: int, stop: int, opts: dict, fault: str | None):
        import ray

        t0 = time.perf_counter()
        shard = {k: v[start:stop] for k, v in data.items()}
        if opts["stream"]:
            result, facts = self._stream(shard, start, opts, fault)
        else:
            result, facts = self._replica(shard, start, opts, fault), {}
        node = ray.get_runtime_context().get_node_id()
        return result, {"node": node, "seconds": time.perf_counter() - t0, **facts}

    def _replica(self, shard: dict, start: int, opts: dict, fault: str | None) -> ProbeResult:
        from lfdist.model.blocks import find_blocks
        from lfdist.probe import run_probe

        model = self.source.load_whole().to(self.device)
        if fault == "exit":  # die inside the forward pass of the first batch
            blocks = find_blocks(model).blocks(model)
            blocks[len(blocks) // 2].register_forward_pre_hook(lambda *_: os._exit(1))
        return run_probe(
            model,
            shard,
            self.source.task,
            batch_size=opts["batch_size"],
            samples=None,
            progress=False,
            gradnorm=opts["gradnorm"],
            data_fingerprint=opts["fingerprint"],
            example_offset=start,
        )

    def _stream(self, shard: dict, start: int, opts: dict, fault: str | None):
        from lfdist.probe.stream import stream_probe

        def before_block(i: int) -> None:
            if fault == "exit" and i == 1:  # die after a block was loaded and run
                os._exit(1)

        return stream_probe(
            self.source,
            shard,
            batch_size=opts["batch_size"],
            data_fingerprint=opts["fingerprint"],
            example_offset=start,
            device=self.device,
            before_block=before_block,
        )


def _actor_class(res, threads: int):
    import ray

    resources = {"num_gpus": 1, "num_cpus": 1} if res.gpus >= 1 else {"num_cpus": threads}
    # SPREAD: one replica per node first, so a multi-node cluster shares the work.
    return ray.remote(
        max_restarts=0, max_task_retries=0, scheduling_strategy="SPREAD", **resources
    )(ProbeActor)


def _run_shards(res, shards, data, model, opts, max_attempts, faults, progress):
    import ray
    from tqdm.auto import tqdm

    from lfdist.orchestrate.cluster import threads_per_actor

    threads = threads_per_actor(res, len(shards))
    actor_cls = _actor_class(res, threads)
    data_ref = ray.put(data)
    device = "cuda" if res.gpus >= 1 else "cpu"
    attempts = dict.fromkeys(range(len(shards)), 0)
    running: dict = {}  # object ref -> (shard, actor)

    def submit(shard: Shard) -> None:
        attempts[shard.index] += 1
        fault = "exit" if faults.get(shard.index, 0) >= attempts[shard.index] else None
        actor = actor_cls.remote(model, threads, device)
        ref = actor.probe.remote(data_ref, shard.start, shard.stop, opts, fault)
        running[ref] = (shard, actor)

    for shard in shards:
        submit(shard)
    outs: dict[int, tuple] = {}
    bar = tqdm(
        total=shards[-1].stop,
        desc="probe (ray)",
        unit="ex",
        disable=not progress or not sys.stderr.isatty(),
    )
    try:
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            shard, actor = running.pop(ref)
            try:
                result, facts = ray.get(ref)
            except Exception as e:  # noqa: BLE001 — decide below: bad input stops, anything else retries
                ray.kill(actor, no_restart=True)
                _retry_or_raise(e, shard, attempts[shard.index], max_attempts)
                submit(shard)
                continue
            ray.kill(actor, no_restart=True)  # frees its CPUs/GPU for a queued shard
            outs[shard.index] = (result, {**facts, "attempts": attempts[shard.index]})
            bar.update(shard.stop - shard.start)
    finally:
        bar.close()
        for _, actor in running.values():
            ray.kill(actor, no_restart=True)
    return [outs[s.index] for s in shards]


def _retry_or_raise(error: Exception, shard: Shard, attempt: int, max_attempts: int) -> None:
    cause = getattr(error, "cause", None)
    if isinstance(cause, UserError):  # bad input fails the same way on every retry
        raise UserError(str(cause)) from None
    first = str(cause or error).strip().splitlines()
    reason = f"{type(cause or error).__name__}: {first[0] if first else ''}".strip()
    where = f"probe shard {shard.index} (examples {shard.start}..{shard.stop - 1})"
    if attempt >= max_attempts:
        raise UserError(
            f"{where} failed {attempt} times, last with {reason}; check the actors' logs under "
            "the Ray session folder, or give the actors more memory or fewer probe.samples"
        ) from None
    log.warning("%s lost on attempt %d (%s); retrying on a new actor", where, attempt, reason)
