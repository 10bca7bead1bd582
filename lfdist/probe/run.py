"""run_probe: one forward-only pass over calibration data, statistics per latent space.

Optionally one backward pass (gradnorm=True) records per-block gradient norms for the
`gradnorm` strategy, so that `select` stays a pure function of the probe file.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lfdist.constants import TASKS
from lfdist.errors import UserError
from lfdist.model.blocks import find_blocks
from lfdist.model.info import hidden_size, model_info
from lfdist.probe.deviation import derive_curves
from lfdist.probe.hooks import LatentHooks, find_final_norm, logit_lens, target_positions
from lfdist.probe.result import ProbeResult
from lfdist.probe.stats import LENS_STRIDE, SKETCH_DIM, ProbeStats, sketch_matrix

log = logging.getLogger(__name__)
_LENS_ELEMENTS = 2**26  # logits computed in chunks of at most this many elements (256 MB fp32)


def _check_data(
    data: dict[str, torch.Tensor], task: str, num_labels: int | None
) -> dict[str, torch.Tensor]:
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; use lm or classify")
    if "input_ids" not in data:
        raise UserError("calibration data has no input_ids; tokenize it first")
    ids = data["input_ids"]
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise UserError(
            f"calibration data is empty or not [N, T] (input_ids shape {tuple(ids.shape)}); "
            "give at least one tokenized example"
        )
    mask = data.get("attention_mask", torch.ones_like(ids))
    labels = data.get("labels")
    if labels is None and task == "lm":  # next-token targets wherever the mask keeps a token
        labels = ids.masked_fill(mask == 0, -100)
    if labels is None:
        raise UserError("classification data has no labels; give one class id per example")
    if task == "classify":
        labels = labels.reshape(-1)
        if labels.shape[0] != ids.shape[0] or labels.min() < 0 or labels.max() >= num_labels:
            raise UserError(
                f"classification labels must be one id in 0..{num_labels - 1} per example; "
                "set num_labels to the number of classes"
            )
    elif labels.shape != ids.shape:
        raise UserError(
            f"lm labels shape {tuple(labels.shape)} differs from input_ids {tuple(ids.shape)}"
        )
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _batches(data: dict, n: int, batch_size: int, device) -> Iterator[tuple[int, dict]]:
    for start in range(0, n, batch_size):
        yield start, {k: v[start : start + batch_size].to(device) for k, v in data.items()}


def evenly_spaced(data: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The n calibration examples a probe reads: evenly spaced, not the first n, so data sorted
    by class or document stay represented (the first 256 articles of a topic-sorted corpus are
    one topic). The Ray probe shards exactly this pick."""
    n_total = int(data["input_ids"].shape[0])
    if n >= n_total:
        return data
    pick = torch.arange(n) * n_total // n
    return {k: v[pick] for k, v in data.items()}


def add_lens(stats: ProbeStats, lens, chunk: int, layer: int, h, y, ti) -> None:
    """Latent space `layer`'s logit-lens cross-entropy at the target positions (h, y, their
    time index ti): an interior space scores every LENS_STRIDE-th position, the output all."""
    if layer < stats.n_latent - 1:
        keep = ti % LENS_STRIDE == 0
        h, y = h[keep.to(h.device)], y[keep.to(y.device)]
    stats.ce_count[layer] += h.shape[0]
    for i in range(0, h.shape[0], chunk):
        logits = lens(h[i : i + chunk]).double()
        target = y[i : i + chunk].to(logits.device)
        stats.ce_sum[layer] += F.cross_entropy(logits, target, reduction="sum").cpu()


