"""CLIP score: text–image agreement from CLIP embeddings (Hessel et al. 2021, with torchmetrics' weight 100)."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.metrics._checks import _check_same_shape, _features


def _unit_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError(f"Expected nonzero embeddings in `{name}`, got {int((norms == 0).sum())} all-zero rows")
    return x / norms


def clip_score(image_embeds: Any, text_embeds: Any) -> float:
    """Mean CLIP score over (image, caption) pairs: mean of 100 · max(cos(E_I, E_C), 0).

    Convention: each pair's score is 100 · max(cos, 0) (Hessel et al.'s CLIPScore with torchmetrics' weight 100
    instead of 2.5), averaged over pairs; embeddings are L2-normalised here (float64). torchmetrics'
    ``clip_score`` clamps the *mean* instead, max(mean(100 · cos), 0): the two agree whenever no pair has a
    negative cosine, which is the usual case for CLIP (cosines ≈ 0.15–0.40).

    Args:
        image_embeds, text_embeds: (N, D) embeddings of N images and their N captions, row i paired with row i.

    Returns:
        The mean score as a Python float in [0, 100].

    Example:
        >>> import torch
        >>> img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> txt = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])   # cos = 0.7071 and −1 (clamped to 0)
        >>> round(clip_score(img, txt), 4)  # (70.7107 + 0) / 2
        35.3553
    """
    return float(clip_scores(image_embeds, text_embeds).mean())


def clip_scores(image_embeds: Any, text_embeds: Any) -> torch.Tensor:
    """Per pair: 100 · max(cos(E_I, E_C), 0), float64 (N,); :func:`clip_score` is their mean."""
    img = _features(image_embeds, "image_embeds")
    txt = _features(text_embeds, "text_embeds")
    _check_same_shape(img, txt, "image_embeds", "text_embeds")
    cos = (_unit_rows(img, "image_embeds") * _unit_rows(txt.to(img.device), "text_embeds")).sum(dim=1)
    return 100.0 * cos.clamp_min(0.0)


clip_score.higher_is_better = True  # type: ignore[attr-defined]
