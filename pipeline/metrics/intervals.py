"""Uncertainty of the headline metrics, with a method that is right for each statistic, and FD∞.

The reference side is fixed throughout (its statistics are what a run compares against); only the generated set is
resampled. Intervals are 95 %.

- **FD, KID, CMMD** — smooth functions of U/V-statistics of the generated set: *subsampling without replacement*.
  B subsets of m = N/2 generated samples; the statistic on each; sd_N = sd_subsets · √(m / (N − m)); interval =
  point ± 1.96 · sd_N. A plain bootstrap with replacement is wrong here: duplicated samples shrink the covariance
  and the kernel's within-set term (in the issue's simulation at N = 256 the bootstrap FID interval [34.7, 40.5]
  excluded its own point estimate 20.2). Why √(m/(N − m)) and not √(m/N): subsets of a fixed sample vary by
  Var ≈ σ²(1/m − 1/N) (finite-population correction), not σ²/m, so the spread of the m = N/2 subsets already *is*
  σ²/N. Measured (``tests/test_intervals.py``, d = 32, N = 1000, 50 trials): √(m/N) gave 70 % coverage of a fresh
  draw and would be √2 too narrow; √(m/(N − m)) covers the expected FD at this N in ≥ 90 % of trials.
  The interval is for the statistic's expectation at this N (a re-run with new seeds scatters around it with the
  same sd, so two runs' values differ by up to ~1.96 · √2 · sd). Kernel sums of all B subsets come from one pass
  over the kernel (0/1 weight columns), never B passes.
- **CLIP score, precision, density** — means of per-sample quantities given the reference: *percentile bootstrap*
  over generated samples (B = 200 by default).
- **recall, coverage** — no resampling interval: they depend on the generated set jointly (its k-NN radii; any
  sample in a ball), which duplicates distort; the caller tags ``skipped.<key>_ci``.

FD∞ (Chong & Forsyth, "Effectively Unbiased FID and Inception Score and where to find them", CVPR 2020): FD on
nested random subsets of geometric sizes N/8 … N, a least-squares line in 1/n, its intercept (the FD of infinitely
many samples: comparable across runs of different N).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from pipeline.metrics._checks import _features
from pipeline.metrics.cmmd import SCALE, SIGMA, kernel_block_sums, rbf_kernel
from pipeline.metrics.frechet import frechet_distance
from pipeline.metrics.stats import FeatureStats

__all__ = [
    "subsample_sd",
    "fd_subsample_sd",
    "kernel_subsample_sd",
    "bootstrap_interval",
    "normal_interval",
    "fd_inf",
    "Z95",
]

Z95 = 1.959963984540054


def _subsets(n: int, replicates: int, seed: int) -> np.ndarray:
    """(B, m) sorted row indices of B subsets of m = n // 2 rows without replacement (seeded, numpy)."""
    rng = np.random.RandomState(seed)
    m = n // 2
    return np.sort(np.stack([rng.choice(n, m, replace=False) for _ in range(replicates)]), axis=1)


def subsample_sd(values: np.ndarray | list[float], n: int, m: int) -> float:
    """sd at N of a statistic from its values on subsets of size m without replacement: sd · √(m / (N − m))."""
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1) * math.sqrt(m / (n - m)))


def normal_interval(point: float, sd: float) -> tuple[float, float]:
    return point - Z95 * sd, point + Z95 * sd


def fd_subsample_sd(fake: Any, reference: Any, replicates: int = 20, seed: int = 0) -> float:
    """sd of the FD of ``fake`` (N, d rows; tensor, array or memory map) against fixed reference statistics
    (``ReferenceStats``/``FeatureStats``), from ``replicates`` subsets of N/2 rows."""

    n = len(fake)
    idx = _subsets(n, replicates, seed)
    values = [frechet_distance(FeatureStats.from_features(fake[rows]), reference) for rows in idx]
    return subsample_sd(values, n, idx.shape[1])


