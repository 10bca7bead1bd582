"""What a --resume may change, decided from a checkpoint's state.json and plan.yaml alone.

A resumed run continues the run that wrote the checkpoint, so it keeps what shaped that run:
the plan (fingerprint, treatments, module groups, options), the model, the training data and
every optimizer or schedule setting (`train.lr`, `train.steps`, batch, seed, ...). A change to
one of those is refused in one line; --overwrite starts the run over instead. Settings that
only change how the run is carried out, not what it computes, may change on a resume
(`MAY_CHANGE`); they are applied and printed. The world size may change where the engine
reshards (DDP, FSDP1, FSDP2; not DeepSpeed) if the global batch (nproc x batch_size x
grad_accum) stays the same. A checkpoint of the run's last step is a
finished run: nothing to resume, said in one line.

Stdlib only (plus the plan reader): the launching process checks before anything is written,
and every rank checks again before it loads.
"""

from __future__ import annotations

import json
import os

from lfdist.errors import UserError

# How the run is carried out, not what it computes: a resume applies the new value.
MAY_CHANGE = (
    "out",
    "probe.",
    "select.",
    "data.eval_spec",
    "data.max_eval_examples",
    "train.launcher",
    "train.save_every",
    "train.log_every",
    "train.eval_before",
    "train.save_final",
    "train.activation_checkpointing",
    "train.cache_frozen_prefix",
    "train.cache_max_gib",
    "train.zero3_replicate_frozen",
    "train.report_to",
    "train.compile",
    "train.cpu_lean_malloc",
)


# May change, but a resume keeps the checkpoint's value unless it is given again (a value other
# than the default): left out of the resume's command line, save_every would fall back to 0 and
# silently turn the run's periodic checkpoints off.
KEEP_UNLESS_GIVEN = ("train.save_every",)


def kept_settings(state: dict, config: dict, defaults: dict) -> dict[str, object]:
    """{key: the checkpoint's value} for KEEP_UNLESS_GIVEN settings the resume left at their
    default (`defaults`: a config with every default, flattened the same way)."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        return {}
    old, new, base = _flat(saved), _flat(config), _flat(defaults)
    return {
        k: old[k]
        for k in KEEP_UNLESS_GIVEN
        if k in old and new.get(k) == base.get(k) and old[k] != new.get(k)
    }


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("budget", "options"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _may_change(key: str) -> bool:
    return any(key == m or (m.endswith(".") and key.startswith(m)) for m in MAY_CHANGE)


def read_state(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(
            f"checkpoint {folder!r} has no readable state.json ({e}); resume from an earlier one"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(
            f"checkpoint {folder!r} has a malformed state.json; resume from an earlier one"
        )
    return state


def check_plan(folder: str, plan) -> None:
    """The plan is part of the checkpoint: resuming with another one is refused."""
    from lfdist.plan import load_plan

    saved = load_plan(os.path.join(folder, "plan.yaml"))
    fix = (
        f"resume with the checkpoint's plan ({os.path.join(folder, 'plan.yaml')}) or start the "
        "run over with --overwrite"
    )
    if saved.fingerprint != plan.fingerprint:
        raise UserError(
            f"--resume: the plan is for model {plan.fingerprint.short()} but the checkpoint's "
            f"plan is for {saved.fingerprint.short()}; {fix}"
        )
    for what, old, new in (
        ("treatments", saved.treatments, plan.treatments),
        ("modules", saved.modules, plan.modules),
        ("options", saved.options, plan.options),
    ):
        if old != new:
            where = _first_difference(old, new)
            raise UserError(
                f"--resume: the plan's {what} differ from the checkpoint's ({where}); {fix}"
            )


def _first_difference(old, new) -> str:
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        i = next(i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b)
        return f"block {i}: {old[i]} in the checkpoint, {new[i]} now"
    if isinstance(old, dict) and isinstance(new, dict):
        key = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))[0]
        return f"{key}: {old.get(key)!r} in the checkpoint, {new.get(key)!r} now"
    return f"{old!r} in the checkpoint, {new!r} now"


def check_settings(state: dict, config: dict) -> list[str]:
    """Refuse a changed setting that shapes the run; return the changes a resume applies."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        return []  # written before checkpoints recorded their settings
    old, new = _ours(_flat(saved)), _ours(_flat(config))
    if "train.precision" not in old:  # before train.precision, bf16 models trained pure bf16
        old["train.precision"] = "bf16" if old.get("model.dtype") == "bfloat16" else "auto"
    applied = []
    batch = ("train.nproc", "train.batch_size", "train.grad_accum")
    reshaped = _global_batch(old) == _global_batch(new)
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if _may_change(key) or (reshaped and key in batch):
            if key != "out":
                applied.append(f"{key}: {a!r} -> {b!r}")
            continue
        raise UserError(
            f"--resume: {key} is {b!r} but the checkpoint's run used {a!r}; a resumed run keeps "
            f"the settings it started with: resume with {key}={json.dumps(a)}, or start the run "
            "over with --overwrite"
        )
    return applied


