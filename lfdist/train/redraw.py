"""LISA's re-drawing of the trainable blocks during training (SPEC 2.4; Pan et al. 2024).

Every `period` steps the loop asks `LisaSchedule.at(engine, step)` for the blocks that train;
the draw is `lfdist.lisa_draw.lisa_blocks`, a pure function of (L, n, period, seed, step), so
every rank and every resumed run draws the same blocks with no communication. Modules outside
the blocks (final norm, head) keep the plan's treatment throughout, as in the paper (it always
trains the embedding and head layers; lfdist keeps the embeddings frozen by default).

Optimizer state: the engine drops the state of blocks that stop training and starts the drawn
ones fresh. The paper's memory claim (the footprint of training only gamma blocks) holds only if
the states of unsampled blocks are not kept, and re-drawn blocks then start from zero moments,
as a freshly built optimizer over the sampled layers would.

Checkpoints hold every block's weights (any block may have trained by then), so export and
resume never lose an earlier period's updates: `all_blocks_trainable` marks them all trainable
while the engine writes its state, then puts the draw back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from lfdist.engines.base import clean_name
from lfdist.errors import UserError
from lfdist.lisa_draw import lisa_blocks
from lfdist.model.blocks import BlockMap
from lfdist.plan import Plan


class LisaSchedule:
    def __init__(self, plan: Plan):
        opts = plan.options
        missing = [k for k in ("n", "period", "seed") if not isinstance(opts.get(k), int)]
        if missing:
            raise UserError(
                f"lisa plan has no integer option {missing[0]!r}; write it with `lfdist select "
                "--strategy lisa`"
            )
        self.n, self.period, self.seed = opts["n"], opts["period"], opts["seed"]
        self.n_blocks = len(plan.blocks)
        # the plan's block names are the original (unwrapped) parameter names' prefixes
        self.bmap = BlockMap(plan.block_path, self.n_blocks)

    def blocks_at(self, step: int) -> list[int]:
        return lisa_blocks(self.n_blocks, self.n, self.period, self.seed, step)

    def _wanted(self, drawn: set[int]):
        def wanted(name: str, current: bool) -> bool:
            i = self.bmap.block_of(name)
            return current if i is None else i in drawn

        return wanted

    def at(self, engine, step: int) -> list[int]:
        """Make the blocks drawn for `step` the trainable ones; returns them."""
        drawn = self.blocks_at(step)
        wanted = self._wanted(set(drawn))
        current = {clean_name(n): p.requires_grad for n, p in engine.model.named_parameters()}
        engine.retrain(lambda name: wanted(name, current[name]))
        return drawn

    @contextmanager
    def all_blocks_trainable(self, engine) -> Iterator[None]:
        """While saving: every block counts as trained, so its weights are written."""
        flips = [
            p
            for n, p in engine.model.named_parameters()
            if not p.requires_grad and self.bmap.block_of(clean_name(n)) is not None
        ]
        for p in flips:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in flips:
                p.requires_grad_(False)
