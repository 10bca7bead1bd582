"""The training loop: one visible loop, the same for every engine."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from lfdist.errors import UserError
from lfdist.train.feed import StepFeeder


def _mean_across_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def train_loop(
    engine,
    feeder: StepFeeder,
    cfg,
    world,
    start_step: int,
    save: Callable[[int], None],
    tracer=None,
    log: Callable[[str], None] = print,
    before_micro: Callable | None = None,
    stop: Callable[[int], bool] | None = None,
) -> dict:
    """Runs steps start_step..cfg.steps-1. Returns per-step losses, times and first-step counts."""
    losses, times, counts = {}, [], {}
    engine.model.train()
    scale = 1.0 / cfg.grad_accum
    progress = _progress(cfg.steps, start_step, world)
    for step in range(start_step, cfg.steps):
        if stop is not None and stop(step):  # e.g. SIGTERM: every rank stops at this step
            break
        t0 = time.perf_counter()
        micro_losses = []
        for idx, batch in zip(feeder.micro_indices(step), feeder.micro_batches(step, world.device)):
            if before_micro is not None:
                before_micro(idx)  # e.g. tell the prefix cache which examples come next
            micro_losses.append(engine.micro_step(batch, scale))
        if step == start_step:
            counts["after_backward"] = engine.local_counts()
            if tracer is not None:
                counts["backward_blocks"] = sorted(tracer.reached)
                tracer.enabled = False
        engine.optimizer_step()
        if world.device.type == "cuda":
            torch.cuda.synchronize(world.device)
        times.append(time.perf_counter() - t0)
        loss = _mean_across_ranks(torch.stack(micro_losses).float().mean().item(), world.device)
        if not math.isfinite(loss):
            raise UserError(
                f"loss became {loss} at step {step}; the last good checkpoint is kept — "
                "lower train.lr or check the data"
            )
        losses[step] = loss
        if step == start_step:
            counts["after_step"] = engine.local_counts()
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")
        elif world.is_main and cfg.log_every and (step + 1) % cfg.log_every == 0:
            log(f"step {step + 1}/{cfg.steps} loss {loss:.4f} ({times[-1]:.2f}s)")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save(step + 1)
    if progress is not None:
        progress.close()
    return {"losses": losses, "step_times": times, "counts": counts}


def _progress(total: int, start: int, world):
    import sys

    if not world.is_main or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step")
