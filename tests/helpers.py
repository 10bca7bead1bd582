"""Small builders shared by tests."""

from dataclasses import replace

from lfdist.train.measure import make_plan_for


def make_plan(model, treatments, strategy="test", **fields):
    """A plan with these block treatments (block i scored i, so scores round-trip too)."""
    plan = make_plan_for(model, treatments, strategy)
    blocks = tuple(replace(b, score=float(b.index)) for b in plan.blocks)
    return replace(plan, blocks=blocks, **fields)
