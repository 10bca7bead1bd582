"""Deterministic data feeding: step s always reads the same examples, so resume is exact.

The global batch (ranks x micro-batch x accumulation) is a slice of a seeded permutation of
the training set, re-drawn every epoch; rank r takes its contiguous part of that slice.
"""

from __future__ import annotations

import torch

from lfdist.errors import UserError


class StepFeeder:
    def __init__(
        self,
        data: dict[str, torch.Tensor],
        batch_size: int,
        grad_accum: int,
        world_size: int,
        rank: int,
        seed: int,
    ):
        self.data = data
        self.n = len(data["input_ids"])
        self.micro = batch_size
        self.accum = grad_accum
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.global_batch = batch_size * grad_accum * world_size
        if self.n < self.global_batch:
            raise UserError(
                f"the training data has {self.n} examples but one global batch needs "
                f"{self.global_batch} (ranks x train.batch_size x train.grad_accum); "
                "use more data or a smaller train.batch_size"
            )
        self.steps_per_epoch = self.n // self.global_batch
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int) -> torch.Tensor:
        """This rank's example indices for global step `step` (all micro-batches)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch + self.rank * self.micro * self.accum
        return self._permutation(epoch)[start : start + self.micro * self.accum]

    def micro_indices(self, step: int) -> list[torch.Tensor]:
        idx = self.indices(step)
        return [idx[i : i + self.micro] for i in range(0, len(idx), self.micro)]

    def micro_batches(self, step: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
        return [
            {k: v[idx].to(device) for k, v in self.data.items()} for idx in self.micro_indices(step)
        ]
