"""Bad input found by review, below the CLI: config values, data files, plan and probe files,
sequence length against the model, and the bounds on what evaluation and the prefix cache hold."""

from __future__ import annotations

import glob
import json
import logging
import os

import pytest
import torch

from lfdist.config import TrainConfig, config_from_dict, load_config
from lfdist.data import load_task_data, load_text_data
from lfdist.errors import UserError
from lfdist.model.positions import check_seq_len, model_config, usable_positions
from lfdist.model.tiny import build_tiny
from lfdist.model.tokenizer import ByteTokenizer
from lfdist.plan import Plan, load_plan, save_plan
from tests.helpers import make_plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ---- config values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lr=.inf", "config key train.lr must be a finite number, got inf"),
        ("train.lr=.nan", "config key train.lr must be a finite number, got nan"),
        ("train.lr=-1e-4", "train.lr must be greater than 0, got -0.0001"),
        ("train.lr=0", "train.lr must be greater than 0, got 0.0"),
        ("train.warmup_steps=-5", "train.warmup_steps must be 0 or more, got -5"),
        ("train.save_every=-1", "train.save_every must be 0 or more, got -1"),
        ("train.weight_decay=-0.1", "train.weight_decay must be 0 or more, got -0.1"),
        ("train.cache_max_gib=0", "train.cache_max_gib must be greater than 0"),
        ("data.seq_len=0", "data.seq_len must be a positive number, got 0"),
        ("data.seq_len=1", "data.seq_len must be at least 2, got 1"),
        ("data.max_eval_examples=0", "data.max_eval_examples must be a positive number"),
        ("probe.pilot_steps=-1", "probe.pilot_steps must be 0 or more, got -1"),
    ],
)
def test_bad_numbers_say_what_is_wrong(override, needle):
    with pytest.raises(UserError) as e:
        config_from_dict({}, [override])
    assert needle in str(e.value)


def test_signed_and_exponent_floats_parse_as_numbers(tmp_path):
    assert config_from_dict({}, ["train.lr=2e-5"]).train.lr == 2e-5
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3e-5\n  weight_decay: +1e-2\n")  # YAML 1.1 reads these as str
    cfg = load_config(str(path))
    assert (cfg.train.lr, cfg.train.weight_decay) == (3e-5, 0.01)


def test_yaml_whose_top_level_is_a_list(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- model\n- data\n")
    with pytest.raises(UserError, match="its top level is a list"):
        load_config(str(path))


def test_eval_before_and_save_final_default_on():
    tc = TrainConfig()
    assert (tc.eval_before, tc.save_final) == (True, True)
    tc = config_from_dict({}, ["train.eval_before=false", "train.save_final=false"]).train
    assert (tc.eval_before, tc.save_final) == (False, False)


# ---- every shipped config parses -------------------------------------------------------------


def test_every_file_in_configs_parses():
    from lfdist.engines.deepspeed import _drop_comments, read_config, template

    files = sorted(
        f
        for f in glob.glob(os.path.join(ROOT, "configs", "**", "*"), recursive=True)
        if os.path.isfile(f)
    )
    kinds = {"yaml": [], "deepspeed": [], "models": [], "py": []}
    for f in files:
        rel = os.path.relpath(f, os.path.join(ROOT, "configs"))
        if f.endswith(".yaml"):
            cfg = load_config(f)
            assert cfg.model.spec and cfg.data.spec, rel
            kinds["yaml"].append(rel)
        elif rel.startswith("deepspeed" + os.sep) and f.endswith(".json"):
            stage = int(os.path.basename(f)[len("zero")])
            tc = TrainConfig(engine="deepspeed", zero_stage=stage, deepspeed_config=f)
            assert _drop_comments(read_config(tc)) == template(stage), rel
            kinds["deepspeed"].append(rel)
        elif rel.startswith("models" + os.sep) and f.endswith(".json"):
            import transformers

            with open(f) as fh:
                data = _without_comments(json.load(fh))
            config = transformers.AutoConfig.for_model(**data)  # a real HF config
            assert config.num_hidden_layers > 0 and usable_positions(data) > 0, rel
            kinds["models"].append(rel)
        elif f.endswith(".py"):
            with open(f) as fh:
                compile(fh.read(), f, "exec")
            kinds["py"].append(rel)
        else:
            pytest.fail(f"configs/{rel}: no test parses this kind of file; add one")
    counts = {k: len(v) for k, v in kinds.items()}
    # A new config must be parsed here too: update these counts when adding one.
    assert counts == {"yaml": 3, "deepspeed": 3, "models": 2, "py": 1}, kinds
    assert len(files) == 9


def _without_comments(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_comment")}


# ---- data files ------------------------------------------------------------------------------


def test_txt_of_plain_lines_splits_its_token_stream(tmp_path, caplog):
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(["abcdefg"] * 40))  # one document: 319 bytes + eos = 320 tokens
    with caplog.at_level(logging.INFO, logger="lfdist"):
        train, held, info = load_task_data(str(path), "lm", ByteTokenizer(), 16)
    assert train["input_ids"].shape == (18, 16) and held["input_ids"].shape == (2, 16)
    stream = list(b"\n".join([b"abcdefg"] * 40)) + [258]
    assert train["input_ids"].flatten().tolist() == stream[: 18 * 16]
    assert held["input_ids"].flatten().tolist() == stream[18 * 16 :]
    assert (info["n_texts"], info["n_examples"], info["n_heldout"]) == (1, 18, 2)
    assert info["heldout_split"] == "token stream"
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("lfdist")]
    assert lines == [
        "data: 1 document(s), too few to hold out 10% by document; held out the last 2 of 20 "
        "chunks of 16 tokens instead"
    ]
    train, _, info = load_task_data(str(path), "lm", ByteTokenizer(), 16, max_examples=5)
    assert train["input_ids"].shape == (5, 16) and info["n_heldout"] == 2


