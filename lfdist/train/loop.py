"""The training loop: one visible loop, the same for every engine.

A step is: re-draw the trainable set where the plan re-draws (LISA), forward + backward of each
micro-batch (the engine reduces gradients on the last one only), one small all-reduce of the
step's health (loss, a non-finite flag, a stop request), then the optimizer step, which the
engine skips on the device when that flag or the gradient norm says the step is bad. A bad step
stops the run with its weights untouched.

No host synchronisation in a steady-state step: the health of step s is read on the host during
step s+1, once its forward and backward are queued, so the device never drains. The run stops
within one step of a bad step or a stop request (step s+1's gradients are dropped, nothing of it
reaches the weights). Engines that cannot skip an update on the device (DeepSpeed reads its
gradient norm on the host anyway, an optimizer without `found_inf` support), steps that write a
checkpoint, and the last step read their health at once, as before.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from lfdist.errors import UserError
from lfdist.train.checkpoint import rng_state, set_rng_state
from lfdist.train.collective import all_finite, all_ranks_agree
from lfdist.train.feed import StepFeeder

if TYPE_CHECKING:
    from lfdist.config import TrainConfig
    from lfdist.engines.base import Engine, World
    from lfdist.train.measure import BackwardTracer
    from lfdist.train.redraw import LisaSchedule
    from lfdist.train.tracking import Tracker


@dataclass
class _Health:
    """One step's health on the device: [loss summed over ranks, ranks with a non-finite loss,
    ranks asking to stop], and the gradient norm (None where the engine reports none)."""

    step: int
    values: torch.Tensor
    norm: torch.Tensor | None
    rng: dict  # the RNG from before this step's forward: what a stop here saves
    lrs: dict | None = None  # the learning rate of each treatment group this step used

    def read(self, world_size: int) -> tuple[float, bool, bool]:
        loss_sum, bad, stop = self.values.tolist()  # waits for this step only
        return loss_sum / world_size, bad > 0, stop > 0


def _health(step: int, losses: list, asked: bool, device, rng: dict) -> _Health:
    loss = torch.stack(losses).float().mean()
    values = torch.stack(
        [loss, (~torch.isfinite(loss)).float(), torch.tensor(float(asked), device=device)]
    )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)  # every rank reads the same sums: all agree on every decision
    return _Health(step, values, None, rng)


def train_loop(
    engine: Engine,
    feeder: StepFeeder,
    cfg: TrainConfig,
    world: World,
    start_step: int,
    save: Callable[[int], None],
    tracer: BackwardTracer | None = None,
    log: Callable[[str], None] = print,
    before_micro: Callable[[torch.Tensor], None] | None = None,
    redraw: LisaSchedule | None = None,
    stop: Callable[[int], bool] | None = None,
    tracker: Tracker | None = None,
) -> dict:
    """Runs steps start_step..cfg.steps-1. Returns per-step losses, times and first-step counts.

    stop: asked at the start of each step whether this rank wants to stop (a signal, a stop
    file); the loop makes every rank agree (in the step's health all-reduce) and ends at one
    step boundary, at most one step later, with the steps so far in the result.
    redraw: an object with `at(engine, step)` that changes the trainable set where a schedule
    says (lfdist.train.redraw.LisaSchedule); `trained` in the result lists, per step, the blocks
    it trained.
    tracker: a lfdist.train.tracking.Tracker that gets each logged step's record.
    """
    run = _Run(engine, cfg, world, start_step, save, log, tracker)
    engine.model.train()
    defer = bool(getattr(engine, "skips_bad_steps_on_device", False))
    scale = 1.0 / cfg.grad_accum
    for step in range(start_step, cfg.steps):
        run.started()
        asked = bool(stop(step)) if stop is not None else False
        if redraw is not None:
            run.trained[step] = redraw.at(engine, step)
        rng = rng_state()
        micro_losses, batches = _micro_steps(
            engine, feeder, step, world.device, before_micro, scale
        )
        if step == start_step:
            run.first_step_counts(tracer)
            run.tokens_per_step = sum(b["input_ids"].numel() for b in batches) * world.world_size
        health = _health(step, micro_losses, asked, world.device, rng)
        if run.settle_previous():  # read with this step's work queued behind it
            run.drop(health)
            break
        if run.update(health, rng, defer):
            break
    run.finish()
    _check_weights_finite(engine, world, run.done)
    out = {"losses": run.losses, "step_times": run.times(), "counts": run.counts}
    if redraw is not None:
        out["trained_blocks"] = run.trained
    return out


def _micro_steps(engine, feeder, step, device, before_micro, scale) -> tuple[list, list]:
    """Forward + backward of each micro-batch of `step` (the engine reduces gradients on the
    last one only); returns their losses (on the device) and the batches."""
    losses = []
    batches = feeder.micro_batches(step, device)
    for idx, batch in zip(feeder.micro_indices(step), batches):
        if before_micro is not None:
            before_micro(idx)  # e.g. tell the prefix cache which examples come next
        losses.append(engine.micro_step(batch, scale))
    return losses, batches


class _Run:
    """What the loop keeps between steps: the step still to be read, losses, times, logging."""

    def __init__(self, engine, cfg, world, start_step, save, log, tracker=None):
        self.engine, self.cfg, self.world, self.save, self.log = engine, cfg, world, save, log
        self.losses: dict[int, float] = {}
        self.counts: dict = {}
        self.trained: dict = {}
        self.previous: _Health | None = None
        self.start = start_step
        self.done = start_step  # steps whose update is in the weights
        self.last_saved = start_step or None  # the checkpoint a bad step leaves the user with
        self._starts: list[float] = []
        self._save_s: dict[int, float] = {}
        self._progress = _progress(cfg.steps, start_step, world)
        self.tracker = tracker
        self.tokens_per_step = 0  # global tokens per step, set at the first step

    def update(self, h: _Health, rng: dict, defer: bool) -> bool:
        """Step h's optimizer step (and its checkpoint where one is due); True when every rank
        agreed to stop before it, its gradients dropped."""
        cfg, step = self.cfg, h.step
        pending = bool(cfg.save_every) and step > self.start and step % cfg.save_every == 0
        # Read at once where the step writes a checkpoint, is the last, or the engine cannot
        # skip a bad update on the device; else one step late.
        deferred = defer and not pending and step < cfg.steps - 1
        if not deferred:
            if self.settle(h, before_update=True):
                self.drop(h)
                return True
            if pending:
                self.save_with_rng(step, rng)
        h.lrs = {g.get("treatment", "full"): g["lr"] for g in self.engine.optimizer.param_groups}
        h.norm = self.engine.optimizer_step(skip=h.values[1] > 0 if deferred else None)
        if step == self.start:
            self.counts["after_step"] = self.engine.local_counts()
        if deferred:
            self.previous = h
        else:
            self.settle_norm(h)
        return False

    def started(self) -> None:
        self._starts.append(time.perf_counter())

    def first_step_counts(self, tracer) -> None:
        self.counts["after_backward"] = self.engine.local_counts()
        if tracer is not None:
            self.counts["backward_blocks"] = sorted(tracer.reached)
            tracer.enabled = False

    def settle_previous(self) -> bool:
        """Reads the deferred step; True when every rank agreed to stop there."""
        previous, self.previous = self.previous, None
        if previous is None:
            return False
        stop = self.settle(previous, before_update=False)
        self.settle_norm(previous)
        return stop

    def settle(self, h: _Health, before_update: bool) -> bool:
        """Checks one step's loss (raising on a non-finite one) and records it; True when a
        rank asked to stop. `before_update`: read before the step's optimizer step, so a stop
        there drops the step instead of recording it."""
        loss, bad, stop = h.read(self.world.world_size)
        if bad or not math.isfinite(loss):
            raise UserError(
                f"loss became {loss} at step {h.step}, before its optimizer step; "
                f"{_kept(self.last_saved)} — lower train.lr or check the data"
            )
        if stop and before_update:
            return True
        self.losses[h.step] = loss
        return stop

    def settle_norm(self, h: _Health) -> None:
        """A non-finite gradient norm: the engine skipped the update; the run stops here."""
        norm = None if h.norm is None else float(h.norm)
        if norm is not None and not math.isfinite(norm):
            raise UserError(
                f"step {h.step}: the gradient norm became {norm} before the optimizer step "
                "(weights not updated); lower train.lr, keep train.max_grad_norm on, or check "
                f"the data; {_kept(self.last_saved)}"
            )
        self.done = h.step + 1
        self._logged(h.step, norm, h.lrs)

    def drop(self, h: _Health) -> None:
        """A stop agreed after step h's backward: its gradients go, the RNG is the one from
        before its forward (what the checkpoint of the steps done must carry)."""
        self.engine.drop_gradients()
        set_rng_state(h.rng)

    def save_with_rng(self, step: int, rng: dict) -> None:
        # The checkpoint must carry the RNG from before this step's forward (what a resumed run
        # starts from), not the one after it.
        t = time.perf_counter()
        now = rng_state()
        set_rng_state(rng)
        try:
            self.save(step)
        finally:
            set_rng_state(now)
        self.last_saved = step
        self._save_s[step] = time.perf_counter() - t  # not part of the step's time

    def _logged(self, step: int, norm: float | None, lrs: dict) -> None:
        loss = self.losses[step]
        every = self.cfg.log_every
        if self._progress is not None:
            self._progress.update(1)
            self._progress.set_postfix(loss=f"{loss:.4f}")
        elif self.world.is_main and every and (step + 1) % every == 0:
            self.log(f"step {step + 1}/{self.cfg.steps} loss {loss:.4f}")
        if self.tracker is not None and self.world.is_main and (step + 1) % max(1, every) == 0:
            self.tracker.log(step + 1, self._record(step, loss, norm, lrs))

    def _record(self, step: int, loss: float, norm: float | None, lrs: dict) -> dict:
        """What a tracker gets for one step (read on the host only at the log interval)."""
        from lfdist.train.measure import peak_memory_bytes

        seconds = self._seconds(step)
        peak = next(iter(peak_memory_bytes(self.world.device).values()))
        return {
            "loss": loss,
            "lr": lrs,  # what this step's update used
            "grad_norm": norm,
            "step_time_s": seconds,
            "tokens_per_s": self.tokens_per_step / seconds if seconds > 0 else None,
            "peak_memory_gib": peak / 2**30,
        }

    def finish(self) -> None:
        if self.previous is not None:
            self.settle_previous()
        if self.world.device.type == "cuda":
            torch.cuda.synchronize(self.world.device)
        self._starts.append(time.perf_counter())
        if self._progress is not None:
            self._progress.close()

    def times(self) -> list[float]:
        return [self._seconds(step) for step in sorted(self.losses)]

    def _seconds(self, step: int) -> float:
        """A recorded step's time: from its start to the next step's start (the device is at
        most one step behind the host; now, for a step whose successor has not started), less
        any checkpoint written during it."""
        j = step - min(self.losses)
        end = self._starts[j + 1] if j + 1 < len(self._starts) else time.perf_counter()
        return end - self._starts[j] - self._save_s.get(step, 0.0)


def _kept(last_saved: int | None) -> str:
    """Which checkpoint the user can resume from after a bad step."""
    if last_saved is not None:
        return f"the last good checkpoint (step {last_saved}) is kept"
    return "no checkpoint passed the check, so none was written: start again without --resume"


def _check_weights_finite(engine, world, step: int) -> None:
    """The final checkpoint follows the loop: refuse it if a trainable weight is not finite
    (cheap next to a step; every rank agrees, FSDP shards included)."""
    trainable = (p for p in engine.model.parameters() if p.requires_grad)
    if not all_ranks_agree(all_finite(trainable)):
        raise UserError(
            f"a trainable weight is not finite after step {step}; the final checkpoint is not "
            "written — lower train.lr or check the data"
        )


def _progress(total: int, start: int, world):
    import sys

    if not world.is_main or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step")
