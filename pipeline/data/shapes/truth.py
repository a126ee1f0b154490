"""What only the shapes dataset knows about its captions and images: which object a caption puts where, the pixels
of a named object in a *generated* image, single-attribute edits between two captions and whether the judge saw an
edit happen. Used through :mod:`pipeline.data.ground_truth`; pure functions of strings, arrays and judgements."""

from __future__ import annotations

import numpy as np

from pipeline.data.shapes.dataset import parse_caption

__all__ = ["FOREGROUND", "segment", "one_attribute_edit", "edited_side", "flip_rows"]

FOREGROUND = 64  # uint8 brightness above which a pixel of a shapes image is object, not black background


def segment(image: np.ndarray, side: str | None) -> np.ndarray:
    """(H, W) bool: the bright pixels of the half ``side`` names (objects never cross the middle column)."""
    fg = image.max(axis=2) > FOREGROUND
    half = np.zeros_like(fg)
    w = fg.shape[1]
    half[:, : w // 2] = side == "left"
    half[:, w // 2 :] = side != "left"
    return fg & half


def one_attribute_edit(source: str, target: str) -> tuple[str, str, str] | None:
    """(attribute, from, to) if source/target are shapes captions differing in exactly one colour or shape."""
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
        rows.append(
            {
                "scale": s,
                "n": len(scored),
                "flip_rate": float(np.mean([b != to and v == to for b, v in zip(vals[0.0], vals[s])])),
                "target_rate": float(np.mean([v == to for v in vals[s]])),
                "source_rate": float(np.mean([v == frm for v in vals[s]])),
            }
        )
    return rows
