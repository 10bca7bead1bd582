"""Where a model comes from, without loading it: its config, a meta-device skeleton, its
fingerprint, and the safetensors folder its weights are read from.

The launcher validates from a `ModelSource` (config.json + safetensors headers, never the
weights); every rank hands one, with the plan, to its engine, which materializes only what
it holds (lfdist.model.materialize). `tiny:` models are written once, seeded, to a cached
safetensors folder, so every world size reads the same weights.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from lfdist.errors import UserError
from lfdist.model.specs import DTYPES, resolve_folder

# Parameters a task head adds on top of a base checkpoint: from_pretrained initializes them.
HEAD_PREFIXES = ("score.", "classifier.", "pooler.", "qa_outputs.")


def fresh_head(task: str, name: str) -> bool:
    """Whether parameter `name` is a classifier head a base checkpoint may lack."""
    return task == "classify" and name.startswith(HEAD_PREFIXES)


@dataclass(frozen=True)
class ModelSource:
    spec: str
    task: str = "lm"
    num_labels: int = 2
    dtype: str = "float32"
    seed: int = 0
    pad_token_id: int | None = None
    whole: bool = False  # debug/benchmark: every rank loads the whole model (the old path)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, DTYPES[self.dtype])

    def config(self):
        """The transformers config: of tiny:<arch>, a folder, pkg:<name> or a hub id, or a bare
        config.json file (the cost model prices a 70B model from its config alone)."""
        if self.spec.startswith("tiny:"):
            from lfdist.model.tiny import tiny_config

            config = tiny_config(self.spec[5:], self.num_labels)
        elif self.spec.endswith(".json"):
            config = _config_file(self.spec, self._labels())
        else:
            import transformers

            try:
                config = transformers.AutoConfig.from_pretrained(self._where(), **self._labels())
            except (OSError, ValueError) as e:
                raise UserError(
                    f"cannot read the config of {self.spec!r}: {str(e).splitlines()[0]}"
                ) from None
        if self.task == "classify" and config.pad_token_id is None:
            config.pad_token_id = self.pad_token_id
        return config

    def _labels(self) -> dict:
        return {"num_labels": self.num_labels} if self.task == "classify" else {}

    def _where(self) -> str:
        from lfdist.model.specs import check_spec

        return resolve_folder(self.spec) or check_spec(self.spec)

    def skeleton(self):
        """The model with every parameter on the meta device and real buffers (rotary caches,
        position ids): the constructor computes them, so nothing has to re-derive them."""
        import transformers

        from lfdist.constants import ENCODERS

        if self.task == "lm" and self.spec.startswith("tiny:") and self.spec[5:] in ENCODERS:
            raise UserError(
                f"{self.spec} is an encoder; use --task classify (or a decoder such as tiny:llama)"
            )
        auto = (
            transformers.AutoModelForCausalLM
            if self.task == "lm"
            else transformers.AutoModelForSequenceClassification
        )
        with params_on_meta():
            return auto.from_config(self.config(), dtype=self.torch_dtype)

    def load_whole(self):
        """The old path: the whole model in this process (probing, tests, the debug switch)."""
        from lfdist.model.specs import load_model

        return load_model(self.spec, self.task, self.num_labels, self.dtype, self.seed).model

    def fingerprint(self):
        from lfdist.model.blocks import fingerprint

        return fingerprint(self.skeleton())

    def weights_folder(self) -> str:
        """The safetensors folder the ranks read (tiny models are written here once)."""
        if self.spec.startswith("tiny:"):
            return tiny_folder(self.spec[5:], self.task, self.num_labels, self.seed)
        folder = resolve_folder(self.spec)
        if folder is not None:
            return folder
        where = self._where()
        if os.path.isdir(where):  # the cached copy of a hub id the hub cannot serve now
            return where
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt"]
        return snapshot_download(where, allow_patterns=patterns)

    def check_weights(self) -> None:
        """The checkpoint's headers against the skeleton: every parameter present, same shape."""
        from lfdist.model.materialize import locate

        if self.spec.startswith("tiny:"):
            self.weights_folder()  # written once here, before any rank starts to read it
            return
        folder = resolve_folder(self.spec)
        if folder is None:
            return  # a hub id: the ranks download it; its headers are checked there
        from lfdist.model.headers import read_index

        index = read_index(folder)
        for name, (key, shape) in locate(self.skeleton(), index).items():
            if key is None:
                if fresh_head(self.task, name):
                    continue
                raise UserError(
                    f"the checkpoint in {folder!r} has no tensor for parameter {name!r}; "
                    "is it saved from another architecture? re-save it with save_pretrained"
                )
            if index[key].shape != shape:
                raise UserError(
                    f"the checkpoint's {key!r} has shape {list(index[key].shape)} but the config "
                    f"builds {list(shape)}; the config.json does not match the weights"
                )


def _config_file(path: str, kwargs: dict):
    import transformers

    from lfdist.plan import read_json

    d = read_json(path, "model config", "check the path", "fix it")
    if not isinstance(d, dict):
        raise UserError(f"model config {path!r} must be a JSON object; give a config.json")
    d = {k: v for k, v in d.items() if not k.startswith("_")}  # our "_comment" lines
    if "model_type" not in d:
        raise UserError(f"model config {path!r} has no model_type; add it (e.g. llama)")
    try:
        return transformers.AutoConfig.for_model(d.pop("model_type"), **d, **kwargs)
    except (ValueError, KeyError) as e:
        raise UserError(f"model config {path!r}: {str(e).splitlines()[0]}") from None


@contextlib.contextmanager
def params_on_meta():
    """Construct modules with parameters on the meta device and buffers real (accelerate's
    init_empty_weights(include_buffers=False), in 15 lines)."""
    from torch import nn

    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            cls = type(module._parameters[name])
            meta = cls(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            module._parameters[name] = meta

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def tiny_folder(arch: str, task: str, num_labels: int, seed: int) -> str:
    """A seeded tiny model saved once as safetensors; the ranks of every run read it."""
    import transformers

    from lfdist.model.packaged import cache_root, file_lock
    from lfdist.model.tiny import build_tiny

    name = f"{arch}-{task}-{num_labels}-seed{seed}-tf{transformers.__version__}"
    folder = os.path.join(cache_root(), "tiny", name)
    done = os.path.join(folder, "model.safetensors")  # written before the folder appears
    if os.path.isfile(done):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with file_lock(folder + ".lock"):
        if not os.path.isfile(done):
            import shutil
            import tempfile

            # a folder without weights is what the rank-1 race of issue 18 left: replace it
            shutil.rmtree(folder, ignore_errors=True)
            tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=os.path.dirname(folder))
            _save_tiny(build_tiny(arch, task, num_labels=num_labels, seed=seed), tmp)
            os.rename(tmp, folder)  # atomic: a reader never sees half a folder
    return folder


def _save_tiny(model, folder: str) -> None:
    """config.json and model.safetensors, written here whatever the process's rank: under
    torch.distributed, transformers' save_pretrained writes the weights on rank 0 only, so a
    rank 1 that took the lock first left a folder with a config and no weights (issue 18)."""
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if where not in seen:  # a tied weight is stored once, under its first name
            seen.add(where)
            tensors[name] = t.detach().contiguous()
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
