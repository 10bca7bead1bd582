"""Short pilot fine-tunes for `salf` (estimator pilot) and `critical` (SPEC 2.1, 2.3).

Pure torch, one device. `run_pilot` fine-tunes the top `depth` blocks (plus the final norm and
head, as a plan would) for a few steps and measures the loss reduction on held-out calibration
batches; `run_critical` fine-tunes every block and records how far each block moved. Both put
the model back exactly as they found it (weights, requires_grad flags, train/eval mode), and both
are deterministic functions of (weights, data, settings, seed): a Ray task per depth, each with
its own replica, returns the same numbers as the serial loop here.

The results go into the probe file as `curves["pilot"]` and `curves["critical"]`, so that
`select` stays a pure function of probe.json.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lfdist.cost import predict
from lfdist.errors import UserError
from lfdist.model.apply import apply_plan
from lfdist.model.blocks import find_blocks, fingerprint
from lfdist.plan import DEFAULT_MODULES, BlockPlan, Plan
from lfdist.probe.result import ProbeResult
from lfdist.probe.run import _check_data, model_info

PILOT_STEPS = 20
CRITICAL_STEPS = 50
HELDOUT_SAMPLES = 64  # held-out calibration examples each pilot is scored on

ModelLike = nn.Module | Callable[[], nn.Module]


def pilot_depths(spec: str, n_blocks: int) -> list[int]:
    """`auto`: 1, 2, 4, 8, ... below L, then L itself; or a comma list such as "1,2,4,8"."""
    if spec == "auto":
        depths, n = [], 1
        while n < n_blocks:
            depths.append(n)
            n *= 2
        return depths + [n_blocks]
    try:
        depths = sorted({int(x) for x in str(spec).split(",") if x.strip()})
    except ValueError:
        depths = []
    if not depths or depths[0] < 1 or depths[-1] > n_blocks:
        raise UserError(
            f"probe.pilot_depths={spec!r} must be auto or a comma list of block counts in "
            f"1..{n_blocks}, e.g. 1,2,4,{n_blocks}"
        )
    return depths


def split_calibration(
    data: dict[str, torch.Tensor], heldout_samples: int = HELDOUT_SAMPLES
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(train, held-out): every 4th example is held out, at most `heldout_samples` of them.

    Evenly spaced like the probe's own sample, so sorted data stay represented on both sides.
    """
    n = data["input_ids"].shape[0]
    if n < 2:
        raise UserError("pilot fine-tunes need at least 2 calibration examples; give more data")
    held = torch.arange(3, n, 4)[:heldout_samples] if n >= 4 else torch.tensor([n - 1])
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    return {k: v[keep] for k, v in data.items()}, {k: v[held] for k, v in data.items()}


def _materialize(model: ModelLike) -> nn.Module:
    return model if isinstance(model, nn.Module) else model()


def _plan_for(model: nn.Module, treatments: list[str]) -> Plan:
    bmap = find_blocks(model)
    blocks = tuple(BlockPlan(i, f"{bmap.path}.{i}", t) for i, t in enumerate(treatments))
    return Plan("pilot", fingerprint(model), blocks, dict(DEFAULT_MODULES))


@contextmanager
def _trainable(model: nn.Module, treatments: list[str]) -> Iterator[list[nn.Parameter]]:
    """Make the blocks `treatments` names trainable (as apply_plan does); yield those parameters.

    Afterwards weights, requires_grad flags, gradients and train/eval mode are put back; only
    the trainable parameters are copied, since nothing else can change.
    """
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    saved: dict[str, torch.Tensor] = {}
    try:
        apply_plan(model, _plan_for(model, treatments), check_fingerprint=False)
        saved = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
        yield [p for p in params.values() if p.requires_grad]
    finally:
        with torch.no_grad():
            for n, p in params.items():
                if n in saved:
                    p.copy_(saved[n])
                p.grad = None
                p.requires_grad_(flags[n])
        model.train(was_training)


def _targets(batch: dict[str, torch.Tensor], task: str) -> int:
    """How many targets the model's mean loss averages over (the weight of this batch)."""
    if task == "lm":
        return int((batch["labels"][:, 1:] != -100).sum())
    return int(batch["input_ids"].shape[0])


