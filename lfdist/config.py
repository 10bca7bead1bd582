"""Typed, frozen run configuration: YAML files plus dotted overrides (`train.lr=1e-5`).

Unknown keys and values of the wrong type are errors at construction, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from lfdist.constants import ENGINES, TASKS
from lfdist.errors import UserError
from lfdist.precision import PRECISIONS
from lfdist.precision import resolve as resolve_precision

TRACKERS = ("tensorboard", "wandb")  # train.report_to, besides out/metrics.jsonl
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass(frozen=True)
class ModelConfig:
    spec: str = "tiny:llama"  # HF id or folder, tiny:<arch>, pkg:smollm2-135m, pkg:minilm-l6
    task: str = "lm"
    dtype: str = "float32"

    def __post_init__(self):
        _choice("model.task", self.task, TASKS)
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclass(frozen=True)
class DataConfig:
    spec: str = (
        "synthetic:lm"  # file/folder, datasets name, pkg:bbc-news, pkg:python-docs, synthetic:*
    )
    eval_spec: str | None = None  # held-out data; default: the held-out split of `spec`
    seq_len: int = 64
    text_column: str = "text"
    label_column: str = "label"
    heldout_fraction: float = 0.1
    max_examples: int | None = None  # cap the training examples (quick runs)
    max_eval_examples: int | None = 256  # held-out examples evaluated (evenly spaced); None: all

    def __post_init__(self):
        _positive("data.seq_len", self.seq_len)
        if self.seq_len < 2:  # one token predicts nothing: the LM loss needs a next token
            raise UserError(
                f"data.seq_len must be at least 2, got {self.seq_len}; e.g. data.seq_len=512 "
                "(--seq-len 512)"
            )
        if not 0.0 < self.heldout_fraction < 1.0:
            raise UserError(
                f"data.heldout_fraction must be in (0, 1), got {self.heldout_fraction}; e.g. "
                "data.heldout_fraction=0.1"
            )
        for name in ("max_examples", "max_eval_examples"):
            if getattr(self, name) is not None:
                _positive(f"data.{name}", getattr(self, name))


@dataclass(frozen=True)
class ProbeConfig:
    samples: int = 256
    batch_size: int = 8
    orchestrator: str = "local"
    workers: int = 1
    gradnorm: bool = False  # one backward pass too, for the gradnorm strategy
    ray_address: str | None = None  # join a Ray cluster; None: RAY_ADDRESS or a local Ray
    # layer-streamed probe (one block resident at a time); None: where the whole model would
    # take over half the memory available and nothing else needs it whole (pilots, gradnorm)
    stream_layers: bool | None = None
    pilots: bool = False  # salf pilot fine-tunes, sized to pilot_budget of the run
    pilot_budget: float = 0.05  # probe + pilots at most this share of the run's cost
    pilot_steps: int = 0  # the longer pilot's steps, overriding the budget (0: sized by it)
    pilot_depths: str = "auto"  # "auto" (1, 2, 4, ... L) or a comma list such as "1,2,4,8"
    # salf's pilots: "grid" (every depth 1, 2, 4, ..., L at two lengths: estimator pilot) or
    # "halving" (candidate splits from the trace, the better half continuing at twice the steps)
    pilot_kind: str = "grid"
    # budget-sized pilots run only when the longest reaches this share of the run (what salf
    # reads by default); 0 runs them whatever their length (to read with --option estimator=)
    pilot_min_share: float = 0.1
    critical_steps: int = 0  # critical: steps of the all-block pilot fine-tune (0: none)

    def __post_init__(self):
        _positive("probe.samples", self.samples)
        _positive("probe.batch_size", self.batch_size)
        _positive("probe.workers", self.workers)
        _choice("probe.orchestrator", self.orchestrator, ("local", "ray"))
        _choice("probe.pilot_kind", self.pilot_kind, ("grid", "halving"))
        _not_negative("probe.pilot_steps", self.pilot_steps)
        if not 0 < self.pilot_budget < 1:
            raise UserError(
                f"probe.pilot_budget must be a share of the run in (0, 1), got {self.pilot_budget}"
                "; e.g. probe.pilot_budget=0.05 (5%)"
            )
        _not_negative("probe.critical_steps", self.critical_steps)
        if not 0 <= self.pilot_min_share < 1:
            raise UserError(
                f"probe.pilot_min_share must be in [0, 1), got {self.pilot_min_share}; e.g. "
                "probe.pilot_min_share=0.1"
            )


@dataclass(frozen=True)
class SelectConfig:
    strategy: str = "top"
    budget: dict[str, float] = field(default_factory=dict)  # blocks, params, gib, flops
    options: dict[str, Any] = field(default_factory=dict)  # strategy-specific, e.g. n for top


@dataclass(frozen=True)
class TrainConfig:
    engine: str = "fsdp2"
    zero_stage: int = 2
    nproc: int = 2
    steps: int = 20
    batch_size: int = 4  # micro-batch per rank
    grad_accum: int = 1
    lr: float = 1e-4
    # PEFT treatments' own lr (absolute); None: train.lr x the plan's lr_scale (LoRA and BitFit
    # 10x, mask scores 100x: lfdist.model.treatments.LR_SCALE)
    lr_lora: float | None = None
    lr_bias: float | None = None
    lr_mask: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    activation_checkpointing: bool = False
    save_every: int = 0  # 0: save only at the end
    log_every: int = 1
    deepspeed_config: str | None = None  # user JSON; "auto" values are filled from here
    cache_frozen_prefix: bool = False  # replay the frozen prefix's outputs after the first epoch
    cache_max_gib: float = 4.0  # host memory the prefix cache may use
    cache_spill_dir: str | None = None  # a local folder: the cache is a memory-mapped file there
    zero3_replicate_frozen: bool = (
        False  # ZeRO-3: keep frozen params whole on every rank (no all-gather)
    )
    launcher: str = (
        "auto"  # auto: torchrun, or the deepspeed launcher for deepspeed; ray: Ray Train
    )
    # auto: bf16-mixed for bf16 models (fp32 masters and AdamW states for trainable parameters
    # only), fp32 for fp32 models; bf16 (pure, memory), fp16, fp32: lfdist.precision
    precision: str = "auto"
    # CPU only: map every allocation over 1 MiB on its own, so freed FSDP/ZeRO buffers go back
    # to the OS at once (-1 GiB per rank on a 0.66B Llama) at ~1.3x the step time
    cpu_lean_malloc: bool = False
    # torch.compile each block before the engine wraps it (torchtitan's recipe); ddp, fsdp1,
    # fsdp2, single. The first steps pay the compile (tens of seconds).
    compile: bool = False
    # trackers besides out/metrics.jsonl (always): none, tensorboard, wandb, or a comma list
    report_to: str = "none"
    eval_before: bool = True  # held-out quality of the base model before training
    save_final: bool = True  # write a checkpoint after the last step

    def __post_init__(self):
        _choice("train.engine", self.engine, ENGINES)
        _choice("train.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _choice("train.launcher", self.launcher, ("auto", "ray"))
        _choice("train.precision", self.precision, PRECISIONS)
        for name in ("nproc", "steps", "batch_size", "grad_accum"):
            _positive(f"train.{name}", getattr(self, name))
        if not self.lr > 0:  # the config loader already refused inf and nan
            raise UserError(f"train.lr must be greater than 0, got {self.lr}; e.g. train.lr=1e-4")
        for name in ("lr_lora", "lr_bias", "lr_mask"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(
                    f"train.{name} must be greater than 0, got {value}; or leave it unset"
                )
        for name in ("warmup_steps", "save_every", "log_every", "weight_decay", "max_grad_norm"):
            _not_negative(f"train.{name}", getattr(self, name))
        parse_report_to(self.report_to)
        if self.compile and self.engine == "deepspeed":
            raise UserError(
                "train.compile is for ddp, fsdp1, fsdp2 and single; DeepSpeed compiles through "
                "its own config (compile section): drop train.compile=true"
            )
        if not self.cache_max_gib > 0:
            raise UserError(
                f"train.cache_max_gib must be greater than 0, got {self.cache_max_gib}; e.g. "
                "train.cache_max_gib=8"
            )


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs/default"

    def __post_init__(self):
        resolve_precision(self.model.dtype, self.train.precision)  # a conflict is one line now

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def record(self) -> dict[str, Any]:
        """The settings the run uses, as job.json, checkpoints and trackers record them: no
        train.zero_stage unless the engine is DeepSpeed (an fsdp2 run has no ZeRO stage)."""
        d = self.to_dict()
        if self.train.engine != "deepspeed":
            del d["train"]["zero_stage"]
        return d


def parse_report_to(value: str) -> tuple[str, ...]:
    """train.report_to: 'none', or a comma list of tensorboard and wandb."""
    names = tuple(n.strip() for n in value.split(",") if n.strip() and n.strip() != "none")
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UserError(
            f"train.report_to={value!r}: {unknown[0]!r} is not a tracker; use none, tensorboard, "
            "wandb or a comma list of them"
        )
    return names


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise UserError(
            f"{name}={value!r} is not allowed; use one of {', '.join(map(str, allowed))}"
        )


# What a fix looks like, for the one-line errors (a value a user could start from).
EXAMPLES = {
    "train.steps": 1000,
    "train.batch_size": 8,
    "train.nproc": 2,
    "train.grad_accum": 1,
    "train.lr": 1e-4,
    "probe.samples": 256,
    "probe.batch_size": 8,
    "probe.workers": 2,
    "data.seq_len": 512,
    "data.max_examples": 10000,
    "data.max_eval_examples": 500,
}
TYPE_EXAMPLES = {int: 8, float: 0.1, str: "text", bool: "true"}


def _positive(name: str, value: int) -> None:
    if value is None or value <= 0:
        raise UserError(
            f"{name} must be a positive number, got {value!r}; e.g. {name}={EXAMPLES.get(name, 1)}"
        )


def _not_negative(name: str, value: float) -> None:
    if value < 0:
        raise UserError(f"{name} must be 0 or more, got {value!r}; e.g. {name}=0")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check a YAML value against a field's type hint (int -> float is allowed)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key {name} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads `lr: 1e-5` (no dot) as a string
    if (
        hint in (int, float, str, bool)
        and not isinstance(value, hint)
        or (hint in (int, float) and isinstance(value, bool))
    ):
        raise UserError(
            f"config key {name} must be {hint.__name__}, got {value!r}; write it like "
            f"{name}={TYPE_EXAMPLES[hint]}"
        )
    if hint is float and not math.isfinite(value):
        raise UserError(
            f"config key {name} must be a finite number, got {value!r}; e.g. {name}="
            f"{EXAMPLES.get(name, 0.1)}"
        )
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(
            f"config section {prefix or 'top level'} must be a mapping, got {data!r}; write it "
            f"as `{prefix or 'train'}:` followed by indented `key: value` lines"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise UserError(
            f"unknown config key {where}{unknown[0]}; known keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        name = f"{prefix}.{key}" if prefix else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, name)
        else:
            kwargs[key] = _coerce(name, value, hint)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override {text!r} must look like section.key=value, e.g. train.lr=1e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-5 and -1e-4 as strings (no dot); numbers written that way are meant as floats.
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)
    return key.strip().split("."), value


def merge_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def config_from_dict(data: dict[str, Any] | None, overrides: list[str] = ()) -> RunConfig:
    if data is not None and not isinstance(data, dict):
        raise UserError(
            f"a run config must be a mapping of sections (model:, data:, probe:, select:, "
            f"train:), but its top level is a {type(data).__name__}; see configs/*.yaml"
        )
    return _build(RunConfig, merge_overrides(data or {}, list(overrides)), "")


def with_values(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    """`cfg` with {"section.key": value} set, typed: each section is rebuilt with
    dataclasses.replace, so its own checks run again (the CLI's flags land here)."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, name = key.split(".", 1)
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(
        cfg, **{s: dataclasses.replace(getattr(cfg, s), **v) for s, v in sections.items()}
    )


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    from lfdist.plan import read_yaml

    data = read_yaml(path, "config file") if path else {}
    return config_from_dict(data, overrides)
