"""Semantic directions in the conditioning space.

Text models: d = C(target) − C(source), where C(prompt) is *every* floating-point tensor the family's denoiser is
conditioned on for that prompt without CFG (SD: the CLIP hidden states; SDXL: hidden states + pooled embeddings;
PixArt: T5 states; SD3: joint states + pooled projections; Flux: T5 states + pooled CLIP), each padded to the
encoder's length so prompts of different token counts work. A prompt is edited as C(prompt) + s·d on the
conditional half only (the CFG half keeps the empty prompt); integer tensors (masks, ids) are the prompt's own.
Class-conditional models (DiT): d = e(target class) − e(source class) in every block's label-embedding table, added
to the conditional rows' label embeddings (a forward hook on each ``LabelEmbedding``, removed after the call).

Shapes pairs differing in exactly one attribute are judged by the shapes judge (``flip_rows``).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from pipeline.models.adapter import Conditioning

__all__ = ["shapes_edit", "edited_side", "flip_rows", "condition_delta", "shifted", "class_direction"]


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


@contextlib.contextmanager
def class_direction(denoiser, source: int, target: int, scale: float, cfg: bool):
    """While the block runs, every ``LabelEmbedding`` of ``denoiser`` adds scale·(e(target) − e(source)) to the
    conditional rows of its output (DiT's CFG order is [cond, null]: the first half)."""
    from diffusers.models.embeddings import LabelEmbedding

    def hook(module, args, out):
        d = module.embedding_table.weight[target] - module.embedding_table.weight[source]
        out = out.clone()
        rows = slice(0, out.shape[0] // 2) if cfg else slice(None)
        out[rows] = out[rows] + scale * d.to(out.dtype)
        return out

    handles = [m.register_forward_hook(hook) for m in denoiser.modules() if isinstance(m, LabelEmbedding)]
    if not handles:
        raise ValueError(f"{type(denoiser).__name__} has no LabelEmbedding: no class-embedding direction")
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def shapes_edit(source: str, target: str) -> tuple[str, str, str] | None:
    """(attribute, from, to) if source/target are shapes captions differing in exactly one colour or shape."""
    from pipeline.data.shapes import parse_caption

    try:
        s, t = parse_caption(source), parse_caption(target)
    except ValueError:
        return None
    if len(s) != len(t):
        return None
    diffs = [(k, a, b) for so, to in zip(s, t) for k, (a, b) in enumerate(zip(so, to)) if a != b]
    if len(diffs) != 1 or diffs[0][0] == 2:
        return None
    k, a, b = diffs[0]
    return ("colour" if k == 0 else "shape"), a, b


def edited_side(prompt: str, edit: tuple[str, str, str]) -> str | None:
    """Side of the first object of ``prompt`` whose attribute is the edit's source value (None: not a shapes
    caption, or no such object)."""
    from pipeline.data.shapes import parse_caption

    attr, frm, _ = edit
    try:
        objs = [o for o in parse_caption(prompt) if o[0 if attr == "colour" else 1] == frm]
    except ValueError:
        return None
    return objs[0][2] if objs else None


def flip_rows(judged: dict[float, list], sides: list[str | None], edit: tuple[str, str, str]) -> list[dict]:
    """One row per scale from judge outputs per scale (one judgement per generation, same order as ``sides``).

    flip_rate(s) = share of scored generations (side not None) whose judged attribute on that side is not the
    target at s = 0 and is at s; target_rate / source_rate = share showing the target / source value at s."""
    attr, frm, to = edit
    scored = [i for i, side in enumerate(sides) if side]

    def value(judgement, side):
        got = judgement.get(side)
        return None if got is None else (got[1] if attr == "colour" else got[0])

    vals = {s: [value(j[i], sides[i]) for i in scored] for s, j in judged.items()}
    rows = []
    for s in sorted(judged):
        rows.append({"scale": s, "n": len(scored),
                     "flip_rate": float(np.mean([b != to and v == to for b, v in zip(vals[0.0], vals[s])])),
                     "target_rate": float(np.mean([v == to for v in vals[s]])),
                     "source_rate": float(np.mean([v == frm for v in vals[s]]))})
    return rows