def test_enough_documents_keep_the_document_split(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(f"document {i:02d}" for i in range(10)))
    _, held, info = load_task_data(str(path), "lm", ByteTokenizer(), 8)
    assert info["heldout_split"] == "documents" and info["n_texts"] == 9


def test_too_short_text_is_refused(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("tiny")
    with pytest.raises(UserError, match=r"1 chunk\(s\) of 16 tokens, too little to hold out 10%"):
        load_task_data(str(path), "lm", ByteTokenizer(), 16)


def test_binary_txt_is_not_text(tmp_path):
    path = tmp_path / "model.txt"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match="model.txt is not text"):
        load_text_data(str(path), "lm")
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"\x00\x01" * 50)
    with pytest.raises(UserError, match="a.txt is not text"):
        load_text_data(str(folder), "lm")


def test_symlink_loop_and_dangling_link_are_not_hub_names(tmp_path):
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    with pytest.raises(UserError, match="is a symlink loop; point --data at a real file"):
        load_text_data(str(tmp_path / "a"), "lm")
    os.symlink(tmp_path / "gone", tmp_path / "c")
    with pytest.raises(UserError, match="is a symlink to a missing target"):
        load_text_data(str(tmp_path / "c"), "lm")


def test_string_labels_are_mapped_and_said(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "a", "label": "sports"}, {"text": "b", "label": "arts"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.INFO, logger="lfdist"):
        data = load_text_data(str(path), "classify")
        load_text_data(str(path), "classify")  # read again (a run reads its data twice): said once
    assert data.labels == (1, 0) and data.label_names == ("arts", "sports")
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("lfdist")]
    assert lines == [
        f"{path}: labels are class names; mapped to ids in sorted order: 'arts'=0, 'sports'=1"
    ]
    # one class: the error alone, no mapping line before it
    caplog.clear()
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"text": t, "label": "arts"}) + "\n" for t in "ab"))
    with caplog.at_level(logging.INFO, logger="lfdist"):
        with pytest.raises(UserError, match="single class"):
            load_text_data(str(one), "classify")
    assert [r for r in caplog.records if r.name.startswith("lfdist")] == []


@pytest.mark.parametrize("label", [{"a": 1}, [1, 2]])
def test_object_labels_are_refused(tmp_path, label):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "a", "label": label}, {"text": "b", "label": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="example 0 has the label .*; a label must be a class"):
        load_text_data(str(path), "classify")


# ---- plan and probe files --------------------------------------------------------------------


def test_plan_block_renamed_to_another_block_is_refused(tmp_path):
    path = tmp_path / "plan.yaml"
    save_plan(make_plan(build_tiny("llama", "lm"), ["frozen"] * 6 + ["full"] * 2), str(path))
    path.write_text(path.read_text().replace("name: model.layers.3,", "name: model.layers.5,"))
    with pytest.raises(UserError) as e:
        load_plan(str(path))
    assert str(e.value) == (
        "plan block 3 is named 'model.layers.5' but the block at index 3 is 'model.layers.3'; "
        "edit treatments, not names (restore the name or rerun `lfdist select`)"
    )


def test_plan_path_that_is_a_folder(tmp_path):
    with pytest.raises(UserError, match="is a folder, not a file; give the YAML file's path"):
        load_plan(str(tmp_path))


