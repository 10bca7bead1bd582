"""`lfdist plan cost`: model info from a config on the meta device, plans, fewest GPUs."""

from __future__ import annotations

import json
import os

import pytest

from lfdist.cli import main
from lfdist.cost import GIB
from lfdist.errors import UserError
from lfdist.plan import DEFAULT_MODULES
from lfdist.plan_cost import fewest_gpus, top_fraction

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLAMA_8B = os.path.join(ROOT, "configs", "models", "llama-3.1-8b.json")
LLAMA_70B = os.path.join(ROOT, "configs", "models", "llama-3.1-70b.json")
# A Llama-3.1-8B block: q 4096², k and v 4096·1024, o 4096², gate/up/down 4096·14336, 2 norms.
BLOCK_8B = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
EMBED_8B = 128256 * 4096


def test_shipped_model_configs_have_the_published_parameter_counts():
    from lfdist.model.info import meta_model_info

    files = sorted(os.listdir(os.path.join(ROOT, "configs", "models")))
    assert files == ["llama-3.1-70b.json", "llama-3.1-8b.json"]
    info = meta_model_info(LLAMA_8B)
    assert info["n_blocks"] == 32 and info["per_block_params"] == [BLOCK_8B] * 32
    assert info["total_params"] == 32 * BLOCK_8B + 2 * EMBED_8B + 4096 == 8_030_261_248
    assert info["per_block_lora_in_out"][0] == (4096 + 4096) * 2 + (4096 + 1024) * 2
    big = meta_model_info(LLAMA_70B)
    assert big["n_blocks"] == 80 and big["total_params"] == 70_553_706_496
    assert (big["hidden_size"], big["intermediate_size"], big["num_key_value_heads"]) == (
        8192,
        28672,
        8,
    )


def test_meta_fingerprint_matches_the_loaded_model():
    from lfdist.model.blocks import fingerprint
    from lfdist.model.info import meta_model_info
    from lfdist.model.tiny import build_tiny

    meta = meta_model_info("tiny:llama")
    assert meta["fingerprint"] == vars(fingerprint(build_tiny("llama", "lm")))


def test_top_fraction_rounds_up_and_refuses_nonsense():
    assert top_fraction(32, 0.25) == ["frozen"] * 24 + ["full"] * 8
    assert top_fraction(32, 0.1).count("full") == 4  # ceil(3.2)
    assert top_fraction(80, 0.1).count("full") == 8
    assert top_fraction(4, 0.01).count("full") == 1
    for bad in (0, 1.5, -0.2):
        with pytest.raises(UserError, match="fraction"):
            top_fraction(32, bad)


def test_fewest_gpus_by_hand():
    # fp32 fsdp2, blocks 2 and 3 train: 5000 B of params+grads+AdamW shard by w; activations
    # 2·34·8·8·4/2 = 8704 B do not; the all-gathered block (400 B) only when w > 1.
    info = {
        "per_block_params": [100] * 4,
        "group_params": {"embeddings": 50, "final_norm": 10, "head": 40},
        "hidden_size": 8,
        "vocab_size": 0,
        "task": "classify",
        "head_matmul_params": 40,
    }
    plan = ["frozen", "frozen", "full", "full"]
    kw = dict(engine="fsdp2", dtype="float32", batch_size=2, seq_len=4)
    for budget, expected in ((13704, 1), (13000, 2), (11000, 4), (10000, 8), (9200, 56)):
        assert fewest_gpus(info, plan, DEFAULT_MODULES, budget / GIB, **kw) == expected
    assert fewest_gpus(info, plan, DEFAULT_MODULES, 9000 / GIB, **kw) is None


def test_cli_costs_llama_8b_top_quarter_on_zero3(capsys):
    args = ["plan", "cost", "--model", LLAMA_8B, "--top", "0.25", "--engine", "deepspeed"]
    args += ["--zero-stage", "3", "--world-size", "64", "--seq-len", "4096", "--json"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0
    p = json.loads(capsys.readouterr().out)
    trainable = 8 * BLOCK_8B + 4096 + EMBED_8B  # top 8 blocks, final norm, head
    assert p["params_trainable"] == trainable
    assert p["bytes"]["params"] == 8_030_261_248 * 2 / 64
    assert p["bytes"]["grads"] == trainable * 2 / 64
    assert p["bytes"]["optimizer"] == trainable * 12 / 64  # fp32 master + 2 fp32 states
    assert p["bytes"]["transient"] == BLOCK_8B * 2


def test_cli_reads_a_plan_and_its_lora_rank(tmp_path, capsys):
    from lfdist.model.tiny import build_tiny
    from lfdist.plan import save_plan
    from tests.helpers import make_plan

    treatments = ["frozen"] * 6 + ["lora", "lora"]
    path = str(tmp_path / "plan.yaml")
    save_plan(make_plan(build_tiny("llama", "lm"), treatments, options={"lora_rank": 2}), path)
    with pytest.raises(SystemExit) as e:
        main(["plan", "cost", "--model", "tiny:llama", "--plan", path, "--json"])
    assert e.value.code == 0
    p = json.loads(capsys.readouterr().out)
    # per lora block: 2·(128 + 96 + 96 + 128) adapters + 128 norm weights; final norm + head
    assert p["params_trainable"] == 2 * (2 * 448 + 128) + 64 + 20480
    with pytest.raises(SystemExit) as e:
        main(["plan", "cost", "--model", "tiny:mistral", "--plan", path])
    assert e.value.code == 2
    assert "plan was made for model" in capsys.readouterr().err


def test_cli_errors_are_one_line(capsys):
    for args, match in (
        (["--model", "tiny:llama", "--top", "0.5", "--engine", "deepspeed"], "--zero-stage"),
        (["--model", "no/such/config.json", "--top", "0.5"], "does not exist"),
        (["--model", "tiny:llama", "--top", "2"], "fraction"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["plan", "cost", *args])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1
