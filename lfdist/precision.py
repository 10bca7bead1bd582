"""Training precision: which dtype computes, and which dtype holds the parameters that train
(with their gradients and AdamW states) and the ones that stay frozen.

`bf16-mixed`, the default for bf16 models, is what users of torchtitan, HF Trainer (`bf16=True`)
and DeepSpeed get: compute in bf16, fp32 master weights, gradients reduced in fp32 and fp32 AdamW
states, but only for the parameters that train. Frozen parameters stay in the model's dtype with
no master copy and no state: 2 bytes per frozen parameter against 16 per trainable one, which is
where a frozen plan saves more than full fine-tuning can. `bf16` (pure) keeps everything in
bf16, an opt-in for memory; `fp32` computes and stores in fp32. Strings only (no torch): the
cost model and `select` price runs with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lfdist.errors import UserError

PRECISIONS = ("auto", "bf16-mixed", "bf16", "fp16", "fp32")
_PURE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_AUTO = {"bfloat16": "bf16-mixed", "float16": "fp16", "float32": "fp32"}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Precision:
    name: str  # bf16-mixed, bf16, fp16 or fp32
    compute: str  # dtype of the forward and backward matmuls and of activations
    trainable: str  # dtype of trainable parameters, their gradients and AdamW states
    frozen: str  # dtype of frozen parameters

    @property
    def mixed(self) -> bool:
        return self.compute != self.trainable

    def describe(self) -> str:
        """One phrase a plan table or summary prints."""
        if self.mixed:
            return (
                f"{self.name}: {self.compute} compute, fp32 master weights and AdamW states for "
                f"trainable parameters only, frozen in {self.frozen}"
            )
        return f"{self.name}: weights, gradients and AdamW states in {self.trainable}"


def resolve(model_dtype: str, setting: str = "auto") -> Precision:
    """The precision a run with weights loaded in `model_dtype` trains in; a one-line error for
    a combination that cannot hold."""
    if setting not in PRECISIONS:
        raise UserError(
            f"train.precision={setting!r} is not allowed; use one of {', '.join(PRECISIONS)}"
        )
    if model_dtype not in _AUTO:
        raise UserError(f"model.dtype={model_dtype!r}; use float32, bfloat16 or float16")
    name = _AUTO[model_dtype] if setting == "auto" else setting
    if name == "bf16-mixed":
        if model_dtype == "float16":
            raise UserError(
                "train.precision=bf16-mixed with model.dtype=float16 would compute in another "
                "half precision than the weights; use model.dtype=bfloat16 (or float32)"
            )
        return Precision(name, "bfloat16", "float32", model_dtype)
    need = _PURE[name]
    if model_dtype != need:
        raise UserError(
            f"train.precision={name} trains in {need}, but model.dtype={model_dtype}; "
            f"set model.dtype={need} or train.precision=auto"
        )
    return Precision(name, need, need, need)
