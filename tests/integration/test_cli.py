"""The CLI contract: every bad input is one line, exit code 2, and nothing written or overwritten.
Then the end-to-end path probe -> select -> train (2 ranks, FSDP2) -> export -> eval."""

import json
import os
import subprocess
import sys

import pytest

from lfdist.cli import main
from lfdist.errors import UserError
from lfdist.model.tiny import build_tiny
from lfdist.plan import save_plan
from tests.helpers import make_plan


def run_cli(*argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code


def assert_user_error(capsys, argv, needle, tmp_path):
    before = sorted(os.listdir(tmp_path))
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lfdist: error: "), err
    assert needle in err[0], err[0]
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "plan.yaml"
    save_plan(make_plan(build_tiny("llama", "lm"), ["frozen"] * 5 + ["full"] * 3), str(path))
    return str(path)


def test_unknown_model_spec(tmp_path, capsys):
    assert_user_error(
        capsys,
        [
            "probe",
            "--model",
            "tinyy:llama",
            "--data",
            "synthetic:lm",
            "--out",
            str(tmp_path / "p.json"),
        ],
        "unknown model spec",
        tmp_path,
    )


def test_unknown_tiny_arch(tmp_path, capsys):
    assert_user_error(
        capsys,
        [
            "probe",
            "--model",
            "tiny:t5",
            "--data",
            "synthetic:lm",
            "--out",
            str(tmp_path / "p.json"),
        ],
        "unknown tiny architecture",
        tmp_path,
    )


def test_missing_model_path(tmp_path, capsys):
    assert_user_error(
        capsys,
        [
            "probe",
            "--model",
            str(tmp_path / "nope"),
            "--data",
            "synthetic:lm",
            "--out",
            str(tmp_path / "p.json"),
        ],
        "does not exist",
        tmp_path,
    )


def test_missing_data_path(tmp_path, capsys):
    assert_user_error(
        capsys,
        [
            "probe",
            "--model",
            "tiny:llama",
            "--data",
            str(tmp_path / "none.jsonl"),
            "--out",
            str(tmp_path / "p.json"),
        ],
        "does not exist",
        tmp_path,
    )


def test_empty_data(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    assert_user_error(
        capsys,
        [
            "probe",
            "--model",
            "tiny:llama",
            "--data",
            str(tmp_path / "empty.txt"),
            "--out",
            str(tmp_path / "p.json"),
        ],
        "empty",
        tmp_path,
    )


def test_unknown_config_key(tmp_path, capsys):
    assert_user_error(
        capsys,
        [
            "probe",
            "--model",
            "tiny:llama",
            "--data",
            "synthetic:lm",
            "--out",
            str(tmp_path / "p.json"),
            "probe.sampels=3",
        ],
        "unknown config key probe.sampels",
        tmp_path,
    )


def test_malformed_yaml_config(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("train: [1,\n")
    assert_user_error(capsys, ["run", str(tmp_path / "bad.yaml")], "not valid YAML", tmp_path)


def test_malformed_plan(tmp_path, capsys):
    (tmp_path / "plan.yaml").write_text("blocks: {\n")
    assert_user_error(
        capsys, ["plan", "show", str(tmp_path / "plan.yaml")], "not valid YAML", tmp_path
    )


def test_plan_model_mismatch(tmp_path, capsys, plan_file):
    assert_user_error(
        capsys,
        [
            "train",
            "--model",
            "tiny:gpt2",
            "--data",
            "synthetic:lm",
            "--plan",
            plan_file,
            "--out",
            str(tmp_path / "run"),
        ],
        "plan was made for model LlamaForCausalLM",
        tmp_path,
    )


def test_unknown_strategy(tmp_path, capsys):
    assert (
        run_cli(
            "probe",
            "--model",
            "tiny:llama",
            "--data",
            "synthetic:lm:40",
            "--samples",
            "8",
            "--out",
            str(tmp_path / "p.json"),
        )
        == 0
    )
    capsys.readouterr()
    assert_user_error(
        capsys,
        [
            "select",
            "--probe",
            str(tmp_path / "p.json"),
            "--strategy",
            "magic",
            "--out",
            str(tmp_path / "plan.yaml"),
        ],
        "unknown strategy 'magic'",
        tmp_path,
    )
    assert_user_error(
        capsys,
        [
            "select",
            "--probe",
            str(tmp_path / "p.json"),
            "--strategy",
            "top",
            "--budget",
            "params=0.0001",
            "--out",
            str(tmp_path / "plan.yaml"),
        ],
        "infeasible",
        tmp_path,
    )


def test_existing_outputs_are_not_overwritten(tmp_path, capsys):
    out = tmp_path / "p.json"
    out.write_text("keep me")
    assert_user_error(
        capsys,
        ["probe", "--model", "tiny:llama", "--data", "synthetic:lm", "--out", str(out)],
        "already exists",
        tmp_path,
    )
    assert out.read_text() == "keep me"


def test_argparse_errors_are_one_line_exit_2(tmp_path, capsys):
    assert_user_error(capsys, ["train", "--model", "tiny:llama"], "required", tmp_path)
    assert_user_error(capsys, ["frobnicate"], "invalid choice", tmp_path)


def test_dry_run_prints_the_launch_command(capsys, plan_file, tmp_path):
    assert (
        run_cli(
            "train",
            "--model",
            "tiny:llama",
            "--data",
            "synthetic:lm",
            "--plan",
            plan_file,
            "--engine",
            "deepspeed",
            "--nproc",
            "2",
            "--out",
            str(tmp_path / "run"),
            "--dry-run",
        )
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert (
        "deepspeed.launcher.runner" in line
        and "--num_gpus 2" in line
        and "DS_ACCELERATOR=cpu" in line
    )
    # the job file the command names is written (and nothing else), so the line runs as printed
    assert sorted(os.listdir(tmp_path / "run")) == ["job.json"]
    assert str(tmp_path / "run" / "job.json") in line


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "lfdist.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for cmd in ("probe", "select", "plan", "train", "run", "export", "eval", "bench"):
        assert cmd in out.stdout


def test_end_to_end_probe_select_train_export(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    probe, plan, run, hf = (str(tmp_path / n) for n in ("probe.json", "plan.yaml", "run", "hf"))
    data = ["--data", "synthetic:lm:300", "--seq-len", "32"]
    assert run_cli("probe", "--model", "tiny:llama", *data, "--samples", "32", "--out", probe) == 0
    assert (
        run_cli("select", "--probe", probe, "--strategy", "top", "--option", "n=3", "--out", plan)
        == 0
    )
    assert (
        run_cli(
            "train",
            "--model",
            "tiny:llama",
            *data,
            "--plan",
            plan,
            "--engine",
            "fsdp2",
            "--nproc",
            "2",
            "--steps",
            "3",
            "--out",
            run,
            "train.batch_size=2",
        )
        == 0
    )
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics["per_rank"][0]["backward_blocks"] == [5, 6, 7]
    assert not os.path.exists(os.path.join(run, ".lock"))  # released with the job
    assert (
        sum(r["after_step"]["optimizer_state_elements"] for r in metrics["per_rank"])
        == 2 * metrics["params"]["trainable"]
    )
    assert run_cli("export", "--checkpoint", run, "--out", hf) == 0
    model = AutoModelForCausalLM.from_pretrained(hf)
    base = build_tiny("llama", "lm")
    frozen = [
        n
        for n, _ in base.named_parameters()
        if n.startswith(tuple(f"model.layers.{i}." for i in range(5)))
    ]
    sd, bd = model.state_dict(), base.state_dict()
    assert frozen and all(
        (sd[n] == bd[n]).all() for n in frozen
    )  # frozen blocks equal the base bit for bit
    assert any(not (sd[n] == bd[n]).all() for n in sd if n.startswith("model.layers.7."))
    capsys.readouterr()
    assert run_cli("eval", "--model", hf, *data) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == hf and result["data"] == data[1]  # it says what it scored
    assert result["loss"] == pytest.approx(
        metrics["eval"]["loss"], rel=1e-5
    )  # same model, same held-out set


def test_run_compare_full_skips_a_second_identical_run(tmp_path, capsys):
    """A plan that trains every block is full fine-tuning: --compare-full says so instead of
    training the same thing twice."""
    cfg = tmp_path / "all.yaml"
    cfg.write_text(
        "model: {spec: 'tiny:llama', task: lm}\n"
        "data: {spec: 'synthetic:lm:64', seq_len: 32}\n"
        "probe: {samples: 8}\n"
        "select: {strategy: all}\n"
        "train: {engine: single, nproc: 1, steps: 2, batch_size: 2, lr: 1.0e-3}\n"
        f"out: {tmp_path / 'run'}\n"
    )
    assert run_cli("run", str(cfg), "--compare-full") == 0
    assert "so it IS full fine-tuning; no second run" in capsys.readouterr().out
    with open(tmp_path / "run" / "summary.json") as f:
        summary = json.load(f)
    assert summary["full_same_as_plan"] is True and "full" not in summary
    assert not (tmp_path / "run" / "train-all").exists()


def test_dry_run_line_runs_as_printed(capsys, plan_file, tmp_path):
    argv = ["train", "--model", "tiny:llama", "--data", "synthetic:lm:32", "--plan", plan_file]
    argv += ["--engine", "single", "--steps", "2", "--out", str(tmp_path / "run"), "--dry-run"]
    assert run_cli(*argv) == 0
    line = capsys.readouterr().out.strip()
    done = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["losses"]) == 2


def test_version_typo_hint_and_overrides_anywhere(capsys, plan_file, tmp_path):
    from lfdist import __version__

    assert run_cli("--version") == 0
    assert capsys.readouterr().out.strip() == f"lfdist {__version__}"
    assert_user_error(
        capsys,
        ["train", "--modle", "tiny:llama", "--data", "synthetic:lm", "--plan", plan_file],
        "(--modle is not a flag here: did you mean --model?)",
        tmp_path,
    )
    # dotted overrides before, between and after flags: all of them reach the config
    argv = ["train", "train.steps=2", "--model", "tiny:llama", "train.lr=1e-3", "--data"]
    argv += ["synthetic:lm:32", "--plan", plan_file, "--engine", "single", "train.batch_size=2"]
    assert run_cli(*argv, "--out", str(tmp_path / "run"), "--dry-run") == 0
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    train = job["config"]["train"]
    assert (train["steps"], train["lr"], train["batch_size"]) == (2, 1e-3, 2)


def test_two_ranks_on_an_empty_cache_write_the_tiny_model_once(tmp_path):
    # Issue 18: on an empty LFDIST_CACHE rank 1 read the tiny model's folder while rank 0 was
    # still writing it. The folder now appears whole (written aside, renamed under a lock).
    plan = tmp_path / "plan.yaml"
    save_plan(make_plan(build_tiny("llama", "lm"), ["frozen"] * 6 + ["full"] * 2), str(plan))
    env = dict(os.environ, LFDIST_CACHE=str(tmp_path / "empty-cache"))
    cmd = [sys.executable, "-m", "lfdist.cli", "train", "--model", "tiny:llama", "--data"]
    cmd += ["synthetic:lm:32", "--plan", str(plan), "--engine", "fsdp2", "--nproc", "2"]
    cmd += ["--steps", "2", "--out", str(tmp_path / "run"), "train.eval_before=false"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    names = sorted(os.listdir(tmp_path / "empty-cache" / "tiny"))
    folders = [n for n in names if not n.endswith(".lock")]
    assert len(folders) == 1 and folders[0].startswith("llama-lm-")  # no half-written copy left


def test_mistyped_local_path_is_one_line_without_asking_the_hub(capsys, tmp_path, monkeypatch):
    import socket
    import time

    def no_network(*args, **kwargs):
        raise AssertionError("a spec whose first component is a local folder asked the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    t0 = time.perf_counter()
    argv = ["eval", "--model", "runs/nothere", "--data", "synthetic:lm"]
    assert_user_error(capsys, argv, "model path 'runs/nothere' does not exist", tmp_path)
    assert time.perf_counter() - t0 < 10


def test_overrides_join_the_command_wherever_they_sit():
    from lfdist.cli import _parse

    # the quick start's own line: a top-level override between the config and a flag
    args = _parse(["run", "configs/quickstart.yaml", "out=runs/q", "--compare-full", "train.lr=1"])
    assert args.config == "configs/quickstart.yaml" and args.compare_full
    assert args.overrides == ["out=runs/q", "train.lr=1"]
    with pytest.raises(UserError, match="export takes no config overrides"):
        _parse(["export", "--checkpoint", "a", "--out", "b", "train.lr=1"])


def test_model_and_data_may_come_from_the_config(tmp_path):
    from lfdist.cli import _parse

    both = tmp_path / "both.yaml"
    both.write_text("model: {spec: 'tiny:llama'}\ndata: {spec: 'synthetic:lm'}\n")
    args = _parse(["probe", "--config", str(both), "--out", "p.json"])
    assert args.model is None and args.data is None  # the config's, merged later
    no_data = tmp_path / "model-only.yaml"
    no_data.write_text("model: {spec: 'tiny:llama'}\n")
    with pytest.raises(UserError) as e:
        _parse(["probe", "--config", str(no_data), "--out", "p.json"])
    assert str(e.value) == (
        "the following arguments are required: --data (or data.spec in --config); see "
        "`lfdist probe --help`"
    )
    assert _parse(["probe", "--config", str(no_data), "data.spec=synthetic:lm", "--out", "p"])
    with pytest.raises(UserError, match=r"required: --model, --data \(or model.spec in"):
        _parse(["train", "--plan", "p.yaml", "--out", "r"])
    with pytest.raises(UserError, match=r"\(--modle is not a flag here: did you mean --model\?\)"):
        _parse(["eval", "--modle", "tiny:llama", "--data", "synthetic:lm"])
