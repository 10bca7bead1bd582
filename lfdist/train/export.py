"""Export: overlay the trained parameters of a checkpoint on the base weights and write a
standard Hugging Face folder that `from_pretrained` loads."""

from __future__ import annotations

import json
import os
import shutil

from lfdist.errors import UserError
from lfdist.train.checkpoint import latest_checkpoint, verify


def resolve_checkpoint(path: str) -> str:
    """Accept a run folder, its checkpoints folder, or one step folder."""
    if not os.path.isdir(path):
        raise UserError(
            f"checkpoint {path!r} does not exist; give the --out folder of `lfdist train`"
        )
    for root in (path, os.path.join(path, "checkpoints")):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    if os.path.isfile(os.path.join(path, "state.json")):
        return path
    raise UserError(f"{path!r} holds no lfdist checkpoint; give the --out folder of `lfdist train`")


def export(checkpoint: str, out: str) -> str:
    from safetensors.torch import load_file

    from lfdist.model.blocks import fingerprint
    from lfdist.model.specs import load_model
    from lfdist.plan import load_plan

    folder = resolve_checkpoint(checkpoint)
    if os.path.exists(out) and os.listdir(out):
        raise UserError(f"export folder {out!r} exists and is not empty; choose another --out")
    verify(folder)
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    m = state["model"]
    loaded = load_model(
        m["spec"], m["task"], num_labels=state.get("num_labels", 2), dtype=m["dtype"]
    )
    model = loaded.model
    plan = load_plan(os.path.join(folder, "plan.yaml"))
    plan.check_model(fingerprint(model))
    adapted = any(b.treatment in ("lora", "mask") for b in plan.blocks)
    if adapted:  # the checkpoint holds adapter/mask parameters: rebuild them, then fold them in
        from lfdist.model.apply import apply_plan

        apply_plan(model, plan)
    trained = load_file(os.path.join(folder, "trainable.safetensors"))
    known = model.state_dict()
    unknown = sorted(set(trained) - set(known))
    if unknown:
        raise UserError(
            f"checkpoint has weights the base model lacks (e.g. {unknown[0]!r}); was the base model changed?"
        )
    for name, value in trained.items():
        if known[name].shape != value.shape:
            raise UserError(
                f"checkpoint weight {name!r} has shape {tuple(value.shape)}, base has {tuple(known[name].shape)}"
            )
    model.load_state_dict(trained, strict=False)
    tmp = out.rstrip("/") + ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if adapted:
        from safetensors.torch import save_file

        from lfdist.model.treatments import export_masks, merge_treatments

        masks = export_masks(model)
        if masks:  # the task as bit masks over the base weights, besides the merged model
            save_file(masks, os.path.join(tmp, "lfdist_masks.safetensors"))
        model = merge_treatments(model)
    model.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "lfdist_export.json"), "w") as f:
        json.dump(
            {
                "checkpoint": os.path.abspath(folder),
                "step": state["step"],
                "trained_tensors": len(trained),
                "base": m["spec"],
            },
            f,
            indent=1,
        )
    if os.path.exists(out):
        os.rmdir(out)
    os.replace(tmp, out)
    return out
