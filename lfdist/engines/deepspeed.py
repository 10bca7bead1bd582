"""DeepSpeed ZeRO-1/2/3 behind the Engine protocol (deepspeed is imported inside functions).

The plan is applied before `build`: the optimizer (torch AdamW) gets the trainable
parameters only, so DeepSpeed's flat fp32 partitions, and the AdamW states on them, cover
the trainable parameters and nothing else. Frozen parameters stay replicated under ZeRO-1/2;
ZeRO-3 partitions them too, unless the config flag `zero3_replicate_frozen` keeps them out of
its reach (`_keep_frozen_out_of_zero3`): then they are never all-gathered.

Config: the user's DeepSpeed JSON (`train.deepspeed_config`) or our template for the stage;
"auto" values come from TrainConfig, and an explicit value that disagrees raises (`fill_config`).

`local_counts` walks what DeepSpeed really allocated on this rank, padding included, and adds
`optimizer_state_elements_unpadded`, `partition_padding_elements` (alignment padding in this
rank's partition) and `master_weight_elements` (the fp32 copy of the partition).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lfdist.engines.base import make_optimizer, make_scheduler, trainable_parameters
from lfdist.errors import UserError
from lfdist.plan import read_json
from lfdist.precision import resolve as resolve_precision

TAG = "deepspeed"  # the checkpoint tag inside the folder lfdist hands to save()/load()
TEMPLATES = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPE_OF = {"bf16": "bfloat16", "fp16": "float16"}


def template(stage: int) -> dict[str, Any]:
    """Our template for a ZeRO stage; configs/deepspeed/zero{stage}.json ship the same dicts."""
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 2:
        zero.update(reduce_bucket_size="auto")
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            stage3_gather_16bit_weights_on_model_save=False,
        )
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


def read_config(cfg) -> dict[str, Any]:
    """The user's JSON when given, else the shipped template (or the built-in one)."""
    path = cfg.deepspeed_config
    if path is None:
        shipped = TEMPLATES / f"zero{cfg.zero_stage}.json"
        if not shipped.is_file():
            return template(cfg.zero_stage)
        path = str(shipped)
    data = read_json(path, "deepspeed config", "fix train.deepspeed_config", "fix the file")
    if not isinstance(data, dict):
        raise UserError(f"deepspeed config {path!r} must be a JSON object")
    return data


def _drop_comments(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_comments(v) for k, v in d.items() if not k.startswith("_comment")}
    return d


def _settle(
    where: str, user: Any, ours: Any, ours_named: str, fix: str = "set one of them to auto"
) -> Any:
    """'auto' (or absent) takes ours; an explicit value must equal ours."""
    if user is None or user == "auto":
        return ours
    if user != ours:
        raise UserError(
            f"deepspeed config {where}={json.dumps(user)} conflicts with {ours_named}; {fix}"
        )
    return user


def fill_config(
    user: dict | None, cfg, world_size: int, dtype: str = "float32", hidden_size: int | None = None
) -> dict[str, Any]:
    """A complete DeepSpeed config: 'auto' filled from `cfg`, conflicts raised as UserError.

    Pure function (no process group): `user` is the parsed JSON or None for our template.
    `hidden_size` fills the bucket/persistence "auto" values the way accelerate does; without
    it those keys are dropped so DeepSpeed's defaults apply.
    """
    ds = _drop_comments(copy.deepcopy(user if user is not None else template(cfg.zero_stage)))
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise UserError(
                f"deepspeed config has an {section!r} section, but lfdist builds AdamW and its "
                "schedule from train.lr, train.weight_decay and train.warmup_steps; remove the section"
            )
    _batch(ds, cfg, world_size)
    clip = float(cfg.max_grad_norm or 0.0)
    ds["gradient_clipping"] = float(
        _settle(
            "gradient_clipping", ds.get("gradient_clipping"), clip, f"train.max_grad_norm={clip}"
        )
    )
    for key, wanted in (("bf16", dtype == "bfloat16"), ("fp16", dtype == "float16")):
        section = ds.setdefault(key, {})
        section["enabled"] = _settle(
            f"{key}.enabled",
            section.get("enabled"),
            wanted,
            f"model.dtype={dtype}",
            f"set {key}.enabled to auto or model.dtype={DTYPE_OF[key]}",
        )
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = _settle(
        "zero_optimization.stage",
        zero.get("stage"),
        cfg.zero_stage,
        f"train.zero_stage={cfg.zero_stage}",
    )
    _pure_bf16(ds, resolve_precision(dtype, getattr(cfg, "precision", "auto")), zero["stage"])
    _sized(zero, hidden_size)
    left = _auto_keys(ds)
    if left:
        raise UserError(
            f"deepspeed config key {left[0]} is 'auto' but lfdist cannot fill it; set a value"
        )
    return ds


