"""Vendi score (Friedman & Dieng, "The Vendi Score: A Diversity Evaluation Metric for Machine Learning", TMLR 2023):
the effective number of distinct samples.

Convention (their ``vendi_score`` package with the cosine-similarity kernel): rows are L2-normalised,
K = X Xᵀ (kᵢᵢ = 1), λ = eigenvalues of K / N, Vendi = exp(−Σ λ log λ) over λ > 0. It is 1 when all samples are
the same direction and N when they are orthogonal. K / N and the d × d Gram Xᵀ X / N share their non-zero
eigenvalues, so the score is computed from the smaller of the two (memory O(min(N, d)²), float64).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.metrics._checks import _features

__all__ = ["vendi_score"]


def vendi_score(features: Any, chunk_rows: int = 4096) -> float:
    """Vendi score of an (N, d) feature matrix (cosine-similarity kernel).

    Example:
        >>> import torch
        >>> round(vendi_score(torch.eye(5)), 6), round(vendi_score(torch.ones(7, 3)), 6)
        (5.0, 1.0)
    """
    x = _features(features, "features", min_samples=1)
    n, d = x.shape
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError(
            "Expected non-zero feature vectors (the cosine kernel is undefined for a zero vector), "
            f"got {int((norms == 0).sum())} zero row(s)"
        )
    if n <= d:
        xn = x / norms
        k = xn @ xn.mT / n
    else:  # Xᵀ X / N accumulated in row chunks: the same non-zero spectrum, d × d
        k = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        for start in range(0, n, chunk_rows):
            xn = x[start : start + chunk_rows] / norms[start : start + chunk_rows]
            k.addmm_(xn.mT, xn)
        k /= n
    lam = torch.linalg.eigvalsh(k).clamp_min(0.0)
    lam = lam[lam > 1e-15]
    return float(torch.exp(-(lam * lam.log()).sum()))


vendi_score.higher_is_better = True  # type: ignore[attr-defined]