def heldout_loss(model: nn.Module, data: dict, task: str, batch_size: int) -> float:
    """Mean loss over every target of `data` (eval mode, no autograd)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, data["input_ids"].shape[0], batch_size):
            batch = {k: v[start : start + batch_size].to(device) for k, v in data.items()}
            n = _targets(batch, task)
            if n:
                total += float(model(**batch).loss.double()) * n
                count += n
    model.train(was_training)
    return total / count if count else math.nan


def fine_tune(
    model: nn.Module,
    data: dict[str, torch.Tensor],
    params: list[nn.Parameter],
    steps: int,
    lr: float,
    seed: int,
    batch_size: int = 8,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
) -> list[float]:
    """`steps` AdamW steps (constant lr, clipped) on `params`; the training losses.

    Batches are consecutive slices of a seeded permutation, re-drawn each epoch; dropout runs
    under the same seed. The caller restores the model (`_trainable`).
    """
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)
    device = params[0].device
    n = data["input_ids"].shape[0]
    batch_size = min(batch_size, n)
    gen = torch.Generator().manual_seed(seed)
    order, pos, losses = torch.randperm(n, generator=gen), 0, []
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for _ in range(steps):
            if pos + batch_size > n:
                order, pos = torch.randperm(n, generator=gen), 0
            pick = order[pos : pos + batch_size]
            pos += batch_size
            loss = model(**{k: v[pick].to(device) for k, v in data.items()}).loss
            loss.backward()
            if max_grad_norm and max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=False)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    if not all(math.isfinite(v) for v in losses):
        raise UserError(f"a pilot fine-tune diverged (loss {losses[-1]}); lower train.lr")
    return losses


def _train_flops(
    info: dict, treatments: list[str], steps: int, batch_size: int, seq_len: int
) -> float:
    p = predict(
        info,
        treatments,
        DEFAULT_MODULES,
        engine="single",
        dtype="float32",
        batch_size=batch_size,
        seq_len=seq_len,
    )
    return steps * p["flops_per_step"]


def _forward_flops(info: dict, examples: int, seq_len: int) -> float:
    p = predict(
        info,
        ["frozen"] * info["n_blocks"],
        DEFAULT_MODULES,
        engine="single",
        dtype="float32",
        batch_size=1,
        seq_len=seq_len,
    )
    return examples * p["flops_forward"]


def run_pilot(
    model: ModelLike,
    train: dict[str, torch.Tensor],
    heldout: dict[str, torch.Tensor],
    task: str,
    depth: int,
    steps: int = PILOT_STEPS,
    lr: float = 1e-4,
    seed: int = 0,
    batch_size: int = 8,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    loss_before: float | None = None,
) -> dict:
    """Fine-tune the top `depth` blocks (+ final norm and head) for `steps` steps.

    `model`: the pre-trained model (restored before returning) or a factory building it.
    `loss_before`: the pre-trained model's held-out loss when already known (the same for every
    depth; `heldout_loss`), else measured here. Returns gain = held-out loss before - after, the
    two losses, the training losses, seconds and the FLOPs spent (analytic, cost model: the
    training steps plus the held-out passes this call ran).
    """
    model = _materialize(model)
    info = model_info(model, task)
    L = info["n_blocks"]
    if not 1 <= depth <= L:
        raise UserError(f"pilot depth {depth} must be a block count in 1..{L}")
    train, heldout = (
        _check_data(train, task, info["num_labels"]),
        _check_data(heldout, task, info["num_labels"]),
    )
    treatments = ["frozen"] * (L - depth) + ["full"] * depth
    t0 = time.perf_counter()
    with _trainable(model, treatments) as params:
        before = (
            heldout_loss(model, heldout, task, batch_size) if loss_before is None else loss_before
        )
        losses = fine_tune(
            model, train, params, steps, lr, seed, batch_size, weight_decay, max_grad_norm
        )
        after = heldout_loss(model, heldout, task, batch_size)
    seq_len = int(train["input_ids"].shape[1])
    n_held = int(heldout["input_ids"].shape[0])
    flops = _train_flops(info, treatments, steps, min(batch_size, len(train["input_ids"])), seq_len)
    evals = 1 if loss_before is not None else 2
    flops += evals * _forward_flops(info, n_held, int(heldout["input_ids"].shape[1]))
    return {
        "depth": depth,
        "gain": before - after,
        "loss_before": before,
        "loss_after": after,
        "train_losses": losses,
        "seconds": time.perf_counter() - t0,
        "flops": flops,
    }


def assemble_pilots(
    results: list[dict],
    steps: int,
    lr: float,
    seed: int,
    batch_size: int,
    train_examples: int,
    heldout_examples: int,
    seq_len: int,
    run_steps: int | None = None,
    baseline_flops: float = 0.0,
) -> dict:
    """The `curves["pilot"]` record from per-depth `run_pilot` results (any order);
    `baseline_flops`: the shared held-out pass when `loss_before` was measured once outside."""
    results = sorted(results, key=lambda r: r["depth"])
    return {
        "depths": [r["depth"] for r in results],
        "gain": [r["gain"] for r in results],
        "loss_before": [r["loss_before"] for r in results],
        "loss_after": [r["loss_after"] for r in results],
        "seconds": [r["seconds"] for r in results],
        "flops": [r["flops"] for r in results],
        "flops_total": float(sum(r["flops"] for r in results) + baseline_flops),
        "steps": steps,
        "lr": lr,
        "seed": seed,
        "batch_size": batch_size,
        "train_examples": train_examples,
        "heldout_examples": heldout_examples,
        "seq_len": seq_len,
        "run_steps": run_steps,  # the run's optimizer steps, for the pilot cost fraction
    }


def run_pilots(
    model: ModelLike,
    data: dict[str, torch.Tensor],
    task: str,
    depths: str | list[int] = "auto",
    steps: int = PILOT_STEPS,
    lr: float = 1e-4,
    seed: int = 0,
    batch_size: int = 8,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    heldout_samples: int = HELDOUT_SAMPLES,
    run_steps: int | None = None,
) -> dict:
    """Serial pilots at every depth from the same pre-trained weights: `curves["pilot"]`."""
    model = _materialize(model)
    L = find_blocks(model).n_blocks
    depths = (
        pilot_depths(depths, L)
        if isinstance(depths, str)
        else pilot_depths(",".join(map(str, depths)), L)
    )
    if steps < 1:
        raise UserError(f"pilot steps must be >= 1, got {steps}")
    info = model_info(model, task)
    train, heldout = split_calibration(_check_data(data, task, info["num_labels"]), heldout_samples)
    # The pre-trained model's held-out loss is the same for every depth: measure it once.
    t0 = time.perf_counter()
    before = heldout_loss(model, heldout, task, batch_size)
    baseline_s = time.perf_counter() - t0
    results = [
        run_pilot(
            model,
            train,
            heldout,
            task,
            n,
            steps,
            lr,
            seed,
            batch_size,
            weight_decay,
            max_grad_norm,
            loss_before=before,
        )
        for n in depths
    ]
    results[0]["seconds"] += baseline_s
    return assemble_pilots(
        results,
        steps,
        lr,
        seed,
        batch_size,
        int(train["input_ids"].shape[0]),
        int(heldout["input_ids"].shape[0]),
        int(data["input_ids"].shape[1]),
        run_steps,
        _forward_flops(info, int(heldout["input_ids"].shape[0]), int(data["input_ids"].shape[1])),
    )


def _block_change(before: list[torch.Tensor], after: list[torch.Tensor]) -> tuple[float, float]:
    """(||dW||_1 / ||W||_1, angle between W and W' in units of pi) over one block's parameters."""
    diff = sum(float((a.double() - b.double()).abs().sum()) for a, b in zip(after, before))
    norm = sum(float(b.double().abs().sum()) for b in before)
    dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(after, before))
    na = math.sqrt(sum(float(a.double().pow(2).sum()) for a in after))
    nb = math.sqrt(sum(float(b.double().pow(2).sum()) for b in before))
    cos = dot / (na * nb) if na > 0 and nb > 0 else 1.0
    return (diff / norm if norm > 0 else 0.0), math.acos(max(-1.0, min(1.0, cos))) / math.pi


def run_critical(
    model: ModelLike,
    data: dict[str, torch.Tensor],
    task: str,
    steps: int = CRITICAL_STEPS,
    lr: float = 1e-4,
    seed: int = 0,
    batch_size: int = 8,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
) -> dict:
    """Fine-tune every block for `steps` steps; per block relative L1 change and angular distance.

    The `curves["critical"]` record; the model is restored afterwards.
    """
    model = _materialize(model)
    info = model_info(model, task)
    data = _check_data(data, task, info["num_labels"])
    if steps < 1:
        raise UserError(f"critical pilot steps must be >= 1, got {steps}")
    blocks = find_blocks(model).blocks(model)
    before = [[p.detach().clone() for p in b.parameters()] for b in blocks]
    L = len(blocks)
    t0 = time.perf_counter()
    with _trainable(model, ["full"] * L) as params:
        losses = fine_tune(
            model, data, params, steps, lr, seed, batch_size, weight_decay, max_grad_norm
        )
        changes = [
            _block_change(before[i], [p.detach() for p in b.parameters()])
            for i, b in enumerate(blocks)
        ]
    seq_len = int(data["input_ids"].shape[1])
    return {
        "l1": [c[0] for c in changes],
        "angular": [c[1] for c in changes],
        "train_losses": losses,
        "steps": steps,
        "lr": lr,
        "seed": seed,
        "batch_size": batch_size,
        "seconds": time.perf_counter() - t0,
        "flops": _train_flops(
            info, ["full"] * L, steps, min(batch_size, len(data["input_ids"])), seq_len
        ),
    }


def attach(result: ProbeResult, key: str, record: dict) -> ProbeResult:
    """Store a pilot record (`pilot` or `critical`) in the probe result, with its seconds."""
    if key not in ("pilot", "critical"):
        raise ValueError(f"unknown pilot record {key!r}")
    result.curves[key] = record
    secs = record["seconds"]
    result.timings[f"{key}_s"] = float(sum(secs) if isinstance(secs, list) else secs)
    return result