def _batch(ds: dict, cfg, world_size: int) -> None:
    """The three batch keys from train.batch_size, train.grad_accum and the world size."""
    micro = _settle(
        "train_micro_batch_size_per_gpu",
        ds.get("train_micro_batch_size_per_gpu"),
        cfg.batch_size,
        f"train.batch_size={cfg.batch_size}",
    )
    accum = _settle(
        "gradient_accumulation_steps",
        ds.get("gradient_accumulation_steps"),
        cfg.grad_accum,
        f"train.grad_accum={cfg.grad_accum}",
    )
    total = micro * accum * world_size
    given = ds.get("train_batch_size")
    if given not in (None, "auto") and given != total:
        raise UserError(
            f"deepspeed config train_batch_size={given} does not match train.batch_size={micro} x "
            f"train.grad_accum={accum} x world size {world_size} = {total} (world-size mismatch); "
            f"set train_batch_size to auto or launch {given // (micro * accum)} ranks"
        )
    ds.update(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accum,
        train_batch_size=total,
    )


def _sized(zero: dict, hidden_size: int | None) -> None:
    """The bucket and persistence sizes left 'auto', from the hidden size as accelerate does;
    dropped (DeepSpeed's defaults) without one."""
    sized = {"reduce_bucket_size": 1.0, "stage3_prefetch_bucket_size": 0.9}
    for key, factor in sized.items():
        if zero.get(key) == "auto":
            _fill_or_drop(zero, key, None if hidden_size is None else int(factor * hidden_size**2))
    if zero.get("stage3_param_persistence_threshold") == "auto":
        _fill_or_drop(
            zero,
            "stage3_param_persistence_threshold",
            None if hidden_size is None else 10 * hidden_size,
        )


def _pure_bf16(ds: dict, precision, stage: int) -> None:
    """bf16-mixed is DeepSpeed's own bf16 path (fp32 master partitions and AdamW states of the
    trainable parameters only: the optimizer never sees a frozen one); pure bf16 asks it for
    bf16 masters, gradients and states too."""
    section = ds["bf16"]
    pure = precision.name == "bf16"
    if pure and stage == 0:
        raise UserError(
            "train.precision=bf16 (pure) needs ZeRO stage 1, 2 or 3 on deepspeed; "
            "use --zero-stage 1 or train.precision=bf16-mixed"
        )
    for key in ("bf16_master_weights_and_grads", "bf16_optimizer_states"):
        if not pure and section.get(key) in (None, "auto", False):
            section.pop(key, None)  # DeepSpeed's default: fp32 masters and states
            continue
        section[key] = _settle(
            f"bf16.{key}",
            section.get(key),
            pure,
            f"train.precision={precision.name}",
            "remove the key, or set train.precision to match",
        )


def _fill_or_drop(section: dict, key: str, value: int | None) -> None:
    if value is None:
        del section[key]
    else:
        section[key] = value


