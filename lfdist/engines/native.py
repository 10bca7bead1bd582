"""The engine shared by DDP, FSDP2 and FSDP1: only the wrapping differs between them.

Checkpoints are sharded: torch.distributed.checkpoint (DCP) writes what each rank holds (an
FSDP shard; DDP's replicas once) and reshards on load, so one code path saves and restores
DDP, FSDP1 and FSDP2 alike, on this world size or another; frozen parameters are left out
(they come back from the base model). Layout and trust: lfdist/engines/shards.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from lfdist.engines.base import (
    clean_name,
    make_optimizer,
    make_scheduler,
    optimizer_state_counts,
    param_counts,
    trainable_parameters,
    treatment_of_parameters,
)
from lfdist.errors import UserError
from lfdist.precision import Precision


class NativeEngine:
    def __init__(self, name: str, model: nn.Module, cfg, world, precision: Precision):
        self.name = name
        self.model = model
        self.cfg = cfg
        self.world = world
        self.precision = precision
        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        # Fused AdamW reads `found_inf` (GradScaler's protocol) and skips the update on the
        # device: a bad step is then read one step late, with no host synchronisation.
        self.skips_bad_steps_on_device = bool(self.optimizer.defaults.get("fused"))
        # FSDP2 casts to the compute dtype in its all-gather (MixedPrecisionPolicy); the other
        # engines hold fp32 trainable weights next to low-precision frozen ones and autocast.
        autocast = precision.mixed and name != "fsdp2"
        self._autocast = (world.device.type, getattr(torch, precision.compute), autocast)
        self._micro = 0  # micro-steps since the last optimizer step

    def micro_step(self, batch, scale: float) -> torch.Tensor:
        self._micro += 1
        device_type, dtype, enabled = self._autocast
        # Gradients are reduced across ranks only on the step's last micro-batch; the others
        # accumulate locally (the reduction is linear, so one reduce of the sum is the same).
        with self._gradient_sync(self._micro >= self.cfg.grad_accum):
            with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                loss = self.model(**batch).loss
            (loss * scale).backward()
        return loss.detach()

    @contextmanager
    def _gradient_sync(self, sync: bool) -> Iterator[None]:
        if sync or not dist.is_initialized():
            yield
        elif isinstance(self.model, DistributedDataParallel) or self.name == "fsdp1":
            with self.model.no_sync():
                yield
        elif self.name == "fsdp2":
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            yield

    def optimizer_step(self, skip: torch.Tensor | None = None) -> torch.Tensor:
        """The update, unless `skip` or a non-finite gradient norm says the step is bad: then
        the weights and AdamW states stay as they were (checked on the device where AdamW is
        fused, else here). Returns the norm, for the loop to read when it reads the step."""
        self._micro = 0
        norm = self._clip_gradients()
        bad = ~torch.isfinite(norm)
        if skip is not None:
            bad = bad | skip
        if self.skips_bad_steps_on_device:
            self.optimizer.found_inf = bad.float()
            self.optimizer.step()
        elif not bool(bad):
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def drop_gradients(self) -> None:
        self._micro = 0
        self.optimizer.zero_grad(set_to_none=True)

    def _clip_gradients(self) -> torch.Tensor:
        """The global gradient norm (every rank gets the same value, on the device), clipping to
        train.max_grad_norm where it is set; inf as the bound only measures."""
        bound = self.cfg.max_grad_norm if self.cfg.max_grad_norm else float("inf")
        if self.name == "fsdp1":
            norm = self.model.clip_grad_norm_(bound)
        else:
            params = trainable_parameters(self.model)
            norm = torch.nn.utils.clip_grad_norm_(params, bound)  # foreach where the device has it
        full = getattr(norm, "full_tensor", None)  # FSDP2: a DTensor over the mesh
        return (full() if full is not None else norm).detach().float()

    def retrain(self, wanted: Callable[[str], bool]) -> list[str]:
        """Change the trainable set between steps (LISA): `wanted(name)` says whether the
        parameter of that original name trains from now on. Returns the names that changed.

        Parameters that stop training lose their gradients and optimizer state (LISA's memory
        accounting holds only the sampled blocks' states); those that start join the full
        fine-tuning group with fresh state. FSDP2 follows requires_grad at its next all-gather
        and reduce-scatters only the gradients that exist; DDP's reducer registers its hooks
        when it is built, so the wrapper is rebuilt around the same module (no weight
        broadcast: the ranks hold the same weights already).
        """
        changed = []
        for name, p in self.model.named_parameters():
            name = clean_name(name)
            on = bool(wanted(name))
            if on != p.requires_grad:
                changed.append(name)
                p.grad = None
                p.requires_grad_(on)
                if not on:
                    self.optimizer.state.pop(p, None)
        if not changed:
            return changed
        self._regroup()
        if isinstance(self.model, DistributedDataParallel):
            module, device_ids = self.model.module, self.model.device_ids
            self.model = None  # the old reducer and its autograd hooks go before the new one
            self.model = DistributedDataParallel(module, device_ids=device_ids, init_sync=False)
        return changed

    def _regroup(self) -> None:
        """Each optimizer group lists the parameters of its treatment that train now (the
        groups, their lrs and the scheduler stay as built)."""
        kinds = treatment_of_parameters(self.model)
        members: dict[str, list] = {g["treatment"]: [] for g in self.optimizer.param_groups}
        seen: set[int] = set()
        for name, p in self.model.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            kind = kinds[clean_name(name)]
            if kind not in members:
                raise UserError(
                    f"{clean_name(name)} would start training in a {kind} group the optimizer "
                    "was not built with; re-drawing changes only fully trained blocks"
                )
            members[kind].append(p)
        for group in self.optimizer.param_groups:
            group["params"] = members[group["treatment"]]

    def local_counts(self) -> dict[str, int]:
        counts = param_counts(self.model)
        return {**counts, **optimizer_state_counts(self.optimizer)}

    def _options(self, **kw) -> StateDictOptions:
        # Offloading to CPU what already lives on CPU crashes FSDP1's state-dict hooks.
        offload = self.world.device.type != "cpu"
        return StateDictOptions(
            full_state_dict=True, cpu_offload=offload, ignore_frozen_params=True, **kw
        )

    def full_trainable_state(self) -> dict[str, torch.Tensor]:
        """Full trainable weights on every rank (collective): for tests; checkpoints never gather."""
        state = get_model_state_dict(self.model, options=self._options())
        return {clean_name(k): v for k, v in state.items()}

    def full_frozen_state(self) -> dict[str, torch.Tensor]:
        """Full values of the frozen parameters (collective): what tests compare bit for bit."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=self._options().cpu_offload)
        state = {
            clean_name(k): v for k, v in get_model_state_dict(self.model, options=opts).items()
        }
        frozen = {clean_name(n) for n, p in self.model.named_parameters() if not p.requires_grad}
        return {k: v for k, v in state.items() if k in frozen}

    def comm_volume(self) -> dict | None:
        return None  # torch.distributed keeps no count of its collectives

    def trainable_shards(self) -> list[torch.Tensor]:
        """The trainable tensors this rank holds (its FSDP shards; DDP's full replicas)."""
        out = []
        for p in self.model.parameters():
            if p.requires_grad:
                to_local = getattr(p, "to_local", None)
                out.append(to_local() if to_local is not None else p)
        return out

    def _sharded(self) -> StateDictOptions:
        # Not full_state_dict: every rank keeps its own shards, nothing is gathered.
        return StateDictOptions(ignore_frozen_params=True)

    def save(self, folder: str) -> None:
        import json

        from lfdist.engines.shards import SCHEDULER, save_dcp

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._sharded())
        save_dcp({"model": model_sd, "optim": optim_sd}, folder)
        if self.world.is_main:
            with open(os.path.join(folder, SCHEDULER), "w") as f:
                json.dump(self.scheduler.state_dict(), f)

    def load(self, folder: str) -> None:
        import json

        from lfdist.engines.shards import SCHEDULER, load_dcp

        # This run's own (possibly differently sharded) state says what to read; DCP fills it.
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._sharded())
        state = {"model": model_sd, "optim": optim_sd}
        load_dcp(state, folder)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),  # frozen: base
        )
        with open(os.path.join(folder, SCHEDULER)) as f:
            self.scheduler.load_state_dict(json.load(f))
