"""The training loop: one visible loop, the same for every engine.

A step is: re-draw the trainable set where the plan re-draws (LISA), forward + backward of each
micro-batch (the engine reduces gradients on the last one only), the loss checked on every rank
BEFORE the optimizer step, then the step. A bad step (non-finite loss or gradient norm) stops
the run with its weights untouched.

Checkpoints are written one step late: the state after s steps is saved during step s, once its
forward has shown a finite loss on every rank. An update that blows the weights up therefore never
reaches a checkpoint (with train.lr=1e30 the first update's weights give NaN at the next forward,
so the step-1 checkpoint is never written); the RNG saved is the one from before step s's forward,
so a resumed run draws what the straight run drew.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from lfdist.errors import UserError
from lfdist.train.checkpoint import rng_state, set_rng_state
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
    redraw=None,
    stop: Callable[[int], bool] | None = None,
) -> dict:
    """Runs steps start_step..cfg.steps-1. Returns per-step losses, times and first-step counts.

    stop: asked before each step (every rank must give the same answer); True ends the loop
    there, with the steps so far in the result.
    redraw: an object with `at(engine, step)` that changes the trainable set where a schedule
    says (lfdist.train.redraw.LisaSchedule); `trained` in the result lists, per step, the blocks
    it trained.
    """
    losses, times, counts, trained = {}, [], {}, {}
    engine.model.train()
    scale = 1.0 / cfg.grad_accum
    progress = _progress(cfg.steps, start_step, world)
    last_saved = start_step or None  # the checkpoint a bad step leaves the user with
    for step in range(start_step, cfg.steps):
        if stop is not None and stop(step):
            break
        t0 = time.perf_counter()
        if redraw is not None:
            trained[step] = redraw.at(engine, step)
        pending = bool(cfg.save_every) and step > start_step and step % cfg.save_every == 0
        rng = rng_state() if pending else None
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
        loss = _mean_across_ranks(torch.stack(micro_losses).float().mean().item(), world.device)
        if not math.isfinite(loss):
            raise UserError(
                f"loss became {loss} at step {step}, before its optimizer step; "
                f"{_kept(last_saved)} — lower train.lr or check the data"
            )
        save_s = 0.0
        if pending:
            t_save = time.perf_counter()
            _save_with_rng(save, step, rng)
            save_s = time.perf_counter() - t_save  # not part of the step's time
            last_saved = step
        try:
            engine.optimizer_step()
        except UserError as e:
            raise UserError(f"step {step}: {e}; {_kept(last_saved)}") from None
        if world.device.type == "cuda":
            torch.cuda.synchronize(world.device)
        times.append(time.perf_counter() - t0 - save_s)
        losses[step] = loss
        if step == start_step:
            counts["after_step"] = engine.local_counts()
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")
        elif world.is_main and cfg.log_every and (step + 1) % cfg.log_every == 0:
            log(f"step {step + 1}/{cfg.steps} loss {loss:.4f} ({times[-1]:.2f}s)")
    if progress is not None:
        progress.close()
    _check_weights_finite(engine, world, cfg.steps)
    out = {"losses": losses, "step_times": times, "counts": counts}
    if redraw is not None:
        out["trained_blocks"] = trained
    return out


def _kept(last_saved: int | None) -> str:
    """Which checkpoint the user can resume from after a bad step."""
    if last_saved is not None:
        return f"the last good checkpoint (step {last_saved}) is kept"
    return "no checkpoint passed the check, so none was written: start again without --resume"


def _save_with_rng(save: Callable[[int], None], step: int, rng: dict) -> None:
    # The checkpoint must carry the RNG from before this step's forward (what a resumed run
    # starts from), not the one after it.
    now = rng_state()
    set_rng_state(rng)
    try:
        save(step)
    finally:
        set_rng_state(now)


def _check_weights_finite(engine, world, step: int) -> None:
    """The final checkpoint follows the loop: refuse it if a trainable weight is not finite
    (cheap next to a step; every rank agrees, FSDP shards included)."""
    ok = all(
        bool(torch.isfinite(_local(p)).all()) for p in engine.model.parameters() if p.requires_grad
    )
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=world.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    if not ok:
        raise UserError(
            f"a trainable weight is not finite after step {step}; the final checkpoint is not "
            "written — lower train.lr or check the data"
        )


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return (to_local() if to_local is not None else t).detach()


def _progress(total: int, start: int, world):
    import sys

    if not world.is_main or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step")
