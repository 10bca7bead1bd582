"""Checkpoints in one process (engine `single`, no process group): the format round-trips, a
tampered or incomplete checkpoint is refused, nothing is unpickled beyond plain data, a
non-finite state is never written, and a --resume that changes the run is refused."""

import json
import os
import pickle

import pytest
import torch

from lfdist.config import TrainConfig, config_from_dict
from lfdist.engines import build_engine
from lfdist.engines.base import World
from lfdist.errors import UserError
from lfdist.model.apply import apply_plan
from lfdist.model.tiny import build_tiny
from lfdist.plan import save_plan
from lfdist.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify,
)
from lfdist.train.resume import check_resume
from tests.helpers import make_plan

PREFIX = ["frozen"] * 5 + ["full"] * 3
WORLD = World(0, 1, 0, torch.device("cpu"))
PWNED = "lfdist-pwned"


def _engine(treatments=PREFIX, seed=0):
    torch.manual_seed(seed)
    model = build_tiny("llama", "lm")
    apply_plan(model, make_plan(model, treatments))
    return build_engine("single", model, None, TrainConfig(engine="single", lr=1e-2), WORLD)


def _step(engine, seed=0):
    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(seed))
    engine.micro_step({"input_ids": x, "labels": x}, 1.0)
    engine.optimizer_step()


def _cfg(**train):
    return config_from_dict(
        {
            "model": {"spec": "tiny:llama"},
            "data": {"spec": "synthetic:lm:200", "seq_len": 32},
            "train": {"engine": "single", "nproc": 1, "steps": 6, "lr": 1e-2, **train},
        }
    )


@pytest.fixture
def saved(tmp_path):
    """A run folder with one checkpoint after 2 steps; its engine and plan path."""
    engine = _engine()
    for i in range(2):
        _step(engine, i)
    plan = str(tmp_path / "plan.yaml")
    save_plan(make_plan(build_tiny("llama", "lm"), PREFIX), plan)
    root = str(tmp_path / "run" / "checkpoints")
    extra = {"engine": "single", "model": {"spec": "tiny:llama", "task": "lm", "dtype": "float32"}}
    extra["config"] = _cfg().to_dict()
    folder = save_checkpoint(root, 2, engine, WORLD, plan, extra)
    return engine, folder, plan, root


def _rewrite_checksums(folder):
    """What an attacker can do: the manifest sits in the same folder, so it can be recomputed."""
    from lfdist.train.checkpoint import CHECKSUMS, _all_files, _sha256

    sums = {f: _sha256(os.path.join(folder, f)) for f in _all_files(folder)}
    with open(os.path.join(folder, CHECKSUMS), "w") as f:
        json.dump(sums, f)


class _RunsCode:
    def __reduce__(self):
        return (os.mkdir, (os.path.join(os.environ["LFDIST_TEST_PWNED"], PWNED),))


def test_round_trip_restores_weights_optimizer_schedule_and_rng(saved):
    engine, folder, _, root = saved
    assert latest_checkpoint(root) == folder
    assert sorted(os.listdir(folder)) == [
        "checksums.json",
        "dcp",
        "plan.yaml",
        "rng-rank0.pt",
        "scheduler.json",
        "state.json",
    ]
    weights = {k: v.clone() for k, v in engine.full_trainable_state().items()}
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    fresh = _engine(seed=7)
    torch.manual_seed(999)
    state = load_checkpoint(folder, fresh, WORLD)
    assert state["step"] == state["data_position"] == 2
    got = fresh.full_trainable_state()
    assert got.keys() == weights.keys() and len(got) == 29
    assert all(torch.equal(got[k], weights[k]) for k in got)
    assert fresh.scheduler.state_dict()["last_epoch"] == 2
    # The restored torch RNG is the saved one: its next draw is what it drew at save time.
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), expected_draw)
    # One more step from both gives the same weights: AdamW's moments came back too.
    _step(engine, 5)
    _step(fresh, 5)
    after, again = engine.full_trainable_state(), fresh.full_trainable_state()
    assert all(torch.equal(after[k], again[k]) for k in after)


