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

from pipeline.metrics._checks import _check_positive_int, _device, _FeatureRows


def _poly_kernel(x: torch.Tensor, y: torch.Tensor, degree: int) -> torch.Tensor:
    """k(x, y) = (xᵀy / d + 1)^degree for all pairs (float64; in place on the one Gram buffer)."""
    return torch.mm(x, y.mT).div_(x.shape[1]).add_(1.0).pow_(degree)


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, degree: int) -> float:
    """Unbiased polynomial MMD² between the rows of ``x`` (m, d) and ``y`` (n, d); m, n ≥ 2."""
    m, n = x.shape[0], y.shape[0]
    # 1. within-set sums of the Gram matrices without the diagonal (k(xᵢ, xᵢ) is not an independent pair)
    k_xx = _poly_kernel(x, x, degree)
    sum_xx = k_xx.sum() - k_xx.diagonal().sum()
    del k_xx
    k_yy = _poly_kernel(y, y, degree)
    sum_yy = k_yy.sum() - k_yy.diagonal().sum()
    del k_yy
    # 2. cross sum over all m·n pairs
    sum_xy = _poly_kernel(x, y, degree).sum()
    return float(sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2.0 * sum_xy / (m * n))


def kernel_distance(
    feats_real: Any,
    feats_fake: Any,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    seed: int = 0,
    device: Any = None,
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

    Memory: one subset pair at a time, of which only the drawn rows are read and widened to float64 (the inputs,
    e.g. ``np.load(..., mmap_mode="r")`` memmaps, are never copied whole), and one ``subset_size``² Gram matrix.

    Args:
        feats_real, feats_fake: (N, d) feature matrices (numpy, memmap or torch).
        subsets: number of random subsets. subset_size: rows per subset, ≤ N of both sets.
        degree: polynomial kernel degree. seed: seed of the subset sampler.
        device: where the Gram matrices are computed (float64 on every device; the same subsets, so CPU and
            CUDA agree to rounding, tested to 1e-6 relative); default the device of ``feats_real`` (CPU for numpy).

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
    real = _FeatureRows(feats_real, "feats_real", min_samples=2, why="the unbiased MMD² needs pairs")
    fake = _FeatureRows(feats_fake, "feats_fake", min_samples=2, why="the unbiased MMD² needs pairs")
    if real.dim != fake.dim:
        raise ValueError(
            f"Expected `feats_real` and `feats_fake` to have the same feature dimension, got {real.dim} and {fake.dim}"
        )
    n_real, n_fake = real.n, fake.n
    if subset_size > min(n_real, n_fake):
        raise ValueError(
            f"Expected `subset_size` ≤ the number of samples in both sets, got subset_size={subset_size} with "
            f"{n_real} real and {n_fake} fake samples (lower the subset size or add samples)"
        )
    dev = _device(device, real.device)
    real.check_finite()
    fake.check_finite()
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets, dtype=np.float64)
    for i in range(subsets):
        idx_real = rng.choice(n_real, subset_size, replace=False)
        idx_fake = rng.choice(n_fake, subset_size, replace=False)
        mmds[i] = _mmd2_unbiased(real.take(idx_real, dev), fake.take(idx_fake, dev), degree)
    return float(mmds.mean()), float(mmds.std())


kernel_distance.higher_is_better = False  # type: ignore[attr-defined]
