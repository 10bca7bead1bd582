"""Mergeable probe statistics: float64 sums a sharded run can add up exactly.

Per latent space l = 0..L (h_0 is the input of block 0, h_l the output of block l-1), over
the positions that carry a target:
- count, sum and sum of squares of h_l (vectors of size H);
- causal LM: the summed logit-lens cross-entropy of h_l against the next token;
- classifier: per-class sums of h_l and per-class counts, plus a k-dimensional sketch of each
  example's feature. The nearest-class-centroid deviation needs every example's distance to
  centroids that are only known at the end, which no fixed-size sum captures; the sketch is
  exact when H <= k and a seeded random projection (distances kept up to JL error) otherwise.
  Examples are tagged with their global index, so merging is concatenation in index order;
- optional gradient statistics: per block, the sum over batches of ||grad||^2.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, fields
from typing import Any

import torch

SKETCH_DIM = 128
SKETCH_SEED = 1234


# The logit lens of an interior latent space (0..L-1) scores every LENS_STRIDE-th position
# (by position in the sequence, so any sharding scores the same ones); the output space scores
# all of them, so d_L stays the model's own loss. On a 49k vocabulary the lens over 31 spaces
# costs 6.5 forward passes at every position (SmolLM2-135M); at stride 4, 1.6.
LENS_STRIDE = 4


@dataclass
class ProbeStats:
    task: str
    n_latent: int  # L + 1
    hidden: int
    count: int = 0  # target positions (one per example for classify)
    examples: int = 0
    sum: torch.Tensor | None = None  # [L+1, H] float64
    sumsq: torch.Tensor | None = None  # [L+1, H] float64
    ce_sum: torch.Tensor | None = None  # lm: [L+1] float64
    ce_count: torch.Tensor | None = None  # lm: [L+1] float64, positions each lens scored
    num_labels: int = 0
    class_count: torch.Tensor | None = None  # classify: [C] int64
    class_sum: torch.Tensor | None = None  # classify: [C, L+1, H] float64
    sketch_dim: int = 0
    sketch: torch.Tensor | None = (
        None  # classify: [N, L+1, k] float32, features after the final norm
    )
    sketch_index: torch.Tensor | None = None  # [N] int64, global example index
    sketch_label: torch.Tensor | None = None  # [N] int64
    grad_sq_sum: torch.Tensor | None = None  # [L] float64, sum over batches of ||grad_block||^2
    grad_batches: int = 0

    @classmethod
    def empty(
        cls,
        task: str,
        n_latent: int,
        hidden: int,
        num_labels: int = 0,
        sketch_dim: int = SKETCH_DIM,
    ) -> ProbeStats:
        f64 = dict(dtype=torch.float64)
        s = cls(
            task,
            n_latent,
            hidden,
            sum=torch.zeros(n_latent, hidden, **f64),
            sumsq=torch.zeros(n_latent, hidden, **f64),
        )
        if task == "lm":
            s.ce_sum = torch.zeros(n_latent, **f64)
            s.ce_count = torch.zeros(n_latent, **f64)
        else:
            s.num_labels = num_labels
            s.class_count = torch.zeros(num_labels, dtype=torch.int64)
            s.class_sum = torch.zeros(num_labels, n_latent, hidden, **f64)
            s.sketch_dim = min(hidden, sketch_dim)
            s.sketch = torch.zeros(0, n_latent, s.sketch_dim, dtype=torch.float32)
            s.sketch_index = torch.zeros(0, dtype=torch.int64)
            s.sketch_label = torch.zeros(0, dtype=torch.int64)
        return s

    def add_latent(self, layer: int, h: torch.Tensor) -> None:
        """Add h_layer at the target positions, [n, H] (counted once, at layer 0)."""
        h = h.to(torch.float64)  # reduce on the model's device, accumulate on the CPU
        self.sum[layer] += h.sum(0).cpu()
        self.sumsq[layer] += (h * h).sum(0).cpu()
        if layer == 0:
            self.count += h.shape[0]

    def add_classes(self, layer: int, h: torch.Tensor, labels: torch.Tensor) -> None:
        h = h.to(torch.float64)
        self.class_sum[:, layer].index_add_(0, labels.cpu(), h.cpu())
        if layer == 0:
            self.class_count += torch.bincount(labels.cpu(), minlength=self.num_labels)

    def add_sketch(self, feats: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> None:
        """feats: [n, L+1, k] already projected."""
        self.sketch = torch.cat([self.sketch, feats.to(torch.float32).cpu()])
        self.sketch_index = torch.cat([self.sketch_index, index.cpu()])
        self.sketch_label = torch.cat([self.sketch_label, labels.cpu()])

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(1, self.count)


def sketch_matrix(hidden: int, dim: int) -> torch.Tensor | None:
    """Seeded Gaussian projection H -> k, the same on every rank; None when H <= k (exact)."""
    if hidden <= dim:
        return None
    g = torch.Generator().manual_seed(SKETCH_SEED)
    return torch.randn(hidden, dim, generator=g, dtype=torch.float64) / dim**0.5


_ADDITIVE = ("sum", "sumsq", "ce_sum", "ce_count", "class_count", "class_sum", "grad_sq_sum")


def merge(a: ProbeStats, b: ProbeStats) -> ProbeStats:
    """Statistics of the union of two disjoint shards."""
    for name in ("task", "n_latent", "hidden", "num_labels", "sketch_dim"):
        if getattr(a, name) != getattr(b, name):
            raise ValueError(
                f"cannot merge probe stats: {name} differs ({getattr(a, name)} vs {getattr(b, name)})"
            )
    out = ProbeStats(
        a.task,
        a.n_latent,
        a.hidden,
        a.count + b.count,
        a.examples + b.examples,
        num_labels=a.num_labels,
        sketch_dim=a.sketch_dim,
        grad_batches=a.grad_batches + b.grad_batches,
    )
    for name in _ADDITIVE:
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None):
            if name == "grad_sq_sum":  # one shard ran the gradient pass, the other not
                raise ValueError("cannot merge probe stats: only one shard has gradient statistics")
            raise ValueError(f"cannot merge probe stats: {name} present in only one shard")
        setattr(out, name, None if x is None else x + y)
    if a.sketch is not None:
        index = torch.cat([a.sketch_index, b.sketch_index])
        if index.unique().numel() != index.numel():
            raise ValueError(
                "cannot merge probe stats: shards share example indices; "
                "give each shard its global example_offset"
            )
        order = torch.argsort(index)
        out.sketch = torch.cat([a.sketch, b.sketch])[order]
        out.sketch_index = index[order]
        out.sketch_label = torch.cat([a.sketch_label, b.sketch_label])[order]
    return out


def merge_all(parts: list[ProbeStats]) -> ProbeStats:
    if not parts:
        raise ValueError("nothing to merge")
    out = parts[0]
    for p in parts[1:]:
        out = merge(out, p)
    return out


# --- JSON form: tensors as base64 of their little-endian bytes, so a round trip is exact. ---

_DTYPES = ("float64", "float32", "int64")


def encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    arr = t.detach().cpu().contiguous().numpy()
    data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    return {
        "dtype": str(arr.dtype),
        "shape": list(arr.shape),
        "b64": base64.b64encode(data).decode("ascii"),
    }


def decode_tensor(d: dict[str, Any]) -> torch.Tensor:
    import numpy as np

    if d["dtype"] not in _DTYPES:
        raise ValueError(f"unsupported dtype {d['dtype']!r}")
    dtype = np.dtype(d["dtype"])
    arr = np.frombuffer(base64.b64decode(d["b64"]), dtype=dtype.newbyteorder("<"))
    return torch.from_numpy(arr.astype(dtype).reshape(d["shape"]))


def stats_to_dict(s: ProbeStats) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(s):
        v = getattr(s, f.name)
        out[f.name] = encode_tensor(v) if isinstance(v, torch.Tensor) else v
    return out


def stats_from_dict(d: dict[str, Any]) -> ProbeStats:
    known = {f.name for f in fields(ProbeStats)}
    unknown = set(d) - known
    if unknown:
        raise KeyError(f"unknown stats fields {sorted(unknown)}")
    kw = {k: decode_tensor(v) if isinstance(v, dict) and "b64" in v else v for k, v in d.items()}
    return ProbeStats(**kw)