def _poly_kernel(degree: int = 3) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.mT / a.shape[1] + 1.0).pow_(degree)

    return k


def kernel_subsample_sd(
    real: Any, fake: Any, kind: str, replicates: int = 20, seed: int = 0, chunk_rows: int = 2048, device: Any = None
) -> float:
    """sd of KID (``kind="kid"``: unbiased polynomial MMD², i ≠ j) or CMMD (``kind="cmmd"``: RBF σ = 10, all pairs,
    × 1000) of ``fake`` against a fixed ``real`` set, from ``replicates`` subsets of N/2 generated rows. The
    reference-only term is the same in every replicate and drops out of the sd; the generated–generated and
    reference–generated kernel sums of all replicates come from one blockwise pass each (0/1 weight columns)."""
    x = _features(real, "real", min_samples=2)
    y = _features(fake, "fake", min_samples=4)
    dev = torch.device(device) if device is not None else x.device
    x, y = x.to(dev), y.to(dev)
    n = y.shape[0]
    idx = _subsets(n, replicates, seed)
    m = idx.shape[1]
    z = torch.zeros(n, replicates, dtype=torch.float64, device=dev)
    z[torch.from_numpy(idx).to(dev), torch.arange(replicates, device=dev).unsqueeze(1)] = 1.0
    if kind == "kid":
        k = _poly_kernel(3)
        diag = ((y * y).sum(dim=1) / y.shape[1] + 1.0).pow(3)  # k(yᵢ, yᵢ): the unbiased estimator leaves i = j out
        within = (kernel_block_sums(y, y, k, chunk_rows, (z, z)) - diag @ z) / (m * (m - 1))
        cross = kernel_block_sums(
            x, y, k, chunk_rows, (torch.ones(x.shape[0], replicates, dtype=torch.float64, device=dev), z)
        ) / (x.shape[0] * m)
        values = within - 2.0 * cross
    elif kind == "cmmd":
        k = rbf_kernel(SIGMA)
        within = kernel_block_sums(y, y, k, chunk_rows, (z, z)) / m**2
        cross = kernel_block_sums(
            x, y, k, chunk_rows, (torch.ones(x.shape[0], replicates, dtype=torch.float64, device=dev), z)
        ) / (x.shape[0] * m)
        values = SCALE * (within - 2.0 * cross)
    else:
        raise ValueError(f"Expected `kind` to be 'kid' or 'cmmd', got {kind!r}")
    return subsample_sd(values.cpu().numpy(), n, m)


def bootstrap_interval(per_sample: Any, replicates: int = 200, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the mean of ``per_sample`` values (resampled with replacement)."""
    v = np.asarray(per_sample.cpu() if isinstance(per_sample, torch.Tensor) else per_sample, dtype=np.float64)
    if v.ndim != 1 or len(v) < 2:
        raise ValueError(f"Expected at least 2 per-sample values in a 1-d array, got shape {v.shape}")
    rng = np.random.RandomState(seed)
    means = np.array([v[rng.randint(0, len(v), len(v))].mean() for _ in range(replicates)])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def fd_inf(fake: Any, reference: Any, points: int = 8, seed: int = 0) -> float:
    """FD∞: FD of nested random subsets of ``points`` geometric sizes from N/8 to N, least-squares line in 1/n,
    intercept. The caller checks N ≥ max(2000, d) (below that the covariances are too poorly estimated)."""

    n = len(fake)
    sizes = sorted({int(round(s)) for s in np.geomspace(n / 8, n, points)})
    order = np.random.RandomState(seed).permutation(n)
    stats, done, values = FeatureStats(), 0, []
    for s in sizes:  # nested: each subset extends the previous one (one pass over the rows)
        rows = np.sort(order[done:s])
        stats.update(fake[rows])
        done = s
        values.append(frechet_distance(stats, reference))
    slope, intercept = np.polyfit(1.0 / np.asarray(sizes, dtype=np.float64), np.asarray(values), 1)
    return float(intercept)
