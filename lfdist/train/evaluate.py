"""Held-out quality: token-level loss and perplexity for causal LMs, accuracy for classifiers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model, data: dict[str, torch.Tensor], task: str, batch_size: int = 8,
             device: torch.device | None = None) -> dict[str, float]:
    """Sums over the whole held-out set. Under FSDP every rank must call this with the same data."""
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval()
    loss_sum, count, correct = 0.0, 0, 0
    n = len(data["input_ids"])
    for i in range(0, n, batch_size):
        batch = {k: v[i : i + batch_size].to(device) for k, v in data.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        if task == "lm":
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            mask = shift_labels != -100
            loss_sum += F.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum").item()
            count += int(mask.sum())
        else:
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum())
            count += len(labels)
    model.train(was_training)
    if count == 0:
        return {"examples": n, "loss": float("nan")}
    loss = loss_sum / count
    out = {"examples": n, "targets": count, "loss": loss}
    if task == "lm":
        out["perplexity"] = math.exp(min(loss, 50.0))
    else:
        out["accuracy"] = correct / count
    return out
