"""Captioned shapes: a procedural, deterministic text-to-image dataset with ground-truth masks.

Every image holds one or two flat-coloured objects (a shape in a colour) on a black background. The
image is split into a left and a right half; each object lives inside one half, at least one pixel away
from the middle column, so two objects never overlap or touch.

Conventions (documented because analyses depend on them):

- A one-object image puts its object on a side drawn at random ("a red circle on the left").
- A two-object image has one object per side; the caption names the left object first
  ("a red circle on the left and a blue square on the right").
- Rendering is hard-edged (a pixel belongs to an object iff its centre is inside the shape), so an
  object's mask is exactly the set of pixels painted in its colour.
- Sample ``index`` of ``split`` under ``seed`` is a pure function of (seed, split, index, size, shapes,
  colours, ...). Splits are disjoint *by content*: a drawn scene is kept for a split only if a hash of
  its rendered pixels falls in that split's bucket range, so no image can appear in two splits.

Colours and shapes are looked up by name in :data:`COLOURS` and :data:`SHAPES`; the training lists are
parameters, so out-of-distribution sets use e.g. ``colours=("purple", "orange", "cyan")``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "COLOURS",
    "SHAPES",
    "DEFAULT_COLOURS",
    "DEFAULT_SHAPES",
    "OOD_COLOURS",
    "OOD_SHAPES",
    "SPLITS",
    "BACKGROUND",
    "ShapeObject",
    "Sample",
    "render",
    "ShapesDataset",
    "caption_for",
    "parse_caption",
    "vocabulary",
]

# RGB of every colour a caption may name. Far apart from one another and from the background so a
# classifier (and a person) can tell them apart at a glance.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 80, 240),
    "yellow": (240, 220, 30),
    # not used in training by default: out-of-distribution prompts and images
    "purple": (150, 50, 210),
    "orange": (250, 140, 20),
    "cyan": (30, 220, 230),
    "white": (240, 240, 240),
    "magenta": (235, 40, 200),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)

DEFAULT_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
OOD_COLOURS: tuple[str, ...] = ("purple", "orange", "cyan")
OOD_SHAPES: tuple[str, ...] = ("diamond", "cross")
SIDES: tuple[str, ...] = ("left", "right")

# Fraction of content-hash buckets (out of 100) that belong to each split.
SPLITS: dict[str, tuple[int, int]] = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}


# --- shape inside-tests on pixel-centre coordinates (x, y arrays), centre (cx, cy), radius r ------
def _circle(x, y, cx, cy, r):
    return (x - cx) ** 2 + (y - cy) ** 2 <= r**2


def _square(x, y, cx, cy, r):
    h = 0.85 * r  # same visual area as the circle, roughly
    return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)


def _triangle(x, y, cx, cy, r):
    # upward isosceles triangle: apex (cx, cy - r), base at y = cy + r with half-width r
    t = (y - (cy - r)) / (2 * r)  # 0 at the apex, 1 at the base
    return (t >= 0) & (t <= 1) & (np.abs(x - cx) <= t * r)


def _diamond(x, y, cx, cy, r):
    return np.abs(x - cx) + np.abs(y - cy) <= r


def _cross(x, y, cx, cy, r):
    w = 0.35 * r
    return ((np.abs(x - cx) <= w) & (np.abs(y - cy) <= r)) | ((np.abs(y - cy) <= w) & (np.abs(x - cx) <= r))


SHAPES: dict[str, Callable[..., np.ndarray]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "diamond": _diamond,
    "cross": _cross,
}


@dataclass(frozen=True)
class ShapeObject:
    """One object of a sample: what it is, where it is, and which caption words name it."""

    shape: str
    colour: str
    side: str  # "left" or "right"
    mask: np.ndarray = field(repr=False)  # (H, W) bool, exactly the pixels painted in `colour`
    words: tuple[str, str]  # (colour word, shape word) as they appear in the caption
    word_positions: tuple[int, int]  # their indices in caption.split()


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    caption: str
    objects: list[ShapeObject]


def _check_names(names: Sequence[str], table: dict, what: str) -> tuple[str, ...]:
    names = tuple(names)
    if not names:
        raise ValueError(f"Expected at least one {what}, got an empty list")
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"Unknown {what} {unknown}; expected names from {sorted(table)}")
    return names


def caption_for(objects: Sequence[tuple[str, str, str]]) -> str:
    """Caption for (colour, shape, side) triples, left object first."""
    parts = [f"a {c} {s} on the {side}" for c, s, side in sorted(objects, key=lambda o: SIDES.index(o[2]))]
    return " and ".join(parts)


def parse_caption(caption: str) -> list[tuple[str, str, str]]:
    """Inverse of :func:`caption_for`: (colour, shape, side) triples.

    Raises ValueError naming the caption if it is not in the dataset's grammar.
    """
    out = []
    for part in caption.strip().split(" and "):
        words = part.split()
        if len(words) != 6 or words[0] != "a" or words[3:5] != ["on", "the"] or words[5] not in SIDES:
            raise ValueError(
                f"Caption {caption!r} is not of the form 'a <colour> <shape> on the <left|right>[ and ...]'"
            )
        out.append((words[1], words[2], words[5]))
    return out


def vocabulary(colours: Sequence[str] = tuple(COLOURS), shapes: Sequence[str] = tuple(SHAPES)) -> list[str]:
    """Every word a caption can contain (the text encoder's word list)."""
    return ["a", "on", "the", "and", *SIDES, *colours, *shapes]


def _split_of(image: np.ndarray) -> str:
    bucket = int.from_bytes(hashlib.blake2b(image.tobytes(), digest_size=8).digest(), "little") % 100
    for name, (lo, hi) in SPLITS.items():
        if lo <= bucket < hi:
            return name
    raise AssertionError(bucket)  # SPLITS covers 0..99


def _draw_scene(rng: np.random.Generator, size: int, shapes, colours, p_two: float):
    """(colour, shape, side, cx, cy, r) per object; geometry keeps each object inside its half."""
    sides = list(SIDES) if rng.random() < p_two else [SIDES[int(rng.integers(2))]]
    half = size / 2
    scene = []
    for side in sides:
        r = rng.uniform(0.12, 0.19) * size
        # the object's extent (|dx|, |dy| <= r) stays >= 1 px from the image border and the middle column
        lo, hi = r + 1, half - r - 1
        cx = rng.uniform(lo, hi) + (half if side == "right" else 0.0)
        cy = rng.uniform(r + 1, size - r - 1)
        colour, shape = colours[int(rng.integers(len(colours)))], shapes[int(rng.integers(len(shapes)))]
        scene.append((colour, shape, side, cx, cy, r))
    return scene


def _paint(scene, size: int):
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUND
    masks = []
    for colour, shape, _side, cx, cy, r in scene:
        mask = SHAPES[shape](xs, ys, cx, cy, r)
        image[mask] = COLOURS[colour]
        masks.append(mask)
    return image, masks


_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def render(
    index: int,
    split: str = "train",
    seed: int = 0,
    size: int = 32,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    colours: Sequence[str] = DEFAULT_COLOURS,
    p_two: float = 0.5,
) -> Sample:
    """Render sample ``index`` of ``split``: a pure function of its arguments.

    ``p_two`` is the probability of a two-object image.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {list(SPLITS)}")
    if size < 16:
        raise ValueError(f"Expected size >= 16 pixels, got {size}")
    shapes = _check_names(shapes, SHAPES, "shape")
    colours = _check_names(colours, COLOURS, "colour")
    # one independent stream per (seed, split, index); scenes whose pixels hash into another split are
    # redrawn from the same stream, which makes the splits disjoint by content
    rng = np.random.default_rng([int(seed), _SPLIT_IDS[split], int(index)])
    while True:
        scene = _draw_scene(rng, size, shapes, colours, p_two)
        image, masks = _paint(scene, size)
        if _split_of(image) == split:
            break
    caption = caption_for([(c, s, side) for c, s, side, *_ in scene])
    objects = []
    for k, ((colour, shape, side, *_), mask) in enumerate(zip(scene, masks)):
        base = 7 * k + 1  # "a <colour> <shape> on the <side>" + "and" = 7 words per object, left first
        objects.append(ShapeObject(shape, colour, side, mask, (colour, shape), (base, base + 1)))
    return Sample(image, caption, objects)


class ShapesDataset:
    """``n`` samples of one split; ``dataset[i]`` is :func:`render` (i, split, seed, ...)."""

    def __init__(
        self,
        split: str = "train",
        n: int = 1000,
        seed: int = 0,
        size: int = 32,
        shapes: Sequence[str] = DEFAULT_SHAPES,
        colours: Sequence[str] = DEFAULT_COLOURS,
        p_two: float = 0.5,
    ):
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; expected one of {list(SPLITS)}")
        if n < 1:
            raise ValueError(f"Expected n >= 1 samples, got {n}")
        self.split, self.n, self.seed, self.size, self.p_two = split, int(n), int(seed), int(size), float(p_two)
        self.shapes = _check_names(shapes, SHAPES, "shape")
        self.colours = _check_names(colours, COLOURS, "colour")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Sample:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} samples")
        return render(i % self.n, self.split, self.seed, self.size, self.shapes, self.colours, self.p_two)

    def __iter__(self):
        return (self[i] for i in range(self.n))

    @property
    def captions(self) -> list[str]:
        return [s.caption for s in self]

    def arrays(self) -> tuple[np.ndarray, list[str]]:
        """All images as one (N, H, W, 3) uint8 array, and the captions."""
        samples = list(self)
        return np.stack([s.image for s in samples]), [s.caption for s in samples]