def _forward_pass(model, bmap, data, task, n, batch_size, offset, bar) -> ProbeStats:
    num_labels = model.config.num_labels if task == "classify" else 0
    stats = ProbeStats.empty(task, bmap.n_blocks + 1, hidden_size(model), num_labels, SKETCH_DIM)
    device = next(model.parameters()).device
    lens = logit_lens(model, bmap) if task == "lm" else None
    norm = find_final_norm(model, bmap) if task == "classify" else None
    proj = sketch_matrix(stats.hidden, stats.sketch_dim) if task == "classify" else None
    norm_device = next(norm.parameters(), torch.empty(0)).device if norm is not None else None
    vocab = model.get_output_embeddings().weight.shape[0] if task == "lm" else 1
    chunk = max(1, _LENS_ELEMENTS // vocab)
    batch_state: dict = {}

    def on_latent(layer: int, h: torch.Tensor) -> None:
        stats.add_latent(layer, h)
        y = batch_state["targets"]
        if task == "lm":
            add_lens(stats, lens, chunk, layer, h, y, batch_state["time_index"])
        else:
            stats.add_classes(layer, h, y)
            z = norm(h.to(norm_device)) if norm is not None else h  # the features the head reads
            z = z.double().cpu()  # a handful of rows per batch: project on the CPU
            batch_state["feats"].append(z @ proj if proj is not None else z)

    with LatentHooks(model, bmap, on_latent) as hooks:
        for start, batch in _batches(data, n, batch_size, device):
            bi, ti, y = target_positions(
                task, model, batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
            batch_state.update(targets=y, feats=[], time_index=ti)
            hooks.run(
                model,
                (bi, ti),
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
            )
            if task == "classify":
                index = offset + start + torch.arange(len(y))
                stats.add_sketch(torch.stack(batch_state["feats"], 1), index, y)
            stats.examples += len(batch["input_ids"])
            bar.update(len(batch["input_ids"]))
    return stats


class StageProgress:
    """One stage's progress as log lines whatever the terminal (tqdm draws only on a tty, and a
    probe on a shared machine can run for minutes): a line at the start, at most one every
    `every_s` seconds, and one at the end."""

    def __init__(self, stage: str, total: int, enabled: bool, bar=None, every_s: float = 30.0):
        self.stage, self.total, self.enabled, self.bar = stage, total, enabled, bar
        self.done, self.every_s, self.closed = 0, every_s, False
        self.periodic = enabled and (bar is None or bar.disable)  # a drawn bar says it already
        self.t0 = self.last = time.perf_counter()
        if enabled:
            log.info("probe %s: %d examples", stage, total)

    def update(self, k: int) -> None:
        self.done += k
        if self.bar is not None:
            self.bar.update(k)
        now = time.perf_counter()
        if self.periodic and now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            log.info(
                "probe %s: %d/%d examples, %.0f s", self.stage, self.done, self.total, now - self.t0
            )

    def close(self) -> None:
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            log.info(
                "probe %s: done, %d examples in %.1f s",
                self.stage,
                self.done,
                time.perf_counter() - self.t0,
            )


def _gradient_pass(
    model, bmap, data, n, batch_size, stats: ProbeStats, bar: StageProgress | None = None
) -> list[float]:
    """One backward per batch of the model's own loss; per-block sum of ||grad||^2.

    torch.autograd.grad returns the gradients instead of storing .grad, so the model is left
    exactly as it was (requires_grad flags are restored too).
    """
    blocks = bmap.blocks(model)
    params = [list(b.parameters()) for b in blocks]
    flat = [p for ps in params for p in ps]
    saved = [p.requires_grad for p in flat]
    stats.grad_sq_sum = torch.zeros(len(params), dtype=torch.float64)
    device = flat[0].device
    try:
        for p in flat:
            p.requires_grad_(True)
        with torch.enable_grad():
            for _, batch in _batches(data, n, batch_size, device):
                loss = model(**batch).loss
                grads = iter(torch.autograd.grad(loss, flat, allow_unused=True))
                for i, ps in enumerate(params):
                    sq = sum(
                        float(g.double().pow(2).sum())
                        for g in (next(grads) for _ in ps)
                        if g is not None
                    )
                    stats.grad_sq_sum[i] += sq
                stats.grad_batches += 1
                if bar is not None:
                    bar.update(len(batch["input_ids"]))
    finally:
        for p, flag in zip(flat, saved):
            p.requires_grad_(flag)
    with torch.no_grad():
        return [float(sum(p.double().pow(2).sum() for p in ps) ** 0.5) for ps in params]


def run_probe(
    model: nn.Module,
    data: dict[str, torch.Tensor],
    task: str,
    batch_size: int = 8,
    samples: int | None = 256,
    reduce: Callable[[ProbeStats], ProbeStats] | None = None,
    progress: bool = True,
    gradnorm: bool = False,
    data_fingerprint: str | None = None,
    example_offset: int = 0,
) -> ProbeResult:
    """Probe `model` on `samples` evenly spaced examples of `data` (all when None).

    `reduce` combines this rank's statistics with the other ranks' (e.g. an all-gather then
    `merge_all`); the probe never imports torch.distributed itself. `example_offset` is this
    shard's first global example index: the classifier deviation splits halves by it.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    info = model_info(model, task)
    data = _check_data(data, task, info["num_labels"])
    n_total = data["input_ids"].shape[0]
    n = n_total if samples is None else min(int(samples), n_total)
    if batch_size < 1 or n < 1:
        raise UserError(
            f"probe needs batch_size >= 1 and samples >= 1 (got {batch_size}, {samples})"
        )
    data = evenly_spaced(data, n)
    bmap = find_blocks(model)
    was_training = model.training
    model.eval()  # no dropout: the statistics must not depend on the RNG
    bar = StageProgress(
        "forward",
        n,
        progress,
        tqdm(total=n, desc="probe", unit="ex", disable=not progress or not sys.stderr.isatty()),
    )
    timings = {}
    try:
        with torch.no_grad():
            stats = _forward_pass(model, bmap, data, task, n, batch_size, example_offset, bar)
        timings["forward_s"] = time.perf_counter() - t0
        bar.close()
        if gradnorm:
            t1 = time.perf_counter()
            bar = StageProgress("gradnorm", n, progress)
            info["per_block_weight_norm"] = _gradient_pass(
                model, bmap, data, n, batch_size, stats, bar
            )
            bar.close()
            timings["gradnorm_s"] = time.perf_counter() - t1
    finally:
        if not bar.closed:  # an exception left this stage open: close it without "done"
            bar.enabled = False
            bar.close()
        model.train(was_training)
    if reduce is not None:
        t2 = time.perf_counter()
        stats = reduce(stats)
        timings["reduce_s"] = time.perf_counter() - t2
    data_info = {
        "fingerprint": data_fingerprint,
        "n_samples": stats.examples,
        "seq_len": int(data["input_ids"].shape[1]),
        "n_targets": stats.count,
    }
    curves = derive_curves(stats, info)
    timings["total_s"] = time.perf_counter() - t0
    return ProbeResult(task, stats, info, data_info, timings, curves)