def _auto_keys(d: Any, prefix: str = "") -> list[str]:
    if isinstance(d, dict):
        return [k for key, v in d.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if d == "auto" else []


def _model_dtype(model: nn.Module) -> str:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return DTYPES.get(next(iter(dtypes)), "float32") if len(dtypes) == 1 else "float32"


# --------------------------------------------------------------------------- ZeRO-3 frozen prefix


def _keep_frozen_out_of_zero3(
    model: nn.Module, recurse: bool = True
) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Turn every frozen parameter into a non-persistent buffer before ZeRO-3 sees the model.

    ZeRO-3 converts every `nn.Parameter` of the module it is given and re-partitions all of
    them at each optimizer step (`_partition_all_parameters`, even `ds_persist` ones, which it
    all-gathers again in `_post_step`), so a frozen prefix costs an all-gather per forward, or
    per step when persistent. A buffer is not a parameter: DeepSpeed leaves it whole on every
    rank, and the forward reads `module.weight` the same way. Tied weights stay one tensor.
    """
    moved, seen = [], {}
    for module in model.modules() if recurse else [model]:
        for name, p in list(module._parameters.items()):
            if p is None or p.requires_grad:
                continue
            tensor = seen.setdefault(id(p), p.detach())
            del module._parameters[name]
            module.register_buffer(name, tensor, persistent=False)
            moved.append((module, name, tensor))
    return moved


# --------------------------------------------------------------------------- the engine


def _storage_elements(tensors) -> int:
    """Elements of the distinct storages behind `tensors` (views of one flat buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes() // t.element_size()
    return sum(seen.values())


class DeepSpeedEngineAdapter:
    name = "deepspeed"
    skips_bad_steps_on_device = False

    def __init__(
        self,
        engine,
        optimizer: torch.optim.Optimizer,
        scheduler,
        cfg,
        world,
        stage: int,
        frozen_buffers: list,
    ):
        self.model = engine  # a DeepSpeedEngine: an nn.Module whose forward is the model's
        self.optimizer = (
            optimizer  # the torch AdamW: its state lives on DeepSpeed's flat fp32 partitions
        )
        self.scheduler = scheduler
        self.cfg = cfg
        self.world = world
        self.stage = stage
        self.frozen_buffers = frozen_buffers
        self._accum = engine.gradient_accumulation_steps()
        managed = getattr(engine, "managed_gradient_accumulation", lambda: True)
        self._managed = bool(managed())
        self._micro = 0
        self.precision = resolve_precision(
            _model_dtype(engine.module), getattr(cfg, "precision", "auto")
        )

    # -- training

    def micro_step(self, batch, scale: float) -> torch.Tensor:
        loss = self.model(**batch).loss
        # DeepSpeed already divides by gradient_accumulation_steps; honour any other scale.
        factor = scale * self._accum
        self.model.backward(loss if abs(factor - 1.0) < 1e-12 else loss * factor)
        self._micro += 1
        if self._managed and self._micro % self._accum:
            # Not a boundary: step() only advances DeepSpeed's micro-step counter, which
            # decides when backward reduces gradients. The boundary step is optimizer_step().
            self.model.step()
        return loss.detach()

    def optimizer_step(self, skip: torch.Tensor | None = None) -> None:
        """DeepSpeed clips and reads its gradient norm on the host itself, so the loop reads
        each step's health before this (skips_bad_steps_on_device is False): `skip` is never
        set here."""
        if self._micro % self._accum:
            raise RuntimeError(
                f"optimizer_step after {self._micro} micro-steps; "
                f"gradient_accumulation_steps is {self._accum}"
            )
        # Clips, steps AdamW on the partitions, steps the scheduler, zeroes the gradients.
        self.model.step()

    def drop_gradients(self) -> None:
        self._micro = 0
        self.model.zero_grad()

    # -- what this rank holds

    def local_counts(self) -> dict[str, int]:
        counts = self._param_counts()
        counts["grad_elements"] = self._grad_elements()
        counts.update(self._optimizer_counts())
        # Bytes as the savings table reads them: params and grads in the model dtype,
        # optimizer states (and DeepSpeed's fp32 master partition) in fp32.
        size = next(p for p in self.model.module.parameters()).element_size()
        counts["param_bytes"] = (counts["trainable_params"] + counts["frozen_params"]) * size
        counts["grad_bytes"] = counts["grad_elements"] * size
        counts["optimizer_state_bytes"] = 4 * (
            counts["optimizer_state_elements"] + counts.get("master_weight_elements", 0)
        )
        return counts

    def _param_counts(self) -> dict[str, int]:
        counts = {"trainable_params": 0, "frozen_params": 0}
        for p in self.model.module.parameters():
            key = "trainable_params" if p.requires_grad else "frozen_params"
            # Under ZeRO-3 a parameter holds its partition (ds_tensor) and, while gathered
            # or persistent, the full data as well; otherwise just the data.
            held = p.data.numel()
            ds_tensor = getattr(p, "ds_tensor", None)
            if ds_tensor is not None:
                held += ds_tensor.numel()
            counts[key] += held
        counts["frozen_params"] += _storage_elements(t for _, _, t in self.frozen_buffers)
        return counts

    def _grad_elements(self) -> int:
        opt = self.model.optimizer  # DeepSpeed's ZeRO optimizer (or the bare one at stage 0)
        tensors = [p.grad for p in self.model.module.parameters() if p.grad is not None]
        if self.stage in (1, 2):
            # ZeRO-1 keeps full .grad until the boundary; ZeRO-2 accumulates the gradients
            # of the parameters in its partition (all_grad_tensors); at the boundary both
            # hold averaged_gradients, views of one buffer (grads_in_partition on some paths).
            tensors.append(getattr(opt, "grads_in_partition", None))
            for name in ("all_grad_tensors", "averaged_gradients"):
                for value in (getattr(opt, name, None) or {}).values():
                    tensors.extend(value if isinstance(value, list | tuple) else [value])
            tensors += [g.grad for g in getattr(opt, "single_partition_of_fp32_groups", [])]
        elif self.stage == 3:
            tensors.append(getattr(opt, "grad_partitions_flat_buffer", None))
            tensors += [g.grad for g in getattr(opt, "fp32_partitioned_groups_flat", [])]
        return _storage_elements(t for t in tensors if t is not None)

    def _optimizer_counts(self) -> dict[str, int]:
        """AdamW states on this rank's flat partitions, with the alignment padding in them.

        ZeRO-1/2 pad each group to a multiple of 2 x world size and the last rank's partition
        carries the padding; ZeRO-3 pads each parameter to a multiple of the world size.
        """
        states = [
            v
            for s in self.optimizer.state.values()
            for k, v in s.items()
            if k != "step" and isinstance(v, torch.Tensor)
        ]
        kinds = max(1, len({k for s in self.optimizer.state.values() for k in s if k != "step"}))
        padding = self.partition_padding()
        total = sum(t.numel() for t in states)
        return {
            "optimizer_state_elements": total,
            "optimizer_state_elements_unpadded": total - kinds * padding if states else 0,
            "partition_padding_elements": padding,
            "master_weight_elements": self._master_elements(),
        }

    def partition_padding(self) -> int:
        """Padding elements in this rank's partitions (alignment, not model parameters)."""
        opt = self.model.optimizer
        if self.stage in (1, 2):
            return sum(int(n) for n in opt.groups_padding)
        if self.stage == 3:
            return sum(_ds_padding(p, self.world) for p in trainable_parameters(self.model.module))
        return 0

    def _master_elements(self) -> int:
        """fp32 master partitions, where they are a copy of this rank's partitioned weights
        (DeepSpeed keeps one even in fp32: ZeRO-1/2 always, ZeRO-3 unless they share storage)."""
        opt = self.model.optimizer
        groups = getattr(opt, "single_partition_of_fp32_groups", None)
        if groups is None:
            groups = getattr(opt, "fp32_partitioned_groups_flat", [])
        owned = {
            g.untyped_storage().data_ptr()
            for g in getattr(opt, "fp16_partitioned_groups_flat", [])
            if g is not None and g.numel()
        }
        return sum(g.numel() for g in groups if g.untyped_storage().data_ptr() not in owned)

    # -- weights and checkpoints

    def full_trainable_state(self) -> dict[str, torch.Tensor]:
        """Full trainable weights on every rank (collective): for tests; checkpoints never gather."""
        import deepspeed

        named = [(n, p) for n, p in self.model.module.named_parameters() if p.requires_grad]
        if self.stage == 3:
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                return {n: p.detach().to("cpu", copy=True) for n, p in named}
        return {n: p.detach().to("cpu", copy=True) for n, p in named}

    def comm_volume(self) -> dict | None:
        """Bytes and calls per collective since start, when the DeepSpeed JSON enables
        `comms_logger` (its `prof_all`); None otherwise."""
        import deepspeed.comm as dscomm

        logger = getattr(dscomm, "comms_logger", None)
        if logger is None or not getattr(logger, "enabled", False):
            return None
        return {
            op: {
                "calls": sum(v[0] for v in sizes.values()),
                "bytes": sum(int(size) * v[0] for size, v in sizes.items()),
            }
            for op, sizes in logger.comms_dict.items()
        }

    def full_frozen_state(self) -> dict[str, torch.Tensor]:
        """Full frozen weights by original name (collective under ZeRO-3): tests compare them."""
        import deepspeed

        module = self.model.module
        named = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
        if self.stage == 3 and named:
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                out = {n: p.detach().to("cpu", copy=True) for n, p in named}
        else:
            out = {n: p.detach().to("cpu", copy=True) for n, p in named}
        # Frozen weights kept whole as buffers (zero3_replicate_frozen) under their own names.
        qualname = {id(m): n for n, m in module.named_modules()}
        for owner, name, tensor in self.frozen_buffers:
            prefix = qualname[id(owner)]
            out.setdefault(
                f"{prefix}.{name}" if prefix else name, tensor.detach().to("cpu", copy=True)
            )
        return out

    def trainable_shards(self) -> list[torch.Tensor]:
        """The trainable tensors this rank holds: ZeRO-3 partitions, ZeRO-1/2 replicas."""
        params = [p for p in self.model.module.parameters() if p.requires_grad]
        return [p.ds_tensor if self.stage == 3 else p.data for p in params]

    def save(self, folder: str) -> None:
        """DeepSpeed's own files (each rank its optimizer partition) under deepspeed/, frozen
        weights excluded, plus the trainable weights each rank owns under weights/ (export)."""
        from lfdist.engines.shards import write_partitions

        self.model.save_checkpoint(
            folder, tag=TAG, save_latest=False, exclude_frozen_parameters=True
        )
        parts = self._owned_weights()
        if parts:
            write_partitions(folder, self.world.rank, parts)

    def _owned_weights(self) -> dict[str, tuple[torch.Tensor, list, int]]:
        from lfdist.engines.base import clean_name

        named = [
            (clean_name(n), p) for n, p in self.model.module.named_parameters() if p.requires_grad
        ]
        if self.stage != 3:  # replicated: one copy is enough
            if not self.world.is_main:
                return {}
            return {n: (p.detach().flatten(), list(p.shape), 0) for n, p in named}
        parts = {}
        for n, p in named:
            size = p.ds_tensor.numel()
            start = size * self.world.rank
            valid = max(0, min(size, p.ds_numel - start))  # the tail is alignment padding
            if valid:
                parts[n] = (p.ds_tensor.detach().narrow(0, 0, valid), list(p.ds_shape), start)
        return parts

    def load(self, folder: str) -> None:
        if not os.path.isdir(os.path.join(folder, TAG)):
            raise UserError(
                f"checkpoint {folder!r} has no DeepSpeed state ({TAG}/); it was written by "
                "another engine: resume with the engine that wrote it"
            )
        restore = _load_weights_only(self.model)
        try:
            path, _ = self.model.load_checkpoint(
                folder,
                tag=TAG,
                load_module_strict=False,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
        finally:
            restore()
        if path is None:
            raise UserError(
                f"DeepSpeed could not load the checkpoint in {folder!r}; resume from an earlier "
                "one (name it in checkpoints/latest) or start the run over with --overwrite"
            )
        self._micro = 0


def _load_weights_only(engine):
    """DeepSpeed reads its files with torch.load(weights_only=False), which runs whatever a
    crafted file holds. Until the returned `restore()`, it reads them with weights_only=True,
    allowing only the plain-data classes DeepSpeed itself pickles (its enums, loss scaler,
    fragment address)."""
    import pickle

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
    checkpoint_engine = engine.checkpoint_engine

    def load(path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UserError(
                f"checkpoint file {path!r} holds objects that are not plain data "
                f"({str(e).splitlines()[-1][:160]}); it is not loaded: resume from a checkpoint "
                "lfdist wrote"
            ) from None

    checkpoint_engine.load = load  # an instance attribute shadows the class's method

    def restore() -> None:
        del checkpoint_engine.load

    return restore


def _ds_padding(p, world) -> int:
    """ZeRO-3 pads a parameter to partition size x world size; the tail lands on the last ranks."""
    size = p.ds_tensor.numel()
    start = size * world.rank
    return max(0, min(size, start + size - p.ds_numel))


def shard(u, cfg, world) -> DeepSpeedEngineAdapter:
    """ZeRO-3 partitions the model as it is materialized, one module at a time (children
    first, `zero.Init(module=...)`); ZeRO-1/2 replicate it by design, read once in the
    training dtype. A built nn.Module (or the debug whole load) is handed over as it is."""
    import deepspeed

    stage, model, filler = cfg.zero_stage, u.model, u.filler
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    ds_config = fill_config(read_config(cfg), cfg, world.world_size, _model_dtype(model), hidden)
    if not trainable_parameters(model):
        raise UserError("the plan leaves no trainable parameter; train at least one block")
    replicate = _replicate_frozen(cfg, stage)
    frozen_buffers = []
    if filler is None:
        frozen_buffers = _keep_frozen_out_of_zero3(model) if replicate else []
    elif stage == 3:

        def keep_out(module: nn.Module) -> None:
            frozen_buffers.extend(_keep_frozen_out_of_zero3(module, recurse=False))

        from lfdist.engines.zero3_fill import fill_partitioned

        fill_partitioned(filler, model, world.device, ds_config, keep_out if replicate else None)
    else:  # ZeRO-1/2 replicate the weights by design
        from lfdist.engines.fill import fill_from_files

        fill_from_files(filler, model, world.device)
    # DeepSpeed moves the module (buffers included) to its device itself. One group per
    # treatment, each at its own lr, from the parameters materializing made.
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return DeepSpeedEngineAdapter(engine, optimizer, scheduler, cfg, world, stage, frozen_buffers)


def _replicate_frozen(cfg, stage: int) -> bool:
    return stage == 3 and cfg.zero3_replicate_frozen


def release_shm_name(rank: int) -> None:
    """Unlink this rank's name of DeepSpeed's CPU shared-memory all-reduce buffer.

    DeepSpeed's CPU comm op creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    (66 MB) per rank and never unlinks it, so every CPU job left 66 MB per rank in /dev/shm
    (memory, on tmpfs) until the machine ran out: 15 GB on this machine after one day of tests.
    Call after a barrier that follows deepspeed.init_distributed: by then every rank has
    mapped every peer's buffer, and the mappings outlive the name.
    """
    if torch.cuda.is_available():
        return
    # The same strings DeepSpeed's shm_interface reads (an unset variable reads as "").
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass
