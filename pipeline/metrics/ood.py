"""Out-of-distribution statistics as pure functions (no models, no I/O): scores are "higher = more OOD".

- :func:`auroc` is the probability that a random OOD sample scores higher than a random in-distribution one (ties
  count half): 1 = perfect, 0.5 = chance. :func:`fpr_at_tpr` takes OOD as the positive class: the threshold τ is the
  highest one that still flags ``tpr`` (95 %) of the OOD samples (score >= τ), and the result is the share of
  in-distribution samples flagged at τ (lower is better).
- **Shrinkage covariance** (:func:`fit_gaussian`): Σ̂ = (1 - s) S + s μ I with S the (1/n) sample covariance,
  μ = tr(S)/d and s from Ledoit & Wolf (2004) or OAS (Chen et al. 2010), written as scikit-learn does (same
  numbers), but on the n x n Gram matrix so d may be large (d = 3 072 pixels costs no d x d matrix).
- :func:`standardised_mean`: DDPM-OOD's (Graham et al. 2023) combination of per-noise-level reconstruction errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

__all__ = [
    "GaussianFit",
    "ledoit_wolf_shrinkage",
    "oas_shrinkage",
    "fit_gaussian",
    "zscore_score",
    "mahalanobis_score",
    "standardised_mean",
    "auroc",
    "fpr_at_tpr",
]

Shrinkage = Literal["ledoit_wolf", "oas"]


@dataclass
class GaussianFit:
    """A Gaussian fitted to n in-distribution samples of dimension d (float64)."""

    mean: torch.Tensor  # (d,)
    std: torch.Tensor  # (d,) per-dimension standard deviation, floored (see fit_gaussian)
    eigvecs: torch.Tensor  # (d, r) principal directions of the sample covariance S, r <= min(n, d)
    eigvals: torch.Tensor  # (r,) their variances (eigenvalues of S)
    mu: float  # tr(S) / d: the shrinkage target's variance
    shrinkage: float  # s in Σ̂ = (1 - s) S + s μ I
    method: str
    n: int


def _gram_terms(xc: torch.Tensor) -> tuple[float, float, float]:
    """For centred X (n, d) with S = XᵀX / n: (tr S, ‖S‖_F², Σ_k ‖x_k‖⁴), via the n x n Gram matrix."""
    n = xc.shape[0]
    gram = xc @ xc.T  # ‖XᵀX‖_F = ‖XXᵀ‖_F
    row_sq = gram.diagonal()  # ‖x_k‖²
    return float(row_sq.sum() / n), float(gram.pow(2).sum() / n**2), float(row_sq.pow(2).sum())


def ledoit_wolf_shrinkage(x: torch.Tensor) -> tuple[float, float]:
    """(s, μ) of Ledoit & Wolf (2004) for samples ``x`` (n, d), centred here; matches
    ``sklearn.covariance.ledoit_wolf_shrinkage``."""
    xc = x.double() - x.double().mean(0)
    n, d = xc.shape
    trace, frob2, row4 = _gram_terms(xc)
    mu = trace / d
    # β̄: how far S is from Σ (its estimation noise); δ: how far S is from μI
    beta = (row4 / n - frob2) / (d * n)
    delta = (frob2 - 2 * mu * trace + d * mu**2) / d
    beta = min(beta, delta)
    return (0.0 if beta == 0 else beta / delta), mu


def oas_shrinkage(x: torch.Tensor) -> tuple[float, float]:
    """(s, μ) of Oracle Approximating Shrinkage (Chen et al. 2010); matches ``sklearn.covariance.oas``."""
    xc = x.double() - x.double().mean(0)
    n, d = xc.shape
    trace, frob2, _ = _gram_terms(xc)
    mu = trace / d
    alpha = frob2 / d**2  # mean of S²
    num = alpha + mu**2
    den = (n + 1) * (alpha - mu**2 / d)
    return (1.0 if den == 0 else min(num / den, 1.0)), mu


def fit_gaussian(x: torch.Tensor, shrinkage: Shrinkage = "ledoit_wolf", min_samples: int = 2) -> GaussianFit:
    """Mean, floored per-dimension std (>= 1e-3 x their mean, so constant dimensions don't divide by 0) and
    a shrinkage covariance of ``x`` (n, d)."""
    x = x.double().flatten(1)
    n, d = x.shape
    if n < min_samples:
        raise ValueError(f"Expected at least {min_samples} samples to fit, got {n}")
    if shrinkage == "ledoit_wolf":
        s, mu = ledoit_wolf_shrinkage(x)
    elif shrinkage == "oas":
        s, mu = oas_shrinkage(x)
    else:
        raise ValueError(f"Expected shrinkage 'ledoit_wolf' or 'oas', got {shrinkage!r}")
    mean = x.mean(0)
    xc = x - mean
    std = xc.pow(2).mean(0).sqrt()
    std = std.clamp_min(1e-3 * float(std.mean()) + 1e-12)
    _, sv, vh = torch.linalg.svd(xc, full_matrices=False)
    return GaussianFit(mean, std, vh.T, sv.pow(2) / n, mu, s, shrinkage, n)


def zscore_score(fit: GaussianFit, x: torch.Tensor) -> torch.Tensor:
    """The baseline: RMS over dimensions of the per-dimension z-scores, ‖(x - m) / σ‖ / √d."""
    z = (x.double().flatten(1) - fit.mean) / fit.std
    return z.norm(dim=1) / math.sqrt(z.shape[1])


def mahalanobis_score(fit: GaussianFit, x: torch.Tensor) -> torch.Tensor:
    """√((x - m)ᵀ Σ̂⁻¹ (x - m)) with Σ̂ the shrinkage covariance, computed in S's eigenbasis:
    Σ̂ = V diag((1-s)λ + sμ) Vᵀ + sμ (I - VVᵀ)."""
    y = x.double().flatten(1) - fit.mean
    proj = y @ fit.eigvecs  # (m, r)
    var = (1 - fit.shrinkage) * fit.eigvals + fit.shrinkage * fit.mu
    floor = max(fit.shrinkage * fit.mu, 1e-12 * max(fit.mu, 1e-30))
    inside = (proj.pow(2) / var.clamp_min(floor)).sum(1)
    rest = (y.pow(2).sum(1) - proj.pow(2).sum(1)).clamp_min(0) / floor
    return (inside + rest).sqrt()


def standardised_mean(fit_errors: torch.Tensor, errors: torch.Tensor) -> torch.Tensor:
    """DDPM-OOD's combination of per-noise-level errors (n, K): z-score each level against the fit set's errors
    at that level, then average over levels -> (m,)."""
    m = fit_errors.double().mean(0)
    s = fit_errors.double().std(0).clamp_min(1e-12)
    return ((errors.double() - m) / s).mean(1)


def _as_np(x: Sequence[float] | torch.Tensor | np.ndarray) -> np.ndarray:
    arr = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    arr = arr.ravel()
    if arr.size == 0:
        raise ValueError("Expected a non-empty set of scores, got none")
    if not np.isfinite(arr).all():
        raise ValueError("Expected finite scores, got NaN/Inf")
    return arr


def auroc(id_scores, ood_scores) -> float:
    """P(score_ood > score_id) + ½ P(equal): the Mann-Whitney U statistic / (n_id n_ood). O((n+m) log n)."""
    ref, pos = np.sort(_as_np(id_scores)), _as_np(ood_scores)
    below = np.searchsorted(ref, pos, side="left")
    at_or_below = np.searchsorted(ref, pos, side="right")
    return float((below.sum() + 0.5 * (at_or_below - below).sum()) / (len(ref) * len(pos)))


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """Share of in-distribution samples flagged (score >= τ) at the highest τ that flags >= ``tpr`` of OOD ones."""
    if not 0 < tpr <= 1:
        raise ValueError(f"Expected tpr in (0, 1], got {tpr}")
    neg, pos = _as_np(id_scores), np.sort(_as_np(ood_scores))[::-1]
    k = max(1, math.ceil(tpr * len(pos) - 1e-9))
    tau = pos[k - 1]
    return float((neg >= tau).mean())
