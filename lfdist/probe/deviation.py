"""Derived curves: the deviation trace d_0..d_L (SPEC 2.1) and the gradient ratios.

Causal LM: d_l = mean logit-lens cross-entropy of latent space l over target tokens; d_L is
the model's own loss. Classifier: nearest-class-centroid cross-entropy, cross-fitted: examples
split by global index parity into halves A and B; centroids and a temperature fitted on one
half score the other, then the halves swap; d_l is the mean over all scored examples.
"""

from __future__ import annotations

import math

import torch

from lfdist.probe.stats import ProbeStats

_BETA_MAX = 1e4  # inverse temperature cap, in units of 1 / (mean squared distance to own centroid)


def lm_deviation(s: ProbeStats) -> list[float]:
    """Mean lens CE per latent space over the positions it scored (interior spaces read every
    LENS_STRIDE-th position, the output all of them; probes written before the stride have no
    per-space count and scored every position)."""
    if s.ce_count is None:
        return (s.ce_sum / max(1, s.count)).tolist()
    return (s.ce_sum / s.ce_count.clamp_min(1)).tolist()


def _sq_dist(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """[n, C] squared Euclidean distances."""
    return (x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)


def _ce(dist: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    logits = -beta * dist
    return torch.logsumexp(logits, 1) - logits.gather(1, y[:, None]).squeeze(1)


def fit_beta(dist: torch.Tensor, y: torch.Tensor) -> float:
    """Inverse temperature minimizing mean CE of softmax(-beta·dist): convex in beta, so bisect
    the derivative E[d_y - E_p d]. Capped where in-sample classes separate perfectly."""
    own = dist.gather(1, y[:, None]).squeeze(1)
    scale = own.mean().clamp_min(1e-12)

    def slope(beta: float) -> float:
        p = torch.softmax(-beta * dist, 1)
        return float((own - (p * dist).sum(1)).mean())

    if slope(0.0) >= 0:  # own centroid no closer than the rest on average: no information
        return 0.0
    lo, hi = 0.0, 1.0 / float(scale)
    while slope(hi) < 0 and hi < _BETA_MAX / float(scale):
        lo, hi = hi, hi * 4
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def _centroids(
    x: torch.Tensor, y: torch.Tensor, n_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    sums = torch.zeros(n_classes, x.shape[1], dtype=x.dtype).index_add_(0, y, x)
    counts = torch.bincount(y, minlength=n_classes)
    return sums / counts.clamp_min(1)[:, None], counts


def _loo_dist(
    x: torch.Tensor, y: torch.Tensor, cent: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Distances with each example left out of its own centroid.

    In-sample distances to one's own centroid are too small, which would fit an overconfident
    temperature; removing x from a class of n gives ||x - mu_-x||^2 = (n/(n-1))^2 ||x - mu||^2.
    """
    d = _sq_dist(x, cent)
    n = counts[y].to(d.dtype)
    own = d.gather(1, y[:, None]).squeeze(1) * (n / (n - 1)) ** 2
    return d.scatter(1, y[:, None], own[:, None])


def centroid_ce(
    x: torch.Tensor, y: torch.Tensor, fit: torch.Tensor, n_classes: int
) -> tuple[float, int, float]:
    """(summed CE on the held-out examples, how many, beta) for one fold."""
    cent, counts = _centroids(x[fit], y[fit], n_classes)
    classes = (counts > 0).nonzero().squeeze(1)
    remap = torch.full((n_classes,), -1, dtype=torch.long)
    remap[classes] = torch.arange(len(classes))
    cent, counts = cent[classes], counts[classes]
    xf, yf = x[fit], remap[y[fit]]
    loo = counts[yf] > 1  # a singleton class has no centroid without its only member
    beta = fit_beta(_loo_dist(xf[loo], yf[loo], cent, counts), yf[loo]) if loo.any() else 0.0
    held = ~fit & (remap[y] >= 0)  # a class unseen in the fitting half cannot be scored
    d = _sq_dist(x[held], cent)
    return float(_ce(d, remap[y[held]], beta).sum()), int(held.sum()), beta


def classify_deviation(s: ProbeStats) -> tuple[list[float], list[float]]:
    """(d_l, fitted inverse temperature per latent space, averaged over the two folds)."""
    x_all = s.sketch.to(torch.float64)
    y = s.sketch_label
    half_a = s.sketch_index % 2 == 0
    devs, temps = [], []
    for layer in range(s.n_latent):
        x = x_all[:, layer]
        total, n, betas = 0.0, 0, []
        for fit in (half_a, ~half_a):
            if fit.all() or not fit.any():
                continue
            ce, k, beta = centroid_ce(x, y, fit, s.num_labels)
            total, n = total + ce, n + k
            betas.append(beta)
        devs.append(total / n if n else math.nan)
        temps.append(sum(betas) / len(betas) if betas else math.nan)
    return devs, temps


def gradnorm_ratio(s: ProbeStats, weight_norm: list[float]) -> list[float]:
    """Per block sqrt(mean over batches of ||grad||^2) / ||W||."""
    rms = (s.grad_sq_sum / max(1, s.grad_batches)).sqrt()
    return [float(g / w) if w > 0 else 0.0 for g, w in zip(rms, weight_norm)]


CONSTANT = 1e-6  # variance across positions below this share of the mean square: constant


def constant_spaces(s: ProbeStats) -> list[int]:
    """Latent spaces whose h_l is the same at every scored position, so they say nothing about
    the task: an encoder classifier pools its [CLS] token, whose h_0 (token + position
    embedding) is identical in every example, so its deviation is chance by construction."""
    if s.count < 2:
        return []
    mean_sq = s.sumsq.sum(1) / s.count
    variance = (s.sumsq / s.count - (s.sum / s.count) ** 2).sum(1)
    return [i for i in range(s.n_latent) if variance[i] <= CONSTANT * mean_sq[i]]


def derive_curves(s: ProbeStats, model_info: dict) -> dict[str, list[float]]:
    curves: dict[str, list[float]] = {}
    if s.task == "lm":
        curves["deviation"] = lm_deviation(s)
    else:
        curves["deviation"], curves["inverse_temperature"] = classify_deviation(s)
    # Root-mean-square norm of h_l: how the residual stream's scale grows with depth.
    rms = (s.sumsq.sum(1) / max(1, s.count)).sqrt()
    curves["hidden_rms"] = rms.tolist()
    curves["constant_spaces"] = constant_spaces(s)
    if s.grad_sq_sum is not None:
        curves["gradnorm"] = gradnorm_ratio(s, model_info["per_block_weight_norm"])
    return curves
