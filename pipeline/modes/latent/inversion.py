"""Deterministic paths between an image's latent and noise, and DDPM-OOD reconstructions (pure functions of a model
call; no config, no I/O).

Notation (code name -> paper name)::

    alpha_prod_t    ᾱ_t = ∏_{s<=t} (1 - β_s)          (the scheduler's ``alphas_cumprod[t]``)
    eps             ε̂_θ(x_t, t)                       (predicted noise)
    pred_x0         x̂_0 = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t   (DDIM eq. 12, "predicted x_0")
    eps_fn          (x_t, t) -> raw model output (in the scheduler's ``prediction_type``)
    v_fn            (x_σ, t = 1000·σ) -> flow velocity v̂ ≈ ε − x₀   (rectified flow: x_σ = (1 − σ) x₀ + σ ε)

- **DDIM inversion** (ε and v models; :func:`ddim_invert`) uses ``DDIMInverseScheduler`` and regeneration
  (:func:`ddim_sample`) ``DDIMScheduler``, both from the same scheduler config and step count, so their timesteps
  mirror each other; eta = 0, one deterministic ODE path in both directions.
- **Flow inversion** (SD3, Flux; :func:`flow_invert`) integrates the flow ODE dx/dσ = v̂ backwards (σ from 0 up to
  σ_max) with Euler on the solver's own σ grid, and :func:`flow_sample` forwards on the same grid — the reverse
  Euler ODE of the flow, the counterpart of DDIM inversion (the model is queried at the current point, the usual
  approximation ε̂(x_{t-1}, t) ≈ ε̂(x_t, t)).
"""

from __future__ import annotations

import inspect
from typing import Callable

import numpy as np
import torch

__all__ = [
    "split_model_output",
    "ddim_invert",
    "ddim_sample",
    "diffusion_reconstruct",
    "flow_invert",
    "flow_sample",
    "flow_reconstruct",
]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def split_model_output(
    output: torch.Tensor, x_t: torch.Tensor, alpha_prod_t: torch.Tensor | float, prediction_type: str = "epsilon"
) -> tuple[torch.Tensor, torch.Tensor]:
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
def diffusion_reconstruct(
    eps_fn: EpsFn,
    alphas_cumprod: torch.Tensor,
    x0: torch.Tensor,
    t: int,
    steps: int,
    noise: torch.Tensor,
    prediction_type: str = "epsilon",
    clip: float | None = None,
) -> torch.Tensor:
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


@torch.no_grad()
def flow_invert(v_fn: EpsFn, sigmas: torch.Tensor, x0: torch.Tensor, progress=None) -> torch.Tensor:
    """Clean x₀ -> x at σ = sigmas[0] along the flow ODE, Euler on the grid ``sigmas`` (descending, ending at 0,
    as a FlowMatch scheduler's ``sigmas``): x ← x + (σ_{k} − σ_{k+1}) v̂(x, 1000·σ_{k+1}) from the end backwards."""
    s = sigmas.to(torch.float64).tolist()
    x = x0
    for k in range(len(s) - 2, -1, -1):
        lo, hi = s[k + 1], s[k]
        v = v_fn(x, torch.tensor(lo * 1000.0, device=x.device))
        x = (x.float() + (hi - lo) * v.float()).to(x0.dtype)
        if progress is not None:
            progress.update(1)
    return x


@torch.no_grad()
def flow_sample(v_fn: EpsFn, sigmas: torch.Tensor, x: torch.Tensor, progress=None) -> torch.Tensor:
    """x at σ = sigmas[0] -> clean x₀ with Euler on the same grid (what FlowMatchEulerDiscreteScheduler does):
    x ← x + (σ_{k+1} − σ_k) v̂(x, 1000·σ_k)."""
    s = sigmas.to(torch.float64).tolist()
    dtype = x.dtype
    for k in range(len(s) - 1):
        v = v_fn(x, torch.tensor(s[k] * 1000.0, device=x.device))
        x = (x.float() + (s[k + 1] - s[k]) * v.float()).to(dtype)
        if progress is not None:
            progress.update(1)
    return x


@torch.no_grad()
def flow_reconstruct(v_fn: EpsFn, x0: torch.Tensor, sigma: float, steps: int, noise: torch.Tensor) -> torch.Tensor:
    """DDPM-OOD's reconstruction for a flow model: x_σ = (1 − σ) x₀ + σ ε with the given ``noise``, then ``steps``
    Euler steps on σ evenly spaced from ``sigma`` to 0."""
    if not 0 < sigma < 1:
        raise ValueError(f"Expected 0 < sigma < 1, got {sigma}")
    x = ((1 - sigma) * x0.double() + sigma * noise.double()).to(x0.dtype)
    return flow_sample(v_fn, torch.linspace(sigma, 0, steps + 1, dtype=torch.float64), x)
