"""configs/hf_trainer_example.py under torchrun on CPU: lfdist.apply_plan before transformers.Trainer.

One 2-rank launch (DDP through the Trainer, gloo) on tiny:llama with a frozen prefix, then
exact facts from the report the example writes: the Trainer's optimizer holds state for the
trainable parameters only, frozen weights are bit-identical (in memory and in the saved
folder), trainable ones moved, backward never ran below the boundary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lfdist.model.apply import apply_plan
from lfdist.model.tiny import build_tiny
from lfdist.plan import save_plan
from tests.helpers import make_plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "configs", "hf_trainer_example.py")
PREFIX = ["frozen"] * 5 + ["full"] * 3
STEPS = 3


def _launch(tmp_path, *extra: str, timeout: int = 300) -> tuple[dict, str]:
    plan, out, report = tmp_path / "plan.yaml", tmp_path / "hf", tmp_path / "report.json"
    save_plan(make_plan(build_tiny("llama", "lm"), PREFIX), str(plan))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        EXAMPLE,
        "--model",
        "tiny:llama",
        "--data",
        "synthetic:lm:200",
        "--plan",
        str(plan),
        "--out",
        str(out),
        "--steps",
        str(STEPS),
        "--report",
        str(report),
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(report) as f:
        return json.load(f), str(out)


def _split(treatments):
    model = build_tiny("llama", "lm")
    applied = apply_plan(model, make_plan(model, treatments))
    return model, applied


def _assert_frozen_untouched(report):
    for rank in report["ranks"]:
        assert rank["frozen_sha256"]["before"] == rank["frozen_sha256"]["after"]
        assert rank["trainable_sha256"]["before"] != rank["trainable_sha256"]["after"]
        assert rank["frozen_params_in_optimizer"] == 0
        assert rank["frozen_params_with_grad"] == 0
        assert rank["backward_blocks"] == [5, 6, 7]  # never below the lowest trainable block
    # Replicas agree after training: gradients really were averaged across ranks.
    assert len({r["trainable_sha256"]["after"] for r in report["ranks"]}) == 1


def test_trainer_ddp_keeps_frozen_prefix_out_of_optimizer_and_untouched(tmp_path):
    import torch
    import transformers

    report, out = _launch(tmp_path)
    base, applied = _split(PREFIX)
    trainable = applied.trainable
    assert (report["world_size"], report["trainable_elements"]) == (2, trainable)
    assert len(report["losses"]) == STEPS
    assert all(torch.isfinite(torch.tensor(report["losses"])))
    for rank in report["ranks"]:
        # Really DDP through the Trainer, not two independent single-process runs.
        assert (rank["parallel_mode"], rank["wrapper"]) == (
            "distributed",
            "DistributedDataParallel",
        )
        assert rank["optimizer"] == "AdamW"
        # create_optimizer's two groups (decay / no decay) hold the trainable parameters only:
        # 3 blocks' and lm_head's matrices; 3 blocks' two RMSNorms and the final norm.
        assert rank["param_group_elements"] == [3 * 36864 + 320 * 64, 3 * 2 * 64 + 64]
        assert sum(rank["param_group_elements"]) == trainable
        assert rank["optimizer_state_elements"] == 2 * trainable  # exp_avg + exp_avg_sq, replicated
    _assert_frozen_untouched(report)

    # The saved folder is a plain HF model: frozen weights bit-identical to the base, the
    # trained ones changed, the plan next to it.
    saved = transformers.AutoModelForCausalLM.from_pretrained(out)
    trained = dict(saved.named_parameters())
    for name, p in base.named_parameters():
        same = torch.equal(trained[name], p.detach())
        assert same != p.requires_grad, name
    assert os.path.isfile(os.path.join(out, "plan.yaml"))


@pytest.mark.slow
@pytest.mark.deepspeed
def test_trainer_deepspeed_zero2_on_cpu_shards_trainable_state_only(tmp_path):
    """Trainer + DeepSpeed ZeRO-2 also runs on CPU under torchrun (use_cpu=True, gloo).

    Slow: the first DeepSpeed run JIT-builds a CPU comm op (TORCH_EXTENSIONS_DIR caches it).
    """
    pytest.importorskip("deepspeed")
    report, _ = _launch(
        tmp_path, "--deepspeed", os.path.join(ROOT, "configs/deepspeed/zero2.json"), timeout=600
    )
    trainable = _split(PREFIX)[1].trainable
    ranks = report["ranks"]
    assert [r["wrapper"] for r in ranks] == ["DeepSpeedEngine"] * 2
    # ZeRO-2 partitions the fp32 master copy and both Adam moments of the trainable set.
    assert sum(r["optimizer_state_elements"] for r in ranks) == 2 * trainable
    assert all(r["optimizer_state_elements"] < 2 * trainable for r in ranks)
    _assert_frozen_untouched(report)


def test_checkpointing_the_example_way_keeps_backward_above_the_boundary():
    """Why the example never sets TrainingArguments(gradient_checkpointing=True).

    transformers 5's activation_checkpointing_enable (what that flag calls) also calls
    enable_input_require_grads for input_ids models, so backward reaches block 0 again;
    lfdist's helper wraps only the trainable blocks, non-reentrant.
    """
    import torch
    from transformers import PreTrainedModel

    from lfdist.model.blocks import find_blocks
    from lfdist.model.checkpointing import checkpoint_trainable_blocks
    from lfdist.train.measure import BackwardTracer

    def reached(enable) -> list[int]:
        model, _ = _split(PREFIX)
        model.train()
        enable(model)
        tracer = BackwardTracer(find_blocks(model).blocks(model))
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        return sorted(tracer.reached)

    assert reached(checkpoint_trainable_blocks) == [5, 6, 7]
    if hasattr(PreTrainedModel, "activation_checkpointing_enable"):  # transformers >= 5
        hf = reached(lambda m: m.activation_checkpointing_enable({"use_reentrant": False}))
        assert hf == list(range(8))
