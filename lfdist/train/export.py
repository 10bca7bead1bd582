"""Export: overlay the trained tensors of a checkpoint on the base weights and write a standard
Hugging Face folder that `from_pretrained` loads, one safetensors file at a time.

The output mirrors the base model's files: each base `.safetensors` file becomes one output
file with the same name and tensors, each tensor read from the base (memory-mapped, cast to
the run's dtype), or from the checkpoint where the run trained it (read a few tensors at a
time from its shards: lfdist/engines/shards.py::TrainedWeights). Blocks trained through LoRA
or masks are merged one block at a time (`merge_treatments` on that block alone). Parameters
the base lacks (a task head) go to one more file, and the index lists every file. So no
process holds more than one base file's tensors plus one merged block: never the whole model.

Written into `<out>.tmp-export` and renamed into place; `lfdist_export.json` records the
checkpoint, its step, the trained tensors and the base; masked runs also get
`lfdist_masks.safetensors` (the task as bit masks over the base weights).
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from lfdist.errors import UserError
from lfdist.train.checkpoint import latest_checkpoint, verify

EXTRA = "model-lfdist-extra.safetensors"  # parameters the base files do not hold


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
    from lfdist.engines.shards import TrainedWeights
    from lfdist.model.blocks import fingerprint
    from lfdist.model.specs import tokenizer_for
    from lfdist.plan import load_plan
    from lfdist.train.resume import read_state

    folder = resolve_checkpoint(checkpoint)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(
            f"export folder {out!r} exists and is not an empty folder; choose another --out"
        )
    verify(folder)
    state = read_state(folder)
    plan = load_plan(os.path.join(folder, "plan.yaml"))
    tokenizer = tokenizer_for(state["model"]["spec"])
    source = _source(state, tokenizer)
    model = source.skeleton()  # parameters on meta: names, shapes, the config
    plan.check_model(fingerprint(model))
    trained = TrainedWeights(folder)
    _check_trained(trained, model, plan)
    tmp = out.rstrip("/") + ".tmp-export"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    except OSError as e:
        raise UserError(
            f"cannot write the export folder {out!r} ({e.strerror or e}); choose a writable --out"
        ) from None
    try:
        _write_folder(tmp, folder, state, model, plan, trained, source, tokenizer)
        _usual_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written export left behind
        raise
    if os.path.isdir(out):
        os.rmdir(out)
    os.replace(tmp, out)
    return out


def _usual_modes(folder: str) -> None:
    """Every exported file with the mode a plain open() gives (0666 less the umask): safetensors
    writes its files through a private temporary (0600), so the weights were unreadable to the
    group and others that can read the rest of the export (issue 18)."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask)


def _write_folder(tmp, folder, state, model, plan, trained, source, tokenizer) -> None:
    masks = _write_weights(tmp, model, plan, trained, source)
    if masks:
        from safetensors.torch import save_file

        save_file(masks, os.path.join(tmp, "lfdist_masks.safetensors"))
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    base = source.weights_folder()
    if os.path.isfile(os.path.join(base, "generation_config.json")):
        shutil.copy(os.path.join(base, "generation_config.json"), tmp)
    with open(os.path.join(tmp, "lfdist_export.json"), "w") as f:
        json.dump(
            {
                "checkpoint": os.path.abspath(folder),
                "step": state["step"],
                "trained_tensors": len(trained.shapes),
                "base": state["model"]["spec"],
            },
            f,
            indent=1,
        )


def _source(state: dict, tokenizer):
    from lfdist.model.source import ModelSource

    m = state["model"]
    seed = ((state.get("config") or {}).get("train") or {}).get("seed", 0)
    return ModelSource(
        m["spec"],
        m["task"],
        num_labels=state.get("num_labels", 2),
        dtype=m["dtype"],
        seed=seed,  # tiny models are drawn from the run's seed
        pad_token_id=tokenizer.pad_token_id,
    )


def _adapted_prefixes(plan) -> dict[str, str]:
    return {f"{b.name}.": b.treatment for b in plan.blocks if b.treatment in ("lora", "mask")}


def _check_trained(trained, model, plan) -> None:
    """Trained names are the model's (or its adapters', in LoRA/mask blocks), same shapes."""
    known = {n: tuple(p.shape) for n, p in model.state_dict(keep_vars=True).items()}
    adapted = tuple(_adapted_prefixes(plan))
    for name, (shape, _) in trained.shapes.items():
        if name.startswith(adapted):
            continue  # adapter, mask score or base_layer bias: checked by the block merge
        if name not in known:
            raise UserError(
                f"checkpoint has weights the base model lacks (e.g. {name!r}); was the base model changed?"
            )
        if known[name] != tuple(shape):
            raise UserError(
                f"checkpoint weight {name!r} has shape {tuple(shape)}, base has {known[name]}"
            )


