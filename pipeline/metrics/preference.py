"""Human-preference scores from embeddings, and the preference probability across candidate images.

The scorers (PickScore, HPS v2.1) are CLIP models fine-tuned on human choices; their score for an (image, prompt)
pair is a scaled cosine of the two embeddings:

* **PickScore** (Kirstain et al., NeurIPS 2023, "Pick-a-Pic"; the inference snippet of the
  ``yuvalkirstain/PickScore_v1`` model card): ``exp(logit_scale) · cos(E_I, E_T)`` on the projected embeddings,
  ``logit_scale`` the model's own parameter (PickScore_v1: exp = 100, so scores read ≈ 18–24);
* **HPS v2 / v2.1** (Wu et al. 2023, ``hpsv2/img_score.py`` of tgxs002/HPSv2): the diagonal of
  ``image_features @ text_features.T`` on L2-normalised features, i.e. ``cos(E_I, E_T)`` with no scale
  (scores read ≈ 0.2–0.35).

Across candidate images for one prompt, the probability that people prefer candidate i is the softmax of the
candidates' scores (Bradley–Terry; PickScore's ``probs = torch.softmax(scores, dim=-1)``); for two candidates
it is the logistic of the score difference.

All math is float64; inputs are (N, d) rows paired row i with row i.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.metrics._checks import _as_float64, _check_finite, _check_same_shape, _features

__all__ = ["preference_scores", "pickscore_scores", "hps_scores", "preference_probs", "pairwise_preference"]


def _unit_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError(f"Expected nonzero embeddings in `{name}`, got {int((norms == 0).sum())} all-zero rows")
    return x / norms


def preference_scores(image_embeds: Any, text_embeds: Any, scale: float = 1.0) -> torch.Tensor:
    """Per pair: ``scale · cos(E_I, E_T)``, float64 (N,). Embeddings need not be normalised (they are here).

    Example:
        >>> import torch
        >>> img = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
        >>> txt = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
        >>> preference_scores(img, txt, scale=100.0).tolist()
        [100.0, 0.0]
    """
    img = _features(image_embeds, "image_embeds")
    txt = _features(text_embeds, "text_embeds")
    _check_same_shape(img, txt, "image_embeds", "text_embeds")
    if not math.isfinite(float(scale)):
        raise ValueError(f"Expected a finite `scale`, got {scale!r}")
    cos = (_unit_rows(img, "image_embeds") * _unit_rows(txt.to(img.device), "text_embeds")).sum(dim=1)
    return float(scale) * cos


def pickscore_scores(image_embeds: Any, text_embeds: Any, logit_scale: float) -> torch.Tensor:
    """PickScore per pair: ``exp(logit_scale) · cos(E_I, E_T)`` (float64 (N,)); ``logit_scale`` is the model's
    parameter before the exponential (PickScore_v1: ln 100 ≈ 4.6052)."""
    return preference_scores(image_embeds, text_embeds, scale=math.exp(float(logit_scale)))


def hps_scores(image_features: Any, text_features: Any) -> torch.Tensor:
    """HPS v2 / v2.1 per pair: ``diag(normalise(E_I) @ normalise(E_T).T)`` = ``cos(E_I, E_T)`` (float64 (N,))."""
    return preference_scores(image_features, text_features, scale=1.0)


def preference_probs(scores: Any, dim: int = -1) -> torch.Tensor:
    """Probability that each candidate is preferred: softmax of the scores along ``dim`` (float64).

    ``scores`` (K,) for K candidates of one prompt, or (P, K) for P prompts. The result does not depend on the
    candidates' order (it permutes with them), and equal scores give equal shares (1/K).

    Example:
        >>> preference_probs([21.0, 21.0]).tolist()
        [0.5, 0.5]
    """
    s = _as_float64(scores, "scores")
    if s.ndim == 0 or s.numel() == 0:
        raise ValueError(f"Expected `scores` with at least one candidate, got shape {tuple(s.shape)}")
    _check_finite(s, "scores")
    return torch.softmax(s, dim=dim)


def pairwise_preference(score_a: Any, score_b: Any) -> torch.Tensor:
    """P(a preferred over b) = softmax([s_a, s_b])[0] = logistic(s_a − s_b), elementwise (float64)."""
    a = _as_float64(score_a, "score_a")
    b = _as_float64(score_b, "score_b")
    if a.shape != b.shape:
        raise ValueError(f"Expected `score_a` and `score_b` of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    _check_finite(a, "score_a")
    _check_finite(b, "score_b")
    return torch.sigmoid(a - b)


preference_scores.higher_is_better = True  # type: ignore[attr-defined]
pickscore_scores.higher_is_better = True  # type: ignore[attr-defined]
hps_scores.higher_is_better = True  # type: ignore[attr-defined]
