"""Inception score: exp(E_x KL(p(y|x) ‖ p(y))), per split, mean and std over splits.

Notation (code name → paper name, Salimans et al. 2016):

    logits           → classifier logits for each generated image x (N, C)
    log_p_yx         → log p(y|x) = log_softmax(logits), float64
    p_y              → p(y) = E_x p(y|x), the marginal within one split
    kl               → KL(p(y|x) ‖ p(y)) = Σ_y p(y|x) (log p(y|x) − log p(y))
    score            → exp(mean over the split of KL)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.metrics._checks import _check_positive_int, _features


def _inception_score_compute(log_p_yx: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) ‖ p(y))) for one split of log-probabilities (n, C)."""
    p_yx = log_p_yx.exp()
    # 1. the split's marginal p(y)
    log_p_y = p_yx.mean(dim=0, keepdim=True).log()
    # 2. KL per image (0·log 0 terms are 0: p_yx = 0 multiplies a finite difference or −inf → guard)
    kl = torch.where(p_yx > 0, p_yx * (log_p_yx - log_p_y), torch.zeros_like(p_yx)).sum(dim=1)
    # 3. exp of the mean KL
    return float(kl.mean().exp())


def inception_score(logits: Any, splits: int = 10, seed: int | None = 0) -> tuple[float, float]:
    """Inception score of a set of generated images from their classifier logits.

    Convention: torch-fidelity's ISC. Softmax in float64; rows shuffled by ``np.random.RandomState(seed)
    .permutation(N)`` (``seed=None``: no shuffle), then split at ``i·N // splits`` boundaries; score per split =
    exp(mean KL(p(y|x) ‖ p(y))) with p(y) the split's marginal; returns the mean and the ddof=0 std (``np.std``)
    over splits. ``seed=2020`` (torch-fidelity's default ``rng_seed``) reproduces its numbers on the same logits.
    torchmetrics' ``InceptionScore`` differs: unseeded ``torch.randperm``, ``torch.chunk`` splits and the unbiased
    (ddof=1) std, so its std is larger by √(splits/(splits−1)).

    Args:
        logits: (N, C) classifier logits (not probabilities: softmax is applied here), N ≥ splits.
        splits: number of splits. seed: permutation seed, or None to keep the given order.

    Returns:
        (is_mean, is_std) as Python floats; 1 ≤ IS ≤ C.

    Example:
        >>> import torch
        >>> confident = torch.eye(10).repeat(10, 1) * 50.0   # 100 images, each sure of one of 10 classes
        >>> mean, std = inception_score(confident, splits=1)
        >>> round(mean, 4), std
        (10.0, 0.0)
        >>> round(inception_score(torch.zeros(100, 10), splits=5)[0], 6)  # uniform predictions
        1.0
    """
    splits = _check_positive_int(splits, "splits")
    x = _features(logits, "logits", min_samples=splits, why=f"one per split, splits={splits}")
    if x.shape[1] < 2:
        raise ValueError(f"Expected `logits` over at least 2 classes, got shape {tuple(x.shape)}")
    n = x.shape[0]
    # 1. seeded shuffle, as torch-fidelity
    if seed is not None:
        perm = torch.from_numpy(np.random.RandomState(seed).permutation(n)).to(x.device)
        x = x[perm]
    # 2. log p(y|x) in float64
    log_p_yx = torch.log_softmax(x, dim=1)
    # 3. one score per split at i·N // splits boundaries
    scores = np.array(
        [_inception_score_compute(log_p_yx[i * n // splits : (i + 1) * n // splits]) for i in range(splits)]
    )
    return float(scores.mean()), float(scores.std())


inception_score.higher_is_better = True  # type: ignore[attr-defined]