def test_manifest_must_list_every_file(saved):
    _, folder, _, _ = saved
    sums_path = os.path.join(folder, "checksums.json")
    with open(sums_path) as f:
        sums = json.load(f)
    # One entry removed and that file flipped: was accepted before.
    del sums["state.json"]
    with open(sums_path, "w") as f:
        json.dump(sums, f)
    with open(os.path.join(folder, "state.json"), "a") as f:
        f.write(" ")
    with pytest.raises(UserError, match=r"'state.json' is not listed"):
        verify(folder)


def test_manifest_entry_without_file_and_flipped_file_are_refused(saved):
    _, folder, _, _ = saved
    os.remove(os.path.join(folder, "scheduler.json"))
    with pytest.raises(UserError, match=r"'scheduler.json' is listed but absent"):
        verify(folder)
    _rewrite_checksums(folder)
    verify(folder)
    shard = os.path.join(folder, "dcp", "__0_0.distcp")
    data = bytearray(open(shard, "rb").read())
    data[100] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(UserError, match="corrupt"):
        verify(folder)


@pytest.mark.parametrize("name", ["../../elsewhere", "/tmp", "step-000002/..", "step-2", ""])
def test_latest_names_only_a_step_folder_inside_the_root(saved, name):
    _, _, _, root = saved
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(name)
    with pytest.raises(UserError, match="not a step-NNNNNN checkpoint folder"):
        latest_checkpoint(root)


def test_latest_may_not_be_a_link_out_of_the_root(saved, tmp_path):
    _, folder, _, root = saved
    os.rename(folder, str(tmp_path / "outside"))
    os.symlink(str(tmp_path / "outside"), folder)
    with pytest.raises(UserError, match="not a step-NNNNNN checkpoint folder"):
        latest_checkpoint(root)


def test_crafted_rng_file_does_not_run_code(saved, tmp_path, monkeypatch):
    _, folder, _, _ = saved
    monkeypatch.setenv("LFDIST_TEST_PWNED", str(tmp_path))
    torch.save({"python": _RunsCode(), "torch": torch.get_rng_state()}, f"{folder}/rng-rank0.pt")
    _rewrite_checksums(folder)
    with pytest.raises(UserError, match="not an RNG state lfdist wrote"):
        load_checkpoint(folder, _engine(), WORLD)
    assert not os.path.exists(tmp_path / PWNED)


def test_crafted_dcp_index_does_not_run_code(saved, tmp_path, monkeypatch):
    _, folder, _, _ = saved
    monkeypatch.setenv("LFDIST_TEST_PWNED", str(tmp_path))
    with open(os.path.join(folder, "dcp", ".metadata"), "wb") as f:
        pickle.dump(_RunsCode(), f)
    _rewrite_checksums(folder)
    with pytest.raises(UserError, match="not a checkpoint index"):
        load_checkpoint(folder, _engine(), WORLD)
    assert not os.path.exists(tmp_path / PWNED)


def test_non_finite_weights_are_never_checkpointed(saved):
    engine, folder, plan, root = saved
    with torch.no_grad():
        next(p for p in engine.model.parameters() if p.requires_grad)[0, 0] = float("inf")
    with pytest.raises(UserError, match="not finite after step 3; no checkpoint written"):
        save_checkpoint(root, 3, engine, WORLD, plan, {"engine": "single"})
    assert sorted(os.listdir(root)) == ["latest", "step-000002"]
    assert latest_checkpoint(root) == folder


def test_resume_with_another_plan_is_refused(saved, tmp_path):
    _, folder, _, _ = saved
    one_more = make_plan(build_tiny("llama", "lm"), ["frozen"] * 4 + ["full"] * 4)
    with pytest.raises(
        UserError,
        match=r"plan's treatments differ from the checkpoint's \(block 4: frozen in the "
        r"checkpoint, full now\);.*--overwrite",
    ):
        check_resume(folder, _cfg().to_dict(), one_more)


def test_resume_with_a_changed_lr_is_refused_and_harmless_changes_are_applied(saved):
    _, folder, _, _ = saved
    plan = make_plan(build_tiny("llama", "lm"), PREFIX)
    with pytest.raises(UserError, match=r"train.lr is 0.002 but the checkpoint's run used 0.01"):
        check_resume(folder, _cfg(lr=2e-3).to_dict(), plan)
    with pytest.raises(UserError, match=r"train.steps is 8 but the checkpoint's run used 6"):
        check_resume(folder, _cfg(steps=8).to_dict(), plan)
    assert check_resume(folder, _cfg(save_every=2, log_every=3).to_dict(), plan) == [
        "train.log_every: 1 -> 3",
        "train.save_every: 0 -> 2",
    ]
    # Another world size with the same global batch may resume (where the engine reshards).
    assert check_resume(folder, _cfg(nproc=2, batch_size=2).to_dict(), plan) == [
        "train.batch_size: 4 -> 2",
        "train.nproc: 1 -> 2",
    ]
    with pytest.raises(UserError, match=r"train.nproc is 2 but the checkpoint's run used 1"):
        check_resume(folder, _cfg(nproc=2).to_dict(), plan)