def _ours(flat: dict) -> dict:
    # Checkpoints before RunConfig.record() kept the unused default train.zero_stage=2 of a
    # non-DeepSpeed run: it shaped nothing, so it is not compared.
    if flat.get("train.engine") != "deepspeed":
        flat.pop("train.zero_stage", None)
    return flat


def _global_batch(flat: dict) -> object:
    # What the optimizer sees per step: ranks x micro-batch x accumulation. Another world size
    # may resume (where the engine reshards) if it keeps this product.
    try:
        return flat["train.nproc"] * flat["train.batch_size"] * flat["train.grad_accum"]
    except (KeyError, TypeError):
        return None


# DCP reshards the native engines' checkpoints; DeepSpeed's ZeRO partitions do not.
RESHARDS = ("ddp", "single", "fsdp2", "fsdp1")


def check_writer(state: dict, folder: str, engine: str, world_size: int) -> None:
    """The engine and world size that wrote the checkpoint (its state.json): another engine is
    refused; another world size only where the engine cannot reshard. The launcher checks
    before anything is written, every rank again before it loads."""
    written = state.get("engine")
    if written is not None and written != engine:
        raise UserError(
            f"checkpoint {folder!r} was written by engine {written} but this run uses "
            f"{engine}; resume with --engine {written}"
        )
    written_by = state.get("world_size")
    if written_by is not None and written_by != world_size and engine not in RESHARDS:
        raise UserError(
            f"checkpoint {folder!r} was written by {written_by} ranks but this run has "
            f"{world_size}; {engine} cannot reshard its checkpoint: resume with "
            f"--nproc {written_by}"
        )


def finished_at(out: str, steps: int) -> int | None:
    """The step of out/'s latest checkpoint when it is the run's last (nothing to resume)."""
    from lfdist.train.checkpoint import latest_checkpoint

    try:
        folder = latest_checkpoint(os.path.join(out, "checkpoints"))
        step = read_state(folder)["step"] if folder else None
    except UserError:
        return None
    return step if step is not None and step >= steps else None


def check_not_finished(state: dict, folder: str, steps: int) -> None:
    if state["step"] >= steps:
        run = os.path.dirname(os.path.dirname(os.path.abspath(folder)))
        raise UserError(
            f"--resume: the run in {run!r} already finished (step {state['step']} of {steps}); "
            f"nothing to resume: export it with `lfdist export --checkpoint {run}`, or train into "
            "another --out"
        )


def check_resume(folder: str, config: dict, plan) -> list[str]:
    """Every resume check that needs no model: returns the applied changes, one line each."""
    state = read_state(folder)
    check_plan(folder, plan)
    applied = check_settings(state, config)
    check_not_finished(state, folder, int(config["train"]["steps"]))
    return applied
