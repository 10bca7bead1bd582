"""The review's bad inputs through the CLI: one line `lfdist: error: ...`, exit 2, nothing written.
Then what a run must say truthfully: how a tied head trains, and the eval_before / save_final
switches, on a real (1-process) run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lfdist.cli import main
from lfdist.model.tiny import build_tiny
from lfdist.plan import load_plan, save_plan
from tests.helpers import make_plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_DATA = ["--model", "tiny:llama", "--data", "synthetic:lm"]


def run_cli(*argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code


def refused(capsys, tmp_path, *argv) -> str:
    """Run argv; assert exit 2, one stderr line, nothing written under tmp_path; return the line."""
    before = sorted(os.walk(tmp_path))
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lfdist: error: "), err
    assert sorted(os.walk(tmp_path)) == before  # nothing written or removed
    return err[0][len("lfdist: error: ") :]


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "plan.yaml"
    save_plan(make_plan(build_tiny("llama", "lm"), ["frozen"] * 5 + ["full"] * 3), str(path))
    return str(path)


def test_seq_len_longer_than_the_model_is_refused_before_loading(tmp_path, capsys):
    line = refused(
        capsys, tmp_path, "probe", *MODEL_DATA, "--seq-len", "100000", "--out", str(tmp_path / "p")
    )
    assert line == (
        "--seq-len 100000 is longer than model 'tiny:llama' can read (512 positions, from its "
        "config); use --seq-len 512 or less"
    )


def test_seq_len_zero_is_refused(tmp_path, capsys):
    line = refused(
        capsys, tmp_path, "probe", *MODEL_DATA, "--seq-len", "0", "--out", str(tmp_path / "p")
    )
    assert line == "data.seq_len must be a positive number, got 0; e.g. data.seq_len=512"


@pytest.mark.parametrize(
    "override, line",
    [
        (
            "train.lr=.inf",
            "config key train.lr must be a finite number, got inf; e.g. train.lr=0.0001",
        ),
        (
            "train.lr=.nan",
            "config key train.lr must be a finite number, got nan; e.g. train.lr=0.0001",
        ),
        ("train.lr=-1e-4", "train.lr must be greater than 0, got -0.0001; e.g. train.lr=1e-4"),
        (
            "train.warmup_steps=-5",
            "train.warmup_steps must be 0 or more, got -5; e.g. train.warmup_steps=0",
        ),
        (
            "train.save_every=-1",
            "train.save_every must be 0 or more, got -1; e.g. train.save_every=0",
        ),
        ("train.steps=0", "train.steps must be a positive number, got 0; e.g. train.steps=1000"),
    ],
)
def test_bad_train_numbers(tmp_path, capsys, plan_file, override, line):
    argv = ["train", *MODEL_DATA, "--plan", plan_file, "--out", str(tmp_path / "run"), override]
    assert refused(capsys, tmp_path, *argv) == line


def test_config_whose_top_level_is_a_list(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("- model: {spec: tiny:llama}\n")
    line = refused(
        capsys,
        tmp_path,
        "probe",
        *MODEL_DATA,
        "--config",
        str(config),
        "--out",
        str(tmp_path / "p"),
    )
    assert "its top level is a list" in line


def test_probe_file_with_a_non_integer_block_count(tmp_path, capsys):
    probe = tmp_path / "probe.json"
    assert run_cli("probe", *MODEL_DATA, "--samples", "4", "--out", str(probe)) == 0
    d = json.loads(probe.read_text())
    d["model"]["n_blocks"] = "8.5"
    probe.write_text(json.dumps(d))
    capsys.readouterr()
    line = refused(
        capsys, tmp_path, "select", "--probe", str(probe), "--strategy", "top", "--out",
        str(tmp_path / "plan.yaml"),
    )  # fmt: skip
    assert "model n_blocks is '8.5', not the whole number of blocks" in line


def test_plan_show_on_a_folder_and_on_a_renamed_block(tmp_path, capsys, plan_file):
    assert refused(capsys, tmp_path, "plan", "show", str(tmp_path)) == (
        f"plan file {str(tmp_path)!r} is a folder, not a file; give the YAML file's path"
    )
    text = open(plan_file).read().replace("name: model.layers.6,", "name: model.layers.7,")
    open(plan_file, "w").write(text)
    assert "plan block 6 is named 'model.layers.7'" in refused(
        capsys, tmp_path, "plan", "show", plan_file
    )


def test_out_that_is_a_file_or_unwritable(tmp_path, capsys, plan_file):
    a_file = tmp_path / "taken"
    a_file.write_text("the user's")
    train = ["train", *MODEL_DATA, "--plan", plan_file]
    assert refused(capsys, tmp_path, *train, "--out", str(a_file)) == (
        f"--out {str(a_file)!r} is an existing file, not a folder; give a folder path"
    )
    assert refused(capsys, tmp_path, "export", "--checkpoint", str(tmp_path), "--out", str(a_file))
    # /proc takes no new files, even for root (whom permission bits do not stop).
    line = refused(capsys, tmp_path, *train, "--out", "/proc/lfdist-run")
    assert line.startswith("cannot write in '/proc' for '/proc/lfdist-run'")
    line = refused(capsys, tmp_path, "probe", *MODEL_DATA, "--out", "/proc/lfdist-probe.json")
    assert line.startswith("cannot write in '/proc'")
    assert a_file.read_text() == "the user's"


def test_binary_text_and_symlink_loop_as_data(tmp_path, capsys):
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    os.symlink(tmp_path / "loop-b", tmp_path / "loop-a")
    os.symlink(tmp_path / "loop-a", tmp_path / "loop-b")
    out = str(tmp_path / "p.json")
    probe = ["probe", "--model", "tiny:llama", "--out", out, "--data"]
    assert refused(capsys, tmp_path, *probe, str(binary)).startswith(f"{binary} is not text")
    assert refused(capsys, tmp_path, *probe, str(tmp_path / "loop-a")) == (
        f"data path {str(tmp_path / 'loop-a')!r} is a symlink loop; point --data at a real file "
        "or folder"
    )


def test_txt_of_plain_lines_probes(tmp_path, capsys):
    lines = tmp_path / "notes.txt"
    lines.write_text("\n".join(f"note {i}: plain text, no blank lines" for i in range(60)))
    out = tmp_path / "p.json"
    argv = ["probe", "--model", "tiny:llama", "--data", str(lines), "--seq-len", "32"]
    assert run_cli(*argv, "--samples", "8", "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert "data: 1 document(s), too few to hold out 10% by document" in err
    assert json.loads(out.read_text())["data"]["n_samples"] == 8


def test_bench_does_not_replace_results(tmp_path, capsys):
    (tmp_path / "probe.json").write_text("{}")
    line = refused(capsys, tmp_path, "bench", "probe", "--tiny", "--out", str(tmp_path))
    assert line == (
        f"{str(tmp_path / 'probe.json')!r} already exists; choose another --out or pass --overwrite"
    )
    script = os.path.join(ROOT, "benchmarks", "probe", "run.py")
    for argv in ([], ["--out", str(tmp_path)]):  # --out required; results kept
        proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
    assert (tmp_path / "probe.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["probe.json"]


def test_engine_single_runs_one_process(tmp_path, capsys, plan_file):
    argv = ["train", *MODEL_DATA, "--plan", plan_file, "--engine", "single", "--out"]
    assert run_cli(*argv, str(tmp_path / "run"), "--nproc", "2", "--dry-run") == 0
    out, err = capsys.readouterr()
    assert "--nproc-per-node 1 " in out and "--nproc-per-node 2" not in out
    assert err.strip().splitlines()[0] == (
        "lfdist: engine single runs 1 process (train.nproc=2 ignored)"
    )
    assert os.listdir(tmp_path / "run") == ["job.json"]  # what the printed command reads


# ---- what a run says -------------------------------------------------------------------------


def _tied_plan(tmp_path) -> str:
    """probe + select on tiny gemma, whose LM head is its input embedding."""
    probe, plan = str(tmp_path / "probe.json"), str(tmp_path / "plan.yaml")
    common = ["--model", "tiny:gemma", "--data", "synthetic:lm", "--seq-len", "32"]
    assert run_cli("probe", *common, "--samples", "8", "--out", probe) == 0
    assert (
        run_cli("select", "--probe", probe, "--strategy", "top", "--option", "n=2", "--out", plan)
        == 0
    )
    return plan


def test_tied_head_is_reported_and_stays_frozen(tmp_path, capsys):
    from lfdist.config import TrainConfig
    from lfdist.engines import build_engine
    from lfdist.engines.base import World
    from lfdist.model.apply import apply_plan
    from lfdist.train.feed import StepFeeder
    from lfdist.train.loop import train_loop

    plan = load_plan(_tied_plan(tmp_path))
    printed = capsys.readouterr().out
    assert plan.modules == {"embeddings": "frozen", "final_norm": "full", "head": "tied"}
    assert (
        "modules: embeddings frozen, final_norm full; head: tied to the frozen embeddings, not trained"
        in printed
    )
    # Gemma block: q,o 64x64 + k,v 64x32 + MLP 3 x 64x128 + 2 norms of 64 = 36,992.
    assert plan.predicted["params_trainable"] == 2 * 36_992 + 64  # 2 blocks + final norm

    model = build_tiny("gemma", "lm")
    embedding = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embedding  # tied
    before = embedding.detach().clone()
    top_before = model.model.layers[7].mlp.down_proj.weight.detach().clone()
    applied = apply_plan(model, plan)
    assert applied.trainable == 2 * 36_992 + 64
    tc = TrainConfig(engine="single", nproc=1, steps=3, batch_size=2, lr=1e-2, log_every=0)
    engine = build_engine("single", model, None, tc, World(0, 1, 0, torch.device("cpu")))
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    train_loop(
        engine,
        StepFeeder(data, 2, 1, 1, 0, 0),
        tc,
        World(0, 1, 0, torch.device("cpu")),
        0,
        save=lambda step: None,
    )
    assert torch.equal(model.get_input_embeddings().weight, before)  # bit-identical: not trained
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert not torch.equal(model.model.layers[7].mlp.down_proj.weight, top_before)  # trained


def test_eval_before_and_save_final_switch_off(tmp_path, capsys):
    plan = _tied_plan(tmp_path)
    run = tmp_path / "run"
    argv = ["train", "--model", "tiny:gemma", "--data", "synthetic:lm", "--seq-len", "32"]
    argv += [
        "--plan",
        plan,
        "--engine",
        "single",
        "--nproc",
        "1",
        "--steps",
        "2",
        "--out",
        str(run),
    ]
    argv += ["train.batch_size=2", "data.max_eval_examples=8"]
    argv += ["train.eval_before=false", "train.save_final=false"]
    assert run_cli(*argv) == 0
    printed = capsys.readouterr().out
    m = json.loads((run / "metrics.json").read_text())
    assert m["eval_before"] is None and m["eval"]["examples"] == 8  # evaluated after, not before
    assert os.listdir(run / "checkpoints") == []  # no final checkpoint
    assert m["params"]["trainable"] == 2 * 36_992 + 64
    assert "head: tied to the frozen embeddings, not trained" in printed
    assert "(before training" not in printed


def test_plan_show_png_is_not_written_over_a_file_or_into_nowhere(tmp_path, capsys, plan_file):
    mine = tmp_path / "mine.png"
    mine.write_text("the user's")
    show = ["plan", "show", plan_file, "--png"]
    assert refused(capsys, tmp_path, *show, str(mine)) == (
        f"--png {str(mine)!r} already exists; choose another --out or delete it first"
    )
    assert refused(capsys, tmp_path, *show, str(tmp_path / "no" / "p.png")).startswith(
        f"folder {str(tmp_path / 'no')!r} for"
    )
    assert refused(capsys, tmp_path, *show, "/proc/p.png").startswith("cannot write in '/proc'")
    assert mine.read_text() == "the user's"


def test_missing_cache_spill_dir_is_refused_before_out_exists(tmp_path, capsys, plan_file):
    spill = tmp_path / "nowhere"
    argv = ["train", *MODEL_DATA, "--plan", plan_file, "--out", str(tmp_path / "run")]
    argv += ["--cache-frozen-prefix", f"train.cache_spill_dir={spill}"]
    assert refused(capsys, tmp_path, *argv) == (
        f"train.cache_spill_dir {str(spill)!r} is not a folder; create it"
    )