def _write_weights(tmp: str, model, plan, trained, source) -> dict[str, torch.Tensor]:
    """One output file per base file; returns the packed masks of masked blocks."""
    from safetensors.torch import save_file

    from lfdist.model.headers import read_header, weight_files
    from lfdist.model.materialize import Reader, checkpoint_names

    base = source.weights_folder()
    reader = Reader(base)
    dtype = source.torch_dtype
    # Each distinct parameter (tied aliases once) and the base key that holds it, if any.
    names = checkpoint_names(model)
    key_of = {
        n: next((k for k in keys if k in reader.index), None) for n, (keys, _) in names.items()
    }
    buffers = {n for n in model.state_dict() if n not in names and "." in n}
    merger = _BlockMerger(model, plan, trained, reader, dtype)
    plain_trained = {n for n in trained.shapes if not n.startswith(tuple(merger.prefixes))}
    by_file = _by_file(key_of, reader, plain_trained)
    weight_map: dict[str, str] = {}
    for file in weight_files(base):
        out = {}
        wanted = sorted(by_file.get(file, []))
        for chunk in range(0, len(wanted), 64):  # trained tensors a few at a time
            part = wanted[chunk : chunk + 64]
            overlay = trained.read([n for n in part if n in plain_trained])
            for name in part:
                if name in overlay:
                    out[name] = overlay[name].to(dtype)
                elif merger.covers(name):
                    out[name] = merger.get(name)
                else:
                    out[name] = reader.get(key_of[name]).to(dtype)
        present = set(read_header(file))
        for name in sorted(b for b in buffers if b in present):
            out[name] = reader.get(name)  # persistent buffers the base saved
        fname = os.path.basename(file)
        save_file(
            {k: v.contiguous() for k, v in out.items()}, os.path.join(tmp, fname), {"format": "pt"}
        )
        weight_map.update(dict.fromkeys(out, fname))
        merger.release(set(out))
    extra = sorted(n for n, k in key_of.items() if k is None)
    if extra:
        tensors = {k: v.to(dtype).contiguous() for k, v in trained.read(extra).items()}
        save_file(tensors, os.path.join(tmp, EXTRA), {"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, EXTRA))
    _name_files(tmp, weight_map)
    return merger.masks


def _by_file(key_of: dict, reader, plain_trained: set) -> dict[str, list[str]]:
    """{base file: the parameters read from it}; a parameter neither in the base files nor
    trained is refused."""
    missing = [n for n, k in key_of.items() if k is None and n not in plain_trained]
    if missing:
        raise UserError(
            f"the base weights have no tensor for {missing[0]!r} and the run did not train it; "
            "export needs every parameter in the base files or the checkpoint"
        )
    by_file: dict[str, list[str]] = {}
    for name, key in key_of.items():
        if key is not None:
            by_file.setdefault(reader.index[key].file, []).append(name)
    return by_file


def _name_files(tmp: str, weight_map: dict[str, str]) -> None:
    """One file is model.safetensors; several get an index (and none is model.safetensors)."""
    files = set(weight_map.values())
    single = "model.safetensors"
    if len(files) == 1 and files != {single}:
        os.replace(os.path.join(tmp, files.pop()), os.path.join(tmp, single))
    elif len(files) > 1:
        if single in files:  # from_pretrained reads model.safetensors alone when it exists
            os.replace(os.path.join(tmp, single), os.path.join(tmp, "model-base.safetensors"))
            weight_map = {
                k: "model-base.safetensors" if v == single else v for k, v in weight_map.items()
            }
        _write_index(tmp, weight_map)


def _write_index(tmp: str, weight_map: dict[str, str]) -> None:
    from lfdist.model.headers import INDEX

    total = sum(os.path.getsize(os.path.join(tmp, f)) for f in set(weight_map.values()))
    with open(os.path.join(tmp, INDEX), "w") as f:
        json.dump(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
            f,
            indent=1,
        )


class _BlockMerger:
    """LoRA / mask blocks, merged one at a time on demand into plain weights."""

    def __init__(self, model, plan, trained, reader, dtype):
        self.prefixes = _adapted_prefixes(plan)
        self.plan, self.trained, self.reader, self.dtype = plan, trained, reader, dtype
        self.skeleton = model
        self.planned = None
        self.done: dict[str, dict[str, torch.Tensor]] = {}
        self.masks: dict[str, torch.Tensor] = {}

    def _prefix(self, name: str) -> str | None:
        return next((p for p in self.prefixes if name.startswith(p)), None)

    def covers(self, name: str) -> bool:
        return self._prefix(name) is not None

    def get(self, name: str) -> torch.Tensor:
        prefix = self._prefix(name)
        if prefix not in self.done:
            self.done[prefix] = self._merge(prefix)
        return self.done[prefix][name]

    def release(self, written: set[str]) -> None:
        for prefix in [p for p, d in self.done.items() if set(d) <= written]:
            del self.done[prefix]

    def _merge(self, prefix: str) -> dict[str, torch.Tensor]:
        import copy

        from lfdist.model.apply import apply_plan
        from lfdist.model.materialize import _candidates
        from lfdist.model.treatments import export_masks, merge_treatments

        if self.planned is None:  # a meta copy with the plan applied: the adapter modules
            self.planned = copy.deepcopy(self.skeleton)
            apply_plan(self.planned, self.plan)
        model = self.planned
        block = model.get_submodule(prefix[:-1])
        buffers = {n: b.clone() for n, b in block.named_buffers()}
        block.to_empty(device="cpu")
        base_prefix = getattr(model, "base_model_prefix", "")
        trained = self.trained.read([n for n in self.trained.shapes if n.startswith(prefix)])
        with torch.no_grad():
            for local, p in block.named_parameters():
                name = prefix + local
                if name in trained:
                    p.copy_(trained[name])
                    continue
                key = next(
                    (k for k in _candidates(name, base_prefix) if k in self.reader.index), None
                )
                if key is None:
                    raise UserError(
                        f"the base weights have no tensor for {name!r}; cannot merge block {prefix[:-1]}"
                    )
                p.copy_(self.reader.get(key))
            for local, b in block.named_buffers():
                b.copy_(buffers[local])
        self.masks.update({prefix + k: v for k, v in export_masks(block).items()})
        merged = merge_treatments(block)
        out = {prefix + k: v.to(self.dtype) for k, v in merged.state_dict().items()}
        model.get_submodule(prefix[:-1]).to_empty(device="meta")  # frees the block's memory
        return out
