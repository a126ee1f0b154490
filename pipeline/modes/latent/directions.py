"""Semantic directions in the conditioning space.

Text models: d = C(target) − C(source), where C(prompt) is *every* floating-point tensor the family's denoiser is
conditioned on for that prompt without CFG (SD: the CLIP hidden states; SDXL: hidden states + pooled embeddings;
PixArt: T5 states; SD3: joint states + pooled projections; Flux: T5 states + pooled CLIP), each padded to the
encoder's length so prompts of different token counts work. A prompt is edited as C(prompt) + s·d on the
conditional half only (the CFG half keeps the empty prompt); integer tensors (masks, ids) are the prompt's own.
Class-conditional models (DiT): d = e(target class) − e(source class) in every block's label-embedding table, added
to the conditional rows' label embeddings (a forward hook on each ``LabelEmbedding``, removed after the call).

Whether a pair is a one-attribute edit, and whether it happened, is the dataset's ground truth
(:meth:`pipeline.data.ground_truth.GroundTruth.edit`, ``edit_rows``).
"""

from __future__ import annotations

import torch

from pipeline.models.adapter import Conditioning

__all__ = ["condition_delta", "shifted"]


def _float_items(kwargs: dict, prefix: str = ""):
    for k, v in kwargs.items():
        if isinstance(v, dict):
            yield from _float_items(v, f"{prefix}{k}.")
        elif isinstance(v, torch.Tensor) and v.is_floating_point():
            yield f"{prefix}{k}", v


def condition_delta(target: Conditioning, source: Conditioning) -> dict[str, torch.Tensor]:
    """{key: C(target) − C(source)} over every floating tensor of two one-sample conditions without CFG."""
    if target.cfg or source.cfg:
        raise ValueError("Expected conditions without CFG for a direction")
    src = dict(_float_items(source.kwargs))
    return {k: (v.float() - src[k].float())[0] for k, v in _float_items(target.kwargs)}


def shifted(cond: Conditioning, delta: dict[str, torch.Tensor], scale: float) -> Conditioning:
    """``cond`` with scale·delta added to its conditional rows (the second half under CFG)."""

    def walk(kwargs: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in kwargs.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                out[k] = walk(v, f"{key}.")
            elif key in delta and isinstance(v, torch.Tensor):
                v = v.clone()
                rows = slice(v.shape[0] // 2, None) if cond.cfg else slice(None)
                v[rows] = (v[rows].float() + scale * delta[key].to(v.device)).to(v.dtype)
                out[k] = v
            else:
                out[k] = v
        return out

    return Conditioning(walk(cond.kwargs), cond.cfg, cond.guidance, cond.n, cond.prompts, cond.class_ids, cond.extra)
