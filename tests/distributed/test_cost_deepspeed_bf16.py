"""DeepSpeed ZeRO-2/3 in bf16 keep fp32 AdamW states and an fp32 master copy: 12 bytes per
trainable element, as the cost model predicts (one rank, gloo, DeepSpeed's CPU accelerator)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs in a fresh process: DeepSpeed's process group and accelerator are process-wide.
WORKER = r"""
import json, sys, torch, deepspeed
deepspeed.init_distributed("gloo")
from lfdist.model.apply import apply_plan
from lfdist.model.tiny import build_tiny
from lfdist.train.measure import make_plan_for
out = {}
for stage in (2, 3):
    model = build_tiny("llama", "lm").to(torch.bfloat16)
    apply_plan(model, make_plan_for(model, ["frozen"] * 6 + ["full"] * 2, "test"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "bf16": {"enabled": True}, "zero_optimization": {"stage": stage}}
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-3, foreach=False), config=config)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    zero = engine.optimizer
    states = [s for v in zero.optimizer.state.values() for s in v.values()
              if torch.is_tensor(s) and s.dim() > 0]
    masters = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_partitioned_groups_flat
    out[stage] = {
        "trainable": sum(p.numel() for p in trainable),
        "state_dtypes": sorted({str(s.dtype) for s in states}),
        "master_dtypes": sorted({str(m.dtype) for m in masters}),
        "state_bytes": sum(s.numel() * s.element_size() for s in states),
        "master_bytes": sum(m.numel() * m.element_size() for m in masters),
    }
print("RESULT " + json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~12 s of CPU, 55 s wall on the shared 2-core machine
@pytest.mark.deepspeed
def test_zero_bf16_optimizer_bytes_equal_prediction():
    from lfdist.cost import predict
    from lfdist.model.info import model_info
    from lfdist.model.tiny import build_tiny
    from lfdist.plan import DEFAULT_MODULES

    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        PYTHONPATH=ROOT,
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_extensions"))
    run = subprocess.run(
        [sys.executable, "-c", WORKER], capture_output=True, text=True, env=env, timeout=600
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    measured = json.loads(lines[0][len("RESULT ") :])
    info = model_info(build_tiny("llama", "lm"), "lm")
    treatments = ["frozen"] * 6 + ["full"] * 2
    # 2 blocks of 36,992 + final norm 64 + head 20,480
    assert measured["2"]["trainable"] == measured["3"]["trainable"] == 94528
    for stage in ("2", "3"):
        m = measured[stage]
        assert m["state_dtypes"] == m["master_dtypes"] == ["torch.float32"]
        assert m["state_bytes"] == 8 * 94528 and m["master_bytes"] == 4 * 94528
        p = predict(
            info,
            treatments,
            DEFAULT_MODULES,
            engine="deepspeed",
            zero_stage=int(stage),
            world_size=1,
            dtype="bfloat16",
        )
        assert p["bytes"]["optimizer"] == m["state_bytes"] + m["master_bytes"]