def test_resuming_a_finished_run_says_so(saved):
    engine, _, plan_path, root = saved
    extra = {"engine": "single", "config": _cfg().to_dict()}
    folder = save_checkpoint(root, 6, engine, WORLD, plan_path, extra)
    plan = make_plan(build_tiny("llama", "lm"), PREFIX)
    with pytest.raises(UserError, match=r"already finished \(step 6 of 6\); nothing to resume"):
        check_resume(folder, _cfg().to_dict(), plan)
    # Through the launcher: one line, and the finished run's metrics stay as they were (before,
    # a StatisticsError came after metrics.json had been rewritten).
    from lfdist.launch.run import validate

    out = os.path.dirname(root)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        f.write('{"losses": {"5": 1.0}}')
    with pytest.raises(UserError, match=r"already finished \(step 6 of 6\)"):
        validate(_cfg(), plan_path, out, resume=True)
    assert open(os.path.join(out, "metrics.json")).read() == '{"losses": {"5": 1.0}}'


def test_a_rank_lost_after_the_final_checkpoint_is_not_sent_to_resume(saved, capsys):
    """The line for a dead rank or a signal offers --resume only when there is something left
    to resume; after the run's last checkpoint it says the run is complete and how to export."""
    from lfdist.errors import JobFailed
    from lfdist.launch.run import check_ended

    engine, _, plan_path, root = saved
    out = os.path.dirname(root)
    term = 15  # SIGTERM, no rank report, no metrics.json
    with pytest.raises(JobFailed, match=r"^stopped by SIGTERM; continue with: "):
        check_ended(out, 1, term, range(0), steps=6)  # step 2 of 6 saved: resume
    save_checkpoint(root, 6, engine, WORLD, plan_path, {"engine": "single"})
    with pytest.raises(JobFailed) as e:
        check_ended(out, 1, term, range(0), steps=6)
    assert str(e.value).endswith(
        f"its final checkpoint (step 6) is saved, so the run is complete: export it with "
        f"`lfdist export --checkpoint {out}`"
    )


def test_resume_keeps_the_checkpoints_save_every_unless_given(saved, capsys):
    """Left out of the resume's command line, train.save_every is the checkpoint's (it fell
    back to 0 before, and the resumed run wrote no periodic checkpoints); given, it applies."""
    from lfdist.launch.run import keep_checkpoint_settings

    engine, _, plan_path, root = saved
    out = os.path.dirname(root)
    save_checkpoint(
        root,
        4,
        engine,
        WORLD,
        plan_path,
        {"engine": "single", "config": _cfg(save_every=2).to_dict()},
    )
    kept = keep_checkpoint_settings(_cfg(), out, resume=True)
    assert kept.train.save_every == 2 and kept.train.lr == _cfg().train.lr
    assert capsys.readouterr().out == (
        "lfdist: resume keeps the checkpoint's train.save_every=2 (give train.save_every=N to "
        "change it)\n"
    )
    assert keep_checkpoint_settings(_cfg(save_every=3), out, resume=True).train.save_every == 3
    assert keep_checkpoint_settings(_cfg(), out, resume=False).train.save_every == 0
    plan = make_plan(build_tiny("llama", "lm"), PREFIX)
    folder = os.path.join(root, "step-000004")
    assert check_resume(folder, kept.to_dict(), plan) == []  # nothing "applied": kept


def test_launcher_refuses_a_changed_plan_before_writing(saved, tmp_path):
    from lfdist.launch.run import validate

    _, _, _, root = saved
    out = os.path.dirname(root)
    one_more = str(tmp_path / "one-more.yaml")
    save_plan(make_plan(build_tiny("llama", "lm"), ["frozen"] * 4 + ["full"] * 4), one_more)
    before = sorted(os.listdir(out))
    with pytest.raises(UserError, match=r"block 4: frozen in the checkpoint, full now"):
        validate(_cfg(), one_more, out, resume=True)
    assert sorted(os.listdir(out)) == before == ["checkpoints"]


