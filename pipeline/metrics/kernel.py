"""Kernel distance (KID): unbiased MMD² with a polynomial kernel, averaged over random subsets.

Notation (code name → paper name, Bińkowski et al. 2018 "Demystifying MMD GANs"):

    x, y             → X = {xᵢ}ᵢ₌₁..m, Y = {yⱼ}ⱼ₌₁..n   real and generated features (one subset each)
    kernel           → k(x, y) = (xᵀy / d + 1)^degree
    k_xx, k_yy, k_xy → K_XX, K_YY, K_XY   Gram matrices
    mmd2             → MMD²_u = Σᵢ≠ⱼ k(xᵢ,xⱼ)/(m(m−1)) + Σᵢ≠ⱼ k(yᵢ,yⱼ)/(n(n−1)) − 2 Σᵢⱼ k(xᵢ,yⱼ)/(mn)

This is the "unbiased" estimator of the reference code (torch-fidelity ``mmd2(mmd_est="unbiased")``,
torchmetrics ``maximum_mean_discrepancy``): the within-set sums drop the diagonal, the cross sum keeps all pairs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.metrics._checks import _check_positive_int, _check_same_dim, _features


def _poly_kernel(x: torch.Tensor, y: torch.Tensor, degree: int) -> torch.Tensor:
    """k(x, y) = (xᵀy / d + 1)^degree for all pairs (float64)."""
    return (x @ y.mT / x.shape[1] + 1.0) ** degree


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, degree: int) -> float:
    """Unbiased polynomial MMD² between the rows of ``x`` (m, d) and ``y`` (n, d); m, n ≥ 2."""
    m, n = x.shape[0], y.shape[0]
    # 1. Gram matrices
    k_xx = _poly_kernel(x, x, degree)
    k_yy = _poly_kernel(y, y, degree)
    k_xy = _poly_kernel(x, y, degree)
    # 2. within-set sums without the diagonal (k(xᵢ, xᵢ) is not an independent pair)
    sum_xx = k_xx.sum() - k_xx.diagonal().sum()
    sum_yy = k_yy.sum() - k_yy.diagonal().sum()
    # 3. cross sum over all m·n pairs
    sum_xy = k_xy.sum()
    return float(sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2.0 * sum_xy / (m * n))


def kernel_distance(
    feats_real: Any,
    feats_fake: Any,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel (Inception) distance: mean and std of the unbiased polynomial MMD² over random subsets.

    Convention: torch-fidelity's KID (also torchmetrics' ``KernelInceptionDistance``): kernel
    k(x, y) = (xᵀy/d + 1)³, ``subsets`` subsets of ``subset_size`` rows drawn without replacement from each set
    (defaults 100 × 1000 as torch-fidelity), std over subsets with ddof=0 (``np.std``). Subsets are drawn exactly
    as torch-fidelity draws them — ``np.random.RandomState(seed)``, per subset ``choice(N_real, size,
    replace=False)`` then ``choice(N_fake, size, replace=False)`` — so ``seed=2020`` (torch-fidelity's default
    ``rng_seed``) reproduces its numbers on the same features (torchmetrics draws with the unseeded global
    ``torch.randperm``). Computed in float64. With one subset covering all samples (``subsets=1``,
    ``subset_size=N``) the result is the unbiased MMD² of the full sets, whatever the seed.

    Args:
        feats_real, feats_fake: (N, d) feature matrices (numpy or torch).
        subsets: number of random subsets. subset_size: rows per subset, ≤ N of both sets.
        degree: polynomial kernel degree. seed: seed of the subset sampler.

    Returns:
        (kid_mean, kid_std) as Python floats.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> real, fake = torch.randn(200, 16, generator=g), torch.randn(200, 16, generator=g) + 0.5
        >>> mean, std = kernel_distance(real, fake, subsets=10, subset_size=100)
        >>> 0.5 < mean < 1.5 and std < 0.3
        True
    """
    subsets = _check_positive_int(subsets, "subsets")
    subset_size = _check_positive_int(subset_size, "subset_size")
    degree = _check_positive_int(degree, "degree")
    if subset_size < 2:
        raise ValueError(f"Expected `subset_size` ≥ 2 (the unbiased MMD² needs pairs), got {subset_size}")
    real = _features(feats_real, "feats_real", min_samples=2, why="the unbiased MMD² needs pairs")
    fake = _features(feats_fake, "feats_fake", min_samples=2, why="the unbiased MMD² needs pairs")
    _check_same_dim(real, fake, "feats_real", "feats_fake")
    n_real, n_fake = real.shape[0], fake.shape[0]
    if subset_size > min(n_real, n_fake):
        raise ValueError(
            f"Expected `subset_size` ≤ the number of samples in both sets, got subset_size={subset_size} with "
            f"{n_real} real and {n_fake} fake samples (lower the subset size or add samples)"
        )
    fake = fake.to(real.device)
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets, dtype=np.float64)
    for i in range(subsets):
        idx_real = torch.from_numpy(rng.choice(n_real, subset_size, replace=False)).to(real.device)
        idx_fake = torch.from_numpy(rng.choice(n_fake, subset_size, replace=False)).to(real.device)
        mmds[i] = _mmd2_unbiased(real[idx_real], fake[idx_fake], degree)
    return float(mmds.mean()), float(mmds.std())


kernel_distance.higher_is_better = False  # type: ignore[attr-defined]
