"""Small builders shared by tests."""

from lfdist.model.blocks import find_blocks, fingerprint
from lfdist.plan import BlockPlan, Plan


def make_plan(model, treatments, strategy="test", **fields):
    bmap = find_blocks(model)
    blocks = tuple(BlockPlan(i, f"{bmap.path}.{i}", t, score=float(i)) for i, t in enumerate(treatments))
    return Plan(strategy=strategy, fingerprint=fingerprint(model), blocks=blocks, **fields)
