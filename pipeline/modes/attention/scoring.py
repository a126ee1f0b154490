"""Scores of attention maps against object masks: DAAM's protocol (min-max normalise, threshold τ, IoU),
normalised spatial entropy, and the resolution ceiling of a token grid. Pure functions, no models."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "iou",
    "normalise",
    "binarise",
    "spatial_entropy",
    "ideal_map",
    "to_image",
    "segmentation_scores",
    "average_precision",
    "CURVE_THRESHOLDS",
]

CURVE_THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))  # τ grid of the IoU-vs-threshold table and plot


def spatial_entropy(m: torch.Tensor) -> float:
    """Normalised spatial entropy in [0, 1] of a non-negative map (1 = uniform)."""
    p = m.clamp_min(0).flatten().double()
    p = p / p.sum().clamp_min(1e-12)
    return float(-(p * p.clamp_min(1e-30).log()).sum() / math.log(p.numel()))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def normalise(m: torch.Tensor) -> np.ndarray:
    """Min-max normalise a heat map to [0, 1] (as DAAM does before thresholding)."""
    m = m.float().cpu()
    lo, hi = m.min(), m.max()
    return ((m - lo) / (hi - lo).clamp_min(1e-12)).numpy()


def binarise(m: torch.Tensor, threshold: float) -> np.ndarray:
    """Min-max normalise a heat map to [0, 1] and threshold it (DAAM's τ)."""
    return normalise(m) >= threshold


def to_image(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(k, h, w) latent-resolution maps -> (k, H, W) image-resolution maps (bilinear, clamped at 0)."""
    return F.interpolate(maps[None].float().cpu(), size=size, mode="bilinear", align_corners=False)[0].clamp_min(0)


def ideal_map(mask: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """The best map a layer with a ``grid`` of cells can hold for ``mask``: the mask's share of each cell,
    upsampled like the real maps. Its IoU is the resolution ceiling of that layer's maps."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return to_image(F.adaptive_avg_pool2d(m, grid)[0], size)[0]


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of ``scores`` ranking the positive ``labels``: Σₙ (Rₙ − Rₙ₋₁) Pₙ over the distinct score
    thresholds, high to low (scikit-learn's ``average_precision_score``, no interpolation). NaN without positives."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    positives = y.sum()
    if positives == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of each run of tied scores
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def segmentation_scores(m: torch.Tensor, mask: np.ndarray) -> tuple[float, float, float]:
    """Zero-shot binary segmentation of one object by one map, as the ImageNet-Segmentation protocol
    (Guillaumin et al. 2014; Chefer et al. 2021) and ConceptAttention (Helbling et al. 2025) report it: the map
    min-max normalised, thresholded at its **mean value**; returns (pixel accuracy, mIoU = the mean of the
    foreground and the background IoU, AP of the normalised map as a pixel score for the foreground)."""
    norm = normalise(m)
    pred = norm > norm.mean()
    truth = np.asarray(mask, dtype=bool)
    accuracy = float((pred == truth).mean())
    miou = float(np.mean([iou(pred, truth), iou(~pred, ~truth)]))
    return accuracy, miou, average_precision(norm, truth)