@pytest.mark.parametrize("value", ["3.5", 3.5, None, True, 9])
def test_probe_file_with_a_bad_block_count(tmp_path, value):
    from lfdist.probe import load_probe, run_probe

    model = build_tiny("llama", "lm")
    ids = torch.randint(0, 256, (4, 8))
    result = run_probe(model, {"input_ids": ids}, "lm", samples=4, progress=False)
    path = str(tmp_path / "probe.json")
    result.save(path)
    d = json.load(open(path))
    d["model"]["n_blocks"] = value
    json.dump(d, open(path, "w"))
    with pytest.raises(UserError, match=f"model n_blocks is {value!r}, not the whole number"):
        load_probe(path)


def test_gradnorm_without_gradients_names_the_cli_flag():
    from lfdist.select import select_plan
    from tests.helpers import fake_probe

    with pytest.raises(UserError, match=r"rerun `lfdist probe --gradnorm`"):
        select_plan(fake_probe(), "gradnorm")


# ---- sequence length against the model -------------------------------------------------------


def test_usable_positions_from_the_config_alone():
    assert usable_positions(model_config("tiny:llama")) == 512
    assert usable_positions(model_config("tiny:roberta")) == 520 - 256 - 1  # pad offset
    assert usable_positions(model_config("tiny:mpnet")) == 520 - 2  # padding_idx 1
    assert usable_positions({"n_positions": 1024}) == 1024
    assert usable_positions({"text_config": {"max_position_embeddings": 77}}) == 77
    assert usable_positions({"hidden_size": 8}) is None


@pytest.mark.parametrize("arch, limit", [("roberta", 263), ("mpnet", 518), ("bert", 512)])
def test_the_limit_is_the_longest_sequence_the_model_runs(arch, limit):
    model = build_tiny(arch, "classify")
    model(input_ids=torch.full((1, limit), 5))  # runs
    check_seq_len(f"tiny:{arch}", limit)
    with pytest.raises((IndexError, RuntimeError)):
        model(input_ids=torch.full((1, limit + 1), 5))
    with pytest.raises(UserError, match=f"use --seq-len {limit} or less"):
        check_seq_len(f"tiny:{arch}", limit + 1)


# ---- bounds on evaluation and the prefix cache ------------------------------------------------


def test_evaluation_batches_keep_logits_bounded(monkeypatch):
    from lfdist.train import evaluate as ev

    model = build_tiny("llama", "lm")  # vocab 320
    data = {"input_ids": torch.randint(0, 256, (6, 32))}
    data["attention_mask"] = torch.ones_like(data["input_ids"])
    data["labels"] = data["input_ids"].clone()
    assert ev.bounded_batch(model, data, "lm", 8) == 8  # 2**27 // (32 * 320) = 13107
    full = ev.evaluate(model, data, "lm", batch_size=8)
    monkeypatch.setattr(ev, "_LOGIT_ELEMENTS", 2 * 32 * 320)
    assert ev.bounded_batch(model, data, "lm", 8) == 2
    seen = []
    real = ev.batch_sums
    monkeypatch.setattr(
        ev, "batch_sums", lambda m, b, t: seen.append(len(b["input_ids"])) or real(m, b, t)
    )
    bounded = ev.evaluate(model, data, "lm", batch_size=8)
    assert seen == [2, 2, 2]  # three forwards of 2 rows instead of one of 6
    assert (
        (bounded["examples"], bounded["targets"]) == (full["examples"], full["targets"]) == (6, 186)
    )
    assert bounded["loss"] == pytest.approx(full["loss"], rel=1e-5)  # float32 sums in another order


def test_prefix_cache_refuses_more_than_the_machine_has(monkeypatch):
    from lfdist.model.blocks import find_blocks
    from lfdist.train import prefix_cache

    model = build_tiny("llama", "lm")
    blocks = find_blocks(model).blocks(model)
    for p in model.parameters():
        p.requires_grad_(False)
    monkeypatch.setattr(prefix_cache, "available_memory_bytes", lambda: 2 * 2**30)
    f32 = torch.float32
    with pytest.raises(UserError, match="needs 1.50 GiB on every rank but this machine has 2.00"):
        prefix_cache.install_prefix_cache(blocks, 4, 3 * 2**20, 128, 1, f32, 2**40)
    cache = prefix_cache.install_prefix_cache(blocks, 4, 2**20, 128, 1, f32, 2**40)  # 0.5 GiB: fits
    assert cache.store.shape == (2**20, 128, 1) and not cache.spilled


