"""DeepSpeed ZeRO-1/2/3 on CPU (gloo, 2 ranks): exact per-rank counts, frozen weights untouched,
losses equal to a single-process PyTorch reference, exact resume; and the config filling.

One torchrun launch (deepspeed_worker.py) runs every stage and case; the tests read its JSON.
Expected numbers are computed here from the parameter sizes alone, with DeepSpeed's layout:
- ZeRO-1/2 flatten the trainable parameters into one group padded to a multiple of
  2 x world size; rank r owns [r P, (r+1) P); the padding sits at the end (last rank).
  Its gradient buffer holds the whole tensor of every parameter that touches its range.
- ZeRO-3 pads each parameter to a multiple of the world size (tail on the last rank), and
  keeps parameters of <= 10 x hidden elements (the "auto" persistence threshold) whole too.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from lfdist.config import TrainConfig
from lfdist.engines.deepspeed import fill_config, template
from lfdist.errors import UserError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import deepspeed_worker as worker  # noqa: E402

WORLD = worker.WORLD
PERSIST = 10 * 64  # stage3_param_persistence_threshold filled from hidden_size 64
STAGES = (1, 2, 3)
RUNS = [(s, c) for s in STAGES for c in worker.cases_for(s)]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("ds") / "results.json"
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")
        ),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(WORLD),
        str(HERE / "deepspeed_worker.py"),
        str(out),
        *map(str, STAGES),
    ]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.is_file(), proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def _zero12_layout(sizes: list[int], rank: int) -> dict[str, int]:
    total = sum(sizes)
    align = 2 * WORLD
    part = math.ceil(total / align) * align // WORLD
    lo, hi = rank * part, (rank + 1) * part
    padding = max(0, min(part, hi - total))
    touching, offset = 0, 0
    for n in sizes:
        if offset < hi and offset + n > lo:
            touching += n
        offset += n
    return {"partition": part, "padding": padding, "touching": touching}


def _zero3_share(n: int, rank: int) -> tuple[int, int]:
    size = math.ceil(n / WORLD)
    return size, max(0, min(size, (rank + 1) * size - n))


def _frozen_sizes(result: dict) -> list[int]:
    return result["frozen_numels"]


# ---------------------------------------------------------------- distributed (one launch)


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage,case", RUNS)
def test_loss_matches_single_process_reference(results, stage, case):
    got = results[f"{stage}/{case}"]["losses"]
    ref = worker.reference_losses(case)
    assert len(got) == len(ref) == worker.STEPS
    for step, (a, b) in enumerate(zip(got, ref)):
        assert abs(a - b) <= 1e-5 * abs(b), (step, a, b)


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage,case", RUNS)
def test_optimizer_state_is_the_trainable_share_times_two(results, stage, case):
    r = results[f"{stage}/{case}"]
    sizes = [n for _, n in r["param_order"]]
    unpadded_total = 0
    for rank, counts in enumerate(r["ranks"]):
        after = counts["after_step"]
        if stage == 3:
            shares = [_zero3_share(n, rank) for n in sizes]
            part, padding = sum(s for s, _ in shares), sum(p for _, p in shares)
        else:
            layout = _zero12_layout(sizes, rank)
            part, padding = layout["partition"], layout["padding"]
        # AdamW keeps exp_avg and exp_avg_sq for every element of this rank's flat partition.
        assert after["optimizer_state_elements"] == 2 * part
        assert after["partition_padding_elements"] == padding
        assert after["optimizer_state_elements_unpadded"] == 2 * (part - padding)
        assert (
            counts["after_backward"]["optimizer_state_elements"] == 0
        )  # created by the first step
        unpadded_total += after["optimizer_state_elements_unpadded"]
    assert unpadded_total == 2 * sum(sizes)


@pytest.mark.deepspeed
def test_padding_cases_really_pad(results):
    # The odd-sized MLP biases make both layouts pad on the last rank; the tiny llama does not.
    assert results["1/sparse_odd"]["ranks"][1]["after_step"]["partition_padding_elements"] == 2
    assert results["3/sparse_odd"]["ranks"][1]["after_step"]["partition_padding_elements"] == 10
    assert results["2/prefix"]["ranks"][1]["after_step"]["partition_padding_elements"] == 0


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage,case", RUNS)
def test_params_and_grads_held_per_rank(results, stage, case):
    r = results[f"{stage}/{case}"]
    sizes, frozen = [n for _, n in r["param_order"]], _frozen_sizes(r)
    replicated = case == "prefix_replicated"
    for rank, counts in enumerate(r["ranks"]):
        assert counts["frozen_grads"] == 0
        backward, after, mid = (
            counts["after_backward"],
            counts["after_step"],
            counts["mid_accumulation"],
        )
        if stage == 3:
            part = sum(_zero3_share(n, rank)[0] for n in sizes)
            whole = sum(n for n in sizes if n <= PERSIST)
            assert backward["trainable_params"] == part + whole
            frozen_held = (
                sum(frozen)
                if replicated
                else (
                    sum(_zero3_share(n, rank)[0] for n in frozen)
                    + sum(n for n in frozen if n <= PERSIST)
                )
            )
            assert backward["frozen_params"] == frozen_held
            assert (
                backward["grad_elements"] == mid["grad_elements"] == after["grad_elements"] == part
            )
        else:
            layout = _zero12_layout(sizes, rank)
            assert backward["trainable_params"] == sum(sizes)
            assert backward["frozen_params"] == sum(frozen)
            # ZeRO-1 holds full gradients until the boundary; ZeRO-2 only its partition's.
            assert mid["grad_elements"] == (sum(sizes) if stage == 1 else layout["touching"])
            assert backward["grad_elements"] == layout["touching"] + layout["padding"]
            assert after["grad_elements"] == 0
            assert after["master_weight_elements"] == layout["partition"]


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage,case", RUNS)
def test_frozen_bit_identical_trainable_moved(results, stage, case):
    r = results[f"{stage}/{case}"]
    assert r["frozen_identical"]
    assert r["trainable_names_match"]
    assert r["trainable_unchanged"] == []


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage,case", [(s, c) for s, c in RUNS if worker.CASES[c][2]])
def test_resume_continues_exactly(results, stage, case):
    r = results[f"{stage}/{case}"]
    assert r["resumed_ranks"][0] == r["resumed_ranks"][1] == [r["losses"][-1]]
    assert r["resumed_weight_max_diff"] == 0.0
    assert r["resumed_global_steps"] == worker.STEPS
    assert r["resumed_lr"] == r["lr"]


@pytest.mark.deepspeed
def test_zero3_frozen_prefix_savings_and_replication(results):
    full, prefix, repl = (
        results[f"3/{c}"]["ranks"][0]["after_step"] for c in ("full", "prefix", "prefix_replicated")
    )
    sizes = {c: sum(n for _, n in results[f"3/{c}"]["param_order"]) for c in ("full", "prefix")}
    # No padding on the tiny llama: the state shrinks exactly with the trainable elements.
    assert (
        prefix["optimizer_state_elements"] * sizes["full"]
        == full["optimizer_state_elements"] * sizes["prefix"]
    )
    assert repl["optimizer_state_elements"] == prefix["optimizer_state_elements"]
    assert repl["frozen_params"] == sum(results["3/prefix"]["frozen_numels"])
    assert results["3/prefix_replicated"]["frozen_never_gathered"]


# ---------------------------------------------------------------- config filling (no process group)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(
        engine="deepspeed", **{"zero_stage": 2, "batch_size": 4, "grad_accum": 2, **kw}
    )


def test_auto_values_are_filled_from_train_config():
    ds = fill_config(None, _cfg(zero_stage=3, max_grad_norm=0.5), world_size=2, hidden_size=64)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 640
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
    assert "auto" not in json.dumps(ds)
    bf16 = fill_config(None, _cfg(), world_size=1, dtype="bfloat16")
    assert bf16["bf16"]["enabled"] and "reduce_bucket_size" not in bf16["zero_optimization"]


def test_explicit_values_that_agree_are_kept():
    user = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 16,
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000},
    }
    ds = fill_config(user, _cfg(), world_size=2)
    assert ds["train_batch_size"] == 16 and ds["zero_optimization"]["reduce_bucket_size"] == 1000


@pytest.mark.parametrize(
    "user,words",
    [
        (
            {"train_micro_batch_size_per_gpu": 8},
            ["train_micro_batch_size_per_gpu=8", "train.batch_size=4"],
        ),
        (
            {"gradient_accumulation_steps": 1},
            ["gradient_accumulation_steps=1", "train.grad_accum=2"],
        ),
        ({"gradient_clipping": 0.3}, ["gradient_clipping=0.3", "train.max_grad_norm=1.0"]),
        ({"zero_optimization": {"stage": 3}}, ["zero_optimization.stage=3", "train.zero_stage=2"]),
        ({"bf16": {"enabled": True}}, ["bf16.enabled=true", "model.dtype=float32"]),
    ],
)
def test_conflicts_name_both_values(user, words):
    with pytest.raises(UserError) as e:
        fill_config(user, _cfg(), world_size=2)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_train_batch_size_for_another_world_size_is_refused():
    with pytest.raises(UserError, match="world-size mismatch") as e:
        fill_config({"train_batch_size": 32}, _cfg(), world_size=2)
    assert "launch 4 ranks" in str(e.value)


@pytest.mark.parametrize(
    "user,words",
    [
        ({"optimizer": {"type": "AdamW"}}, "optimizer"),
        ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
        ({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}, "sub_group_size"),
    ],
)
def test_sections_we_own_and_unfillable_auto_are_refused(user, words):
    with pytest.raises(UserError, match=words):
        fill_config(user, _cfg(), world_size=2)


def test_shipped_templates_are_our_templates():
    files = sorted((ROOT / "configs" / "deepspeed").glob("zero*.json"))
    assert [f.name for f in files] == ["zero1.json", "zero2.json", "zero3.json"]
    for f in files:
        data = json.loads(f.read_text())
        stage = int(f.stem[-1])
        assert data["_comment"].startswith("lfdist ")
        assert {k: v for k, v in data.items() if k != "_comment"} == template(stage)
        ds = fill_config(data, _cfg(zero_stage=stage), world_size=2, hidden_size=64)
        assert "_comment" not in ds and ds["zero_optimization"]["stage"] == stage


def test_replicate_flag_is_read_from_the_config():
    from lfdist.engines.deepspeed import _replicate_frozen

    cfg = _cfg(zero_stage=3)
    assert not _replicate_frozen(cfg, 3)
    flagged = types.SimpleNamespace(zero3_replicate_frozen=True)
    assert _replicate_frozen(flagged, 3) and not _replicate_frozen(flagged, 2)


def test_precision_picks_deepspeeds_bf16_path():
    from lfdist.errors import UserError

    mixed = fill_config(None, _cfg(), world_size=1, dtype="bfloat16")
    assert mixed["bf16"] == {"enabled": True}  # DeepSpeed's default: fp32 masters and states
    pure = fill_config(None, _cfg(precision="bf16"), world_size=1, dtype="bfloat16")
    assert pure["bf16"] == {
        "enabled": True,
        "bf16_master_weights_and_grads": True,
        "bf16_optimizer_states": True,
    }
    user = {"bf16": {"bf16_optimizer_states": True}}
    with pytest.raises(UserError, match="bf16.bf16_optimizer_states=true conflicts with train"):
        fill_config(user, _cfg(), world_size=1, dtype="bfloat16")
    with pytest.raises(UserError, match="needs ZeRO stage 1, 2 or 3"):
        fill_config(None, _cfg(zero_stage=0, precision="bf16"), world_size=1, dtype="bfloat16")
