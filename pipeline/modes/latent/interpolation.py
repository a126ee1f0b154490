"""Interpolation between latents: slerp vs lerp (pure functions).

Interpolation is done on unit-variance noise; the generation path multiplies by the solver's ``init_noise_sigma``
*afterwards* (diffusers pipelines do the same with passed ``latents``). slerp treats each sample (first dimension)
as one vector; near-parallel endpoints fall back to lerp.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["lerp", "slerp", "interpolate", "norm_ratio_mid", "Interpolation"]

Interpolation = Literal["slerp", "lerp"]


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
        raise ValueError(
            f"Expected two batches of the same shape (B, ...), got {tuple(z0.shape)} and {tuple(z1.shape)}"
        )
