"""What every strategy sees (Context) and returns (Choice).

A strategy is a function `fn(ctx, **options) -> Choice` registered by name; its keyword
parameters are its options (their defaults are the defaults, any other key is an error).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lfdist.cost import predict
from lfdist.errors import UserError
from lfdist.probe.result import ProbeResult


@dataclass(frozen=True)
class Choice:
    treatments: list[str]  # per block
    order: list[int]  # the trainable blocks, most preferred first: a budget trims from the end
    scores: dict[str, Any] = field(default_factory=dict)  # curves stored in plan.scores
    block_scores: list[float | None] | None = None  # BlockPlan.score per block
    options: dict[str, Any] = field(default_factory=dict)  # resolved options, e.g. the default n

    def __post_init__(self):
        trainable = {i for i, t in enumerate(self.treatments) if t != "frozen"}
        if trainable != set(self.order) or len(self.order) != len(trainable):
            raise ValueError("Choice.order must list each trainable block exactly once")


@dataclass(frozen=True)
class Context:
    probe: ProbeResult
    modules: dict[str, str]
    cost: dict[str, Any]  # engine, zero_stage, world_size, dtype, batch_size, seq_len
    limits: dict[str, float]  # the budget: blocks, params, gib, flops

    @property
    def n_blocks(self) -> int:
        return self.probe.n_blocks

    def predict(self, treatments: list[str]) -> dict[str, Any]:
        return predict(self.probe.model_info, treatments, self.modules, **self.cost)

    def measures(self, treatments: list[str]) -> dict[str, float]:
        """The four budgeted quantities of a plan."""
        p = self.predict(treatments)
        return {
            "blocks": sum(t != "frozen" for t in treatments),
            "params": p["trainable_fraction"],
            "gib": p["gib_per_rank"],
            "flops": p["flops_fraction"],
        }

    def fits(self, treatments: list[str]) -> bool:
        m = self.measures(treatments)
        return all(m[k] <= v * (1 + 1e-12) for k, v in self.limits.items())


def count_option(name: str, value: Any, n_blocks: int, default: int) -> int:
    """A block count option: an int in 1..L (None means the default)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= n_blocks:
        raise UserError(
            f"option {name}={value!r} must be a whole number of blocks in 1..{n_blocks}"
        )
    return value


def top_blocks(n_blocks: int, n: int) -> Choice:
    """Train the last n blocks; trimming keeps the deepest (a frozen prefix skips backward)."""
    treatments = ["frozen"] * (n_blocks - n) + ["full"] * n
    return Choice(treatments, list(range(n_blocks - 1, n_blocks - n - 1, -1)))


def frozen_prefix(n_blocks: int, k: int) -> list[str]:
    return ["frozen"] * k + ["full"] * (n_blocks - k)
