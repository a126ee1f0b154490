"""Latent-space math of the latent mode, as pure functions: no config, no I/O, no logging.

Notation (code name -> paper name)::

    z               a latent: VAE latent of a latent pipeline, or the pixels x in [-1, 1] of a pixel pipeline
    alpha_prod_t    ᾱ_t = ∏_{s<=t} (1 - β_s)          (the scheduler's ``alphas_cumprod[t]``)
    eps             ε̂_θ(x_t, t)                       (predicted noise)
    pred_x0         x̂_0 = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t   (DDIM eq. 12, "predicted x_0")
    eps_fn          (x_t, t) -> raw model output (in the scheduler's ``prediction_type``)

Conventions (the mode's numbers depend on them):

- **VAE**: encoding and decoding belong to the model adapter (``pipeline.models.adapter.ModelAdapter.encode`` /
  ``decode``): ``z = (mode(q(z|x)) - shift_factor) * scaling_factor`` (the shift only for the families whose
  pipelines apply it, SD3 and Flux), decoding inverts it; ``.mode()``, not ``.sample()``, so latents are
  deterministic.
- **Interpolation** (:func:`slerp`, :func:`lerp`) is done on unit-variance noise; :func:`sample` multiplies by the
  scheduler's ``init_noise_sigma`` *afterwards* (diffusers pipelines do the same with passed ``latents``).
  slerp treats each sample (first dimension) as one vector; near-parallel endpoints fall back to lerp.
- **DDIM inversion** (:func:`ddim_invert`) uses ``DDIMInverseScheduler`` and regeneration (:func:`ddim_sample`)
  ``DDIMScheduler``, both from the same scheduler config and step count, so their timesteps mirror each other;
  eta = 0, one deterministic ODE path in both directions.
- **OOD scores** are "higher = more out-of-distribution". :func:`auroc` is the probability that a random OOD
  sample scores higher than a random in-distribution one (ties count half): 1 = perfect, 0.5 = chance.
  :func:`fpr_at_tpr` takes OOD as the positive class: the threshold τ is the highest one that still flags
  ``tpr`` (95 %) of the OOD samples (score >= τ), and the result is the share of in-distribution samples
  flagged at τ (lower is better).
- **Shrinkage covariance** (:func:`fit_gaussian`): Σ̂ = (1 - s) S + s μ I with S the (1/n) sample covariance,
  μ = tr(S)/d and s from Ledoit & Wolf (2004) or OAS (Chen et al. 2010), written as scikit-learn does
  (same numbers), but on the n x n Gram matrix so d may be large (d = 3 072 pixels costs no d x d matrix).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch

__all__ = [
    "lerp", "slerp", "interpolate", "norm_ratio_mid",
    "psnr",
    "split_model_output", "sample", "ddim_invert", "ddim_sample", "diffusion_reconstruct",
    "GaussianFit", "ledoit_wolf_shrinkage", "oas_shrinkage", "fit_gaussian", "zscore_score", "mahalanobis_score",
    "standardised_mean", "auroc", "fpr_at_tpr",
]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Interpolation = Literal["slerp", "lerp"]
Shrinkage = Literal["ledoit_wolf", "oas"]


# ---------------------------------------------------------------------------------------------- interpolation
def _t_like(t: float | torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """t as a (B, 1, 1, ...) tensor broadcasting over the sample dims of z (a float: one t for all)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=z.device)
    if t.ndim == 0:
        t = t.expand(z.shape[0])
    if t.shape != (z.shape[0],):
        raise ValueError(f"Expected t as a float or a ({z.shape[0]},) tensor, got shape {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (z.ndim - 1)))


def lerp(z0: torch.Tensor, z1: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """(1 - t) z0 + t z1 per sample. For independent N(0, I) endpoints the midpoint's norm is ≈ 1/√2 of theirs."""
    _check_pair(z0, z1)
    tt = _t_like(t, z0)
    return ((1 - tt) * z0.double() + tt * z1.double()).to(z0.dtype)


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: float | torch.Tensor, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation per sample (each z[i] one vector): sin((1-t)Ω)/sin Ω z0 + sin(tΩ)/sin Ω z1,
    Ω the angle between z0[i] and z1[i]. Equal-norm endpoints keep their norm along the path; endpoints with
    |cos Ω| > ``dot_threshold`` (nearly parallel) fall back to :func:`lerp`."""
    _check_pair(z0, z1)
    tt = _t_like(t, z0)
    a, b = z0.double().flatten(1), z1.double().flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)
    omega = torch.arccos(cos.clamp(-1, 1)).reshape_as(tt)
    sin = torch.sin(omega)
    w0 = torch.where(sin.abs() > 1e-12, torch.sin((1 - tt) * omega) / sin, 1 - tt)
    w1 = torch.where(sin.abs() > 1e-12, torch.sin(tt * omega) / sin, tt)
    out = w0 * z0.double() + w1 * z1.double()
    parallel = (cos.abs() > dot_threshold).reshape_as(tt)
    out = torch.where(parallel, (1 - tt) * z0.double() + tt * z1.double(), out)
    return out.to(z0.dtype)


def interpolate(method: Interpolation, z0: torch.Tensor, z1: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    if method == "slerp":
        return slerp(z0, z1, t)
    elif method == "lerp":
        return lerp(z0, z1, t)
    else:
        raise ValueError(f"Expected interpolation 'slerp' or 'lerp', got {method!r}")


def norm_ratio_mid(method: Interpolation, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """Per pair: ‖interp(0.5)‖ / mean(‖z0‖, ‖z1‖). ≈ 0.71 (lerp) vs ≈ 1.0 (slerp) for independent Gaussians."""
    mid = interpolate(method, z0, z1, 0.5).double().flatten(1).norm(dim=1)
    ends = (z0.double().flatten(1).norm(dim=1) + z1.double().flatten(1).norm(dim=1)) / 2
    return mid / ends.clamp_min(1e-30)


def _check_pair(z0: torch.Tensor, z1: torch.Tensor) -> None:
    if z0.shape != z1.shape or z0.ndim < 2:
        raise ValueError(f"Expected two batches of the same shape (B, ...), got {tuple(z0.shape)} and {tuple(z1.shape)}")


# ---------------------------------------------------------------------------------------------- image quality
def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, (N,), of two batches on the same scale (``data_range`` = max - min of that scale)."""
    if a.shape != b.shape:
        raise ValueError(f"Expected two image batches of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))


# ---------------------------------------------------------------------------------------------- sampling
def split_model_output(output: torch.Tensor, x_t: torch.Tensor, alpha_prod_t: torch.Tensor | float,
                       prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, pred_x0) from a raw model output of ``prediction_type`` at noise level ᾱ_t."""
    a = torch.as_tensor(alpha_prod_t, dtype=x_t.dtype, device=x_t.device)
    b = 1 - a
    if prediction_type == "epsilon":
        eps = output
        pred_x0 = (x_t - b.sqrt() * eps) / a.sqrt()
    elif prediction_type == "v_prediction":
        pred_x0 = a.sqrt() * x_t - b.sqrt() * output
        eps = a.sqrt() * output + b.sqrt() * x_t
    elif prediction_type == "sample":
        pred_x0 = output
        eps = (x_t - a.sqrt() * pred_x0) / b.sqrt()
    else:
        raise ValueError(f"Expected prediction_type epsilon, v_prediction or sample, got {prediction_type!r}")
    return eps, pred_x0


def _step_kwargs(scheduler, generator, eta: float) -> dict:
    params = inspect.signature(scheduler.step).parameters
    kw = {}
    if "eta" in params:
        kw["eta"] = eta
    if "generator" in params and generator is not None:
        kw["generator"] = generator
    return kw


@torch.no_grad()
def sample(eps_fn: EpsFn, scheduler, noise: torch.Tensor, steps: int, generator=None, eta: float = 0.0) -> torch.Tensor:
    """Denoise unit-variance ``noise`` with ``scheduler`` (any diffusers solver; it is reset here): scaled by
    ``init_noise_sigma`` first, ``scale_model_input`` before every model call. Returns the clean z / x.
    ``generator`` (one or a list, one per sample) feeds stochastic solvers."""
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    kw = _step_kwargs(scheduler, generator, eta)
    for t in scheduler.timesteps:
        out = eps_fn(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **kw).prev_sample
    return x


def _from_config(cls, config: dict):
    """``cls.from_config`` with only the keys ``cls`` takes (another solver's extra keys would only warn)."""
    params = inspect.signature(cls.__init__).parameters
    return cls.from_config({k: v for k, v in dict(config).items() if k in params or k.startswith("_")})


@torch.no_grad()
def ddim_invert(eps_fn: EpsFn, scheduler_config: dict, x0: torch.Tensor, steps: int, progress=None) -> torch.Tensor:
    """Clean z_0 -> z_T along the deterministic DDIM path (``DDIMInverseScheduler``, ``steps`` steps).

    The model is queried at the *target* timestep with the current sample (the usual approximation
    ε̂(x_{t-1}, t) ≈ ε̂(x_t, t)); its error, not the solver's, is what the round trip measures."""
    from diffusers import DDIMInverseScheduler

    inv = _from_config(DDIMInverseScheduler, scheduler_config)
    inv.set_timesteps(steps, device=x0.device)
    x = x0
    for t in inv.timesteps:
        x = inv.step(eps_fn(x, t), t, x).prev_sample
        if progress is not None:
            progress.update(1)
    return x


@torch.no_grad()
def ddim_sample(eps_fn: EpsFn, scheduler_config: dict, x_t: torch.Tensor, steps: int, progress=None) -> torch.Tensor:
    """z_T -> z_0 with ``DDIMScheduler`` (eta = 0): the mirror image of :func:`ddim_invert` for the same config."""
    from diffusers import DDIMScheduler

    sched = _from_config(DDIMScheduler, scheduler_config)
    sched.set_timesteps(steps, device=x_t.device)
    x = x_t * sched.init_noise_sigma  # 1.0 for DDIM
    for t in sched.timesteps:
        x = sched.step(eps_fn(x, t), t, x, eta=0.0).prev_sample
        if progress is not None:
            progress.update(1)
    return x


@torch.no_grad()
def diffusion_reconstruct(eps_fn: EpsFn, alphas_cumprod: torch.Tensor, x0: torch.Tensor, t: int, steps: int,
                          noise: torch.Tensor, prediction_type: str = "epsilon",
                          clip: float | None = None) -> torch.Tensor:
    """DDPM-OOD reconstruction (Graham et al. 2023): noise x0 to timestep ``t`` with the given ``noise``, then
    denoise back to a clean sample with ``steps`` deterministic DDIM steps on timesteps evenly spaced from
    ``t`` down to 0 (the last step lands on ᾱ = 1). ``clip`` bounds x̂_0 (pixel models trained with clip_sample)."""
    if not 0 < t < len(alphas_cumprod):
        raise ValueError(f"Expected 0 < t < {len(alphas_cumprod)}, got {t}")
    ac = alphas_cumprod.to(device=x0.device, dtype=torch.float64)
    # 1. forward process: x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε
    a_t = ac[t]
    x = (a_t.sqrt() * x0.double() + (1 - a_t).sqrt() * noise.double()).to(x0.dtype)
    # 2. DDIM from t to 0
    ts = np.unique(np.round(np.linspace(t, 0, steps + 1)).astype(int))[::-1]
    for cur, nxt in zip(ts[:-1], ts[1:]):
        a_cur = ac[cur].to(x.dtype)
        a_next = ac[nxt].to(x.dtype) if nxt > 0 else torch.ones((), dtype=x.dtype, device=x.device)
        eps, pred_x0 = split_model_output(eps_fn(x, torch.tensor(int(cur), device=x.device)), x, a_cur, prediction_type)
        if clip is not None:
            pred_x0 = pred_x0.clamp(-clip, clip)
            eps = (x - a_cur.sqrt() * pred_x0) / (1 - a_cur).sqrt()
        x = a_next.sqrt() * pred_x0 + (1 - a_next).sqrt() * eps
    return x


# ---------------------------------------------------------------------------------------------- OOD scores
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
