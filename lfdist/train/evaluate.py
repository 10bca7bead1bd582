"""Held-out quality: token-level loss and perplexity for causal LMs, accuracy for classifiers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LOGIT_ELEMENTS = 2**27  # logits of one evaluation forward: at most 512 MB in fp32


def batch_sums(model, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """(loss sum, target count, correct count) of one batch, in float64 (pops its labels)."""
    labels = batch.pop("labels")
    logits = model(**batch).logits.float()
    if task == "lm":
        return lm_sums(logits, labels)
    loss = F.cross_entropy(logits, labels, reduction="sum")
    correct = float((logits.argmax(-1) == labels).sum())
    return torch.tensor([loss.item(), float(len(labels)), correct], dtype=torch.float64)


def lm_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(loss sum, target count, 0) of next-token prediction, in float64."""
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    mask = shift_labels != -100
    loss = F.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum")
    return torch.tensor([loss.item(), float(mask.sum()), 0.0], dtype=torch.float64)


def scores(totals: torch.Tensor, n: int, task: str) -> dict[str, float]:
    """evaluate()'s dict from the summed (loss, targets, correct) over n examples."""
    loss_sum, count, correct = totals.tolist()
    if count == 0:
        return {"examples": n, "loss": float("nan")}
    loss = loss_sum / count
    out = {"examples": n, "targets": int(count), "loss": loss}
    if task == "lm":
        out["perplexity"] = math.exp(min(loss, 50.0))
    else:
        out["accuracy"] = correct / count
    return out


@torch.no_grad()
def evaluate(
    model,
    data: dict[str, torch.Tensor],
    task: str,
    batch_size: int = 8,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Held-out sums, sharded over the ranks of a process group (a strided share each).

    Every rank runs the same number of forwards (FSDP and ZeRO-3 forwards are collective):
    a rank whose share ran out repeats a batch and drops its sums.
    """
    import torch.distributed as dist

    device = device or torch.device("cpu")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    n = len(data["input_ids"])
    batch_size = bounded_batch(model, data, task, batch_size)
    mine = torch.arange(rank, n, world)
    n_batches = math.ceil(math.ceil(n / world) / batch_size)
    totals = torch.zeros(3, dtype=torch.float64)
    for b in range(n_batches):
        idx = mine[b * batch_size : (b + 1) * batch_size]
        real = len(idx) > 0
        idx = idx if real else torch.arange(min(batch_size, n))
        sums = batch_sums(model, {k: v[idx].to(device) for k, v in data.items()}, task)
        if real:
            totals += sums
    if world > 1:
        totals = totals.to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    model.train(was_training)
    return scores(totals, n, task)


def bounded_batch(model, data: dict[str, torch.Tensor], task: str, batch_size: int) -> int:
    """A batch whose [B, T, V] logits stay under _LOGIT_ELEMENTS, however long the sequences
    and large the vocabulary (the same on every rank: it depends on shapes and config only)."""
    inner = getattr(model, "module", model)  # DDP and DeepSpeed wrap the HF model
    config = getattr(model, "config", None) or getattr(inner, "config", None)
    width = getattr(config, "vocab_size", None) if task == "lm" else 1
    per_row = data["input_ids"].shape[1] * int(width or 1)
    return max(1, min(batch_size, _LOGIT_ELEMENTS // max(1, per_row)))
