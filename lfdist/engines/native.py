"""The engine shared by DDP, FSDP2 and FSDP1: only the wrapping differs between them.

Checkpoints use torch.distributed.checkpoint's state-dict API with full (gathered) state
dicts, so one code path saves and restores DDP, FSDP1 and FSDP2 alike; frozen parameters are
left out (they come back from the base model).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from lfdist.engines.base import (
    clean_name,
    make_optimizer,
    make_scheduler,
    optimizer_state_counts,
    param_counts,
    trainable_parameters,
)


class NativeEngine:
    def __init__(self, name: str, model: nn.Module, cfg, world):
        self.name = name
        self.model = model
        self.cfg = cfg
        self.world = world
        self.optimizer = make_optimizer(trainable_parameters(model), cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)

    def micro_step(self, batch, scale: float) -> torch.Tensor:
        loss = self.model(**batch).loss
        (loss * scale).backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
            params = trainable_parameters(self.model)
            if self.name == "fsdp1":
                self.model.clip_grad_norm_(self.cfg.max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm, foreach=False)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

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

    def save(self, folder: str) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        if self.world.is_main:
            torch.save(
                {
                    "model": model_sd,
                    "optimizer": optim_sd,
                    "scheduler": self.scheduler.state_dict(),
                },
                os.path.join(folder, "engine.pt"),
            )
        if dist.is_initialized():
            dist.barrier()  # the file is complete before any rank may read it

    def load(self, folder: str) -> None:
        # Every rank reads the gathered file; set_state_dict reshards it for FSDP.
        blob = torch.load(os.path.join(folder, "engine.pt"), map_location="cpu", weights_only=False)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=blob["model"],
            optim_state_dict=blob["optimizer"],
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
        self.scheduler.load_state_dict(blob["scheduler"])
        if dist.is_initialized():
            dist.barrier()
