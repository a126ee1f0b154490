"""Image-similarity measures as pure functions."""

from __future__ import annotations

import torch

__all__ = ["psnr"]


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, (N,), of two batches on the same scale (``data_range`` = max - min of that scale)."""
    if a.shape != b.shape:
        raise ValueError(f"Expected two image batches of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))