def test_launcher_refuses_deepspeed_on_another_world_size_but_not_fsdp2(tmp_path):
    from lfdist.launch.run import check_resumable

    folder = tmp_path / "step-000003"
    folder.mkdir()
    for engine, can in (("deepspeed", False), ("fsdp2", True), ("fsdp1", True), ("ddp", True)):
        (folder / "state.json").write_text(
            json.dumps({"step": 3, "engine": engine, "world_size": 2})
        )
        cfg = _cfg(engine=engine, nproc=1)
        if can:
            check_resumable(str(folder), cfg, 1)
        else:
            with pytest.raises(
                UserError, match=r"written by 2 ranks .* deepspeed cannot reshard.*--nproc 2$"
            ):
                check_resumable(str(folder), cfg, 1)


@pytest.mark.deepspeed
def test_deepspeed_files_load_weights_only(tmp_path, monkeypatch):
    """DeepSpeed's own loader (torch.load weights_only=False) is replaced while lfdist loads:
    its plain-data classes load, a crafted object is refused before it runs."""
    from types import SimpleNamespace

    from deepspeed.runtime.zero.config import ZeroStageEnum

    from lfdist.engines.deepspeed import _load_weights_only

    class Engine:
        def load(self, path, map_location=None):
            return torch.load(path, weights_only=False)

    engine = SimpleNamespace(checkpoint_engine=Engine())
    good, bad = str(tmp_path / "good.pt"), str(tmp_path / "bad.pt")
    torch.save({"stage": ZeroStageEnum.weights, "t": torch.ones(2)}, good)
    monkeypatch.setenv("LFDIST_TEST_PWNED", str(tmp_path))
    torch.save({"x": _RunsCode()}, bad)
    restore = _load_weights_only(engine)
    try:
        assert engine.checkpoint_engine.load(good)["stage"] == ZeroStageEnum.weights
        with pytest.raises(UserError, match="holds objects that are not plain data"):
            engine.checkpoint_engine.load(bad)
    finally:
        restore()
    assert not os.path.exists(tmp_path / PWNED)
    assert "load" not in vars(engine.checkpoint_engine)  # DeepSpeed's own method is back


def test_resume_of_a_run_from_before_train_precision():
    from lfdist.config import config_from_dict
    from lfdist.train.resume import check_settings

    old = config_from_dict({"model": {"dtype": "bfloat16"}}).to_dict()
    for key in ("precision", "compile", "report_to", "cpu_lean_malloc"):
        del old["train"][key]  # a checkpoint written before these settings existed
    state = {"step": 2, "config": old}
    now = config_from_dict({"model": {"dtype": "bfloat16"}, "train": {"report_to": "none"}})
    # that run trained in pure bf16: resuming it in bf16-mixed would change what it computes
    with pytest.raises(UserError, match='resume with train.precision="bf16"'):
        check_settings(state, now.to_dict())
    same = config_from_dict({"model": {"dtype": "bfloat16"}, "train": {"precision": "bf16"}})
    assert check_settings(state, same.to_dict()) == [
        "train.compile: None -> False",
        "train.cpu_lean_malloc: None -> False",
        "train.report_to: None -> 'none'",
    ]


def test_only_deepspeed_runs_record_a_zero_stage():
    from lfdist.config import config_from_dict
    from lfdist.train.resume import check_settings

    fsdp2 = config_from_dict({"train": {"engine": "fsdp2"}})
    assert "zero_stage" not in fsdp2.record()["train"]  # job.json, state.json, trackers
    assert config_from_dict(fsdp2.record()) == fsdp2  # the job file reads back the same config
    ds = config_from_dict({"train": {"engine": "deepspeed", "zero_stage": 3}})
    assert ds.record()["train"]["zero_stage"] == 3
    # a checkpoint from before record() kept the unused default: not a changed setting
    state = {"step": 2, "config": fsdp2.to_dict()}
    assert check_settings(state, fsdp2.record()) == []
    with pytest.raises(UserError, match="train.zero_stage is 2"):
        check_settings(
            {"step": 2, "config": ds.record()},
            config_from_dict({"train": {"engine": "deepspeed"}}).record(),
        )
