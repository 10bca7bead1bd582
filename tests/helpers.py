"""Small builders shared by tests."""

from dataclasses import replace

from lfdist.train.measure import make_plan_for


def make_plan(model, treatments, strategy="test", **fields):
    """A plan with these block treatments (block i scored i, so scores round-trip too)."""
    plan = make_plan_for(model, treatments, strategy)
    blocks = tuple(replace(b, score=float(b.index)) for b in plan.blocks)
    return replace(plan, blocks=blocks, **fields)


def fake_probe(deviation=None, head=0, n_blocks=8, **curves):
    """A probe result for a fake model: n_blocks blocks of 100 elements, embeddings 100, a head of
    `head` elements; extra curves (gradnorm, pilot, critical) are stored when not None."""
    from lfdist.probe import ProbeResult, ProbeStats

    L = n_blocks
    info = {
        "fingerprint": {"architecture": "Fake", "n_blocks": L, "params_hash": "0" * 64},
        "architecture": "Fake",
        "task": "classify",
        "n_blocks": L,
        "block_names": [f"layers.{i}" for i in range(L)],
        "per_block_params": [100] * L,
        "per_block_bias_params": [10] * L,
        "group_params": {"embeddings": 100, "final_norm": 0, "head": head},
        "head_matmul_params": head,
        "hidden_size": 1,
        "vocab_size": 0,
        "dtype": "float32",
    }
    all_curves = {"deviation": list(deviation) if deviation is not None else [1.0] * (L + 1)}
    all_curves.update({k: v for k, v in curves.items() if v is not None})
    stats = ProbeStats.empty("lm", L + 1, 1)
    return ProbeResult("classify", stats, info, {"seq_len": 1, "n_samples": 1}, {}, all_curves)


SLOW_JOB = """
import sys
from lfdist.config import config_from_dict
from lfdist.errors import JobFailed
from lfdist.job import Debug, Fault, Job
from {module} import {launcher}
cfg = config_from_dict({cfg!r})
try:
    {launcher}(Job(cfg, {plan!r}, {out!r}, evaluate=False,
                   debug=Debug(inject_faults=(Fault("sleep", 0, seconds=0.3),))))
except JobFailed as e:
    print(f"lfdist: {{e}}", file=sys.stderr)
    sys.exit(e.exit_code)
"""


def slow_job_script(launcher: str, cfg: dict, plan: str, out: str) -> str:
    """Python source that runs `launcher` ("module:function", launch_training or ray_train)
    with every step slowed to >= 0.3 s and turns its JobFailed into the CLI's line and exit."""
    module, function = launcher.split(":")
    return SLOW_JOB.format(module=module, launcher=function, cfg=cfg, plan=plan, out=out)