def test_prefix_cache_spill_checks_its_folder(monkeypatch, tmp_path):
    import shutil
    from collections import namedtuple

    from lfdist.model.blocks import find_blocks
    from lfdist.train import prefix_cache

    model = build_tiny("llama", "lm")
    blocks = find_blocks(model).blocks(model)
    for p in model.parameters():
        p.requires_grad_(False)
    args = (blocks, 4, 3 * 2**20, 128, 1, torch.float32, 2**30)  # 1.5 GiB, over the 1 GiB cap
    with pytest.raises(UserError, match="is not a folder; create it"):
        prefix_cache.install_prefix_cache(*args, spill_dir=str(tmp_path / "missing"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, 2 * 2**30))
    with pytest.raises(UserError, match=r"needs 1.50 GiB on every rank but .* has 2.00 GiB free"):
        prefix_cache.install_prefix_cache(*args, spill_dir=str(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, 4 * 2**30))
    cache = prefix_cache.install_prefix_cache(*args, spill_dir=str(tmp_path))
    assert cache.spilled and cache.store.shape == (3 * 2**20, 128, 1)
    assert list(tmp_path.iterdir()) == []  # mapped, then unlinked: nothing left behind


def test_plan_modules_accept_tied_head_only():
    plan = make_plan(build_tiny("llama", "lm"), ["full"] * 8)
    d = plan.to_dict()
    d["modules"] = {**d["modules"], "head": "tied"}
    assert Plan.from_dict(dict(d)).modules["head"] == "tied"
    d["modules"] = {**d["modules"], "final_norm": "tied"}
    with pytest.raises(UserError, match="modules.final_norm: treatment must be frozen or full"):
        Plan.from_dict(d)


def test_logit_lens_runs_in_bounded_chunks(monkeypatch):
    from lfdist.probe import run as probe_run

    model = build_tiny("llama", "lm")  # vocab 320
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids}
    whole = probe_run.run_probe(model, data, "lm", batch_size=4, progress=False)
    rows = []
    real_lens = probe_run.logit_lens

    def recording_lens(*args):
        lens = real_lens(*args)
        return lambda h: rows.append(h.shape[0]) or lens(h)

    monkeypatch.setattr(probe_run, "logit_lens", recording_lens)
    monkeypatch.setattr(probe_run, "_LENS_ELEMENTS", 7 * 320)  # 7 rows of logits at a time
    chunked = probe_run.run_probe(model, data, "lm", batch_size=4, progress=False)
    # The 8 interior spaces score positions 0, 4, 8, 12 of each sequence (LENS_STRIDE 4): 16
    # rows, chunks of 7, 7, 2; the output space all 4 x 15 = 60: 8 chunks of 7 and one of 4.
    assert rows == [7, 7, 2] * 8 + [7] * 8 + [4]
    assert chunked.deviation == pytest.approx(whole.deviation, rel=1e-8)  # float32 matmuls


def test_probe_stages_log_progress_without_a_terminal(caplog):
    import re

    from lfdist.probe import run_probe

    model = build_tiny("llama", "lm")
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="lfdist"):
        run_probe(model, {"input_ids": ids}, "lm", batch_size=2, gradnorm=True, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "lfdist.probe.run"]
    assert len(lines) == 4, lines  # pytest's stderr is no terminal: no bar, the lines instead
    assert lines[0] == "probe forward: 4 examples"
    assert re.fullmatch(r"probe forward: done, 4 examples in \d+\.\d s", lines[1])
    assert lines[2] == "probe gradnorm: 4 examples"
    assert re.fullmatch(r"probe gradnorm: done, 4 examples in \d+\.\d s", lines[3])


def test_symlink_loop_inside_a_data_folder_is_skipped(tmp_path):
    (tmp_path / "doc.txt").write_text("a document")
    os.symlink(tmp_path / "y", tmp_path / "x")
    os.symlink(tmp_path / "x", tmp_path / "y")
    assert load_text_data(str(tmp_path), "lm").texts == ("a document",)
    os.symlink(tmp_path / "z.txt", tmp_path / "z.txt")  # a looping link named like a document
    with pytest.raises(
        UserError, match=r"cannot read .*z\.txt \(Too many levels of symbolic links\)"
    ):
        load_text_data(str(tmp_path), "lm")


@pytest.mark.parametrize("damage", ["empty", "garbage", "huge_length", "truncated"])
def test_a_damaged_safetensors_file_is_one_line(tmp_path, damage):
    import struct

    import torch
    from safetensors.torch import save_file

    from lfdist.model.headers import read_header

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(path))
    good = path.read_bytes()
    assert list(read_header(str(path))) == ["w"]
    damaged = {
        "empty": b"",
        "garbage": struct.pack("<Q", 16) + b"garbagegarbage!!",
        "huge_length": struct.pack("<Q", 2**62) + b"{}",
        "truncated": good[: len(good) - 100],
    }[damage]
    path.write_bytes(damaged)
    with pytest.raises(UserError, match="is not a readable safetensors file"):
        read_header(str(path))
