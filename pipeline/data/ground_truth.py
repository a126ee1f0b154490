"""What a dataset knows beyond its images: the small ground-truth interfaces generic stages ask.

* :func:`ground_truth` — a judge of generated images (prompt adherence): ``dataset=shapes`` only (caption grammar,
  a trained judge of shape/colour/side).
* :func:`object_masks` — which caption words name which object, and that object's pixels: ``dataset=shapes``
  (masks of its reference images; on *generated* images the prompt gives the side and the object's pixels are
  segmented from the image), and a folder with ``objects.jsonl`` + ``masks/`` (the layout
  :func:`pipeline.data.shapes.export` writes; masks of its reference images only).

A dataset without them gets its scores skipped with a ``skipped.<key>`` tag naming the reason — never computed
from the shapes heuristics on images they were not made for.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

__all__ = ["GroundTruth", "ShapesGroundTruth", "ground_truth", "ObjectTruth", "ObjectMasks", "object_masks",
           "object_word_positions"]

log = logging.getLogger(__name__)


class GroundTruth(Protocol):
    name: str

    def parses(self, prompts: Sequence[str]) -> str | None:
        """None when every prompt is in the dataset's caption grammar, else the reason (naming a prompt)."""

    def adherence(self, images: torch.Tensor, prompts: Sequence[str]) -> list[dict[str, Any]]:
        """One row per image: what the judge saw, and ``correct`` (every captioned object drawn as captioned)."""


class ShapesGroundTruth:
    """Shapes captions ("a red circle on the left and ...") judged by the project's trained ShapesNet."""

    name = "shapes"

    def __init__(self, device: torch.device, judge=None):
        self.device = device
        self._judge = judge  # a ShapesNetExtractor already built for features=[shapes_net], if any

    def parses(self, prompts: Sequence[str]) -> str | None:
        from pipeline.data.shapes import parse_caption

        for p in dict.fromkeys(prompts):
            try:
                parse_caption(p)
            except ValueError as e:
                return str(e)
        return None

    def _judge_net(self):
        if self._judge is None:
            from pipeline.features.shapes_net import ShapesNetExtractor, _resolve

            self._judge = ShapesNetExtractor(_resolve(None), "bilinear", 256, self.device)
        return self._judge

    def adherence(self, images: torch.Tensor, prompts: Sequence[str]) -> list[dict[str, Any]]:
        from pipeline.data.shapes import parse_caption
        from pipeline.zoo.shapes_net import compare

        return [{"prompt": p, "judged": json.dumps(j), **compare(j, parse_caption(p))}
                for p, j in zip(prompts, self._judge_net().judge(images))]


def ground_truth(dataset_cfg: Any, device: torch.device, extractors: dict | None = None) -> GroundTruth | None:
    """The dataset's ground truth, or None when it has none (``dataset=folder``)."""
    kind = getattr(dataset_cfg.kind, "value", dataset_cfg.kind)
    if kind == "shapes":
        return ShapesGroundTruth(device, (extractors or {}).get("shapes_net"))
    return None


# ----------------------------------------------------------------------------------------------- object masks
@dataclass(frozen=True)
class ObjectTruth:
    """One object of a caption: the words naming it (head noun last, e.g. ("red", "circle")), where the caption
    puts it (shapes: "left" | "right"), and its pixels when known (reference images)."""

    words: tuple[str, ...]
    side: str | None = None
    mask: np.ndarray | None = None  # (H, W) bool


@dataclass(frozen=True)
class ReferenceImage:
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    objects: list[ObjectTruth]  # every one with a mask


class ObjectMasks(Protocol):
    name: str

    def objects(self, prompt: str) -> list[ObjectTruth] | None:
        """The objects a prompt names, or None when generated images of it cannot be segmented."""

    def generated_mask(self, image: np.ndarray, obj: ObjectTruth) -> np.ndarray:
        """(H, W) bool: the object's pixels in a generated image (only for objects from :meth:`objects`)."""

    def reference(self, n: int) -> list[ReferenceImage]:
        """Up to ``n`` reference images with their captions and object masks."""


FOREGROUND = 64  # uint8 brightness above which a pixel of a shapes image is object, not black background


class ShapesObjectMasks:
    """Shapes captions ("a red circle on the left and ..."): generated images are segmented by brightness in the
    half the prompt names; reference images carry their painted masks."""

    name = "shapes"

    def __init__(self, dataset_cfg: Any = None):
        self.dataset_cfg = dataset_cfg  # needed for reference() only

    def objects(self, prompt: str) -> list[ObjectTruth] | None:
        from pipeline.data.shapes import parse_caption

        try:
            return [ObjectTruth((colour, shape), side) for colour, shape, side in parse_caption(prompt)]
        except ValueError:
            return None  # not a shapes caption: maps only

    def generated_mask(self, image: np.ndarray, obj: ObjectTruth) -> np.ndarray:
        fg = image.max(axis=2) > FOREGROUND
        half = np.zeros_like(fg)
        w = fg.shape[1]
        half[:, : w // 2] = obj.side == "left"
        half[:, w // 2:] = obj.side != "left"
        return fg & half

    def reference(self, n: int) -> list[ReferenceImage]:
        from pipeline.data.reference import reference_set

        ref = reference_set(self.dataset_cfg, n)
        out = []
        for i in range(ref.n):
            s = ref.item(i)
            out.append(ReferenceImage(s.image, s.caption, [ObjectTruth(tuple(o.words), o.side, o.mask) for o in s.objects]))
        return out


class FolderObjectMasks:
    """A folder with ``objects.jsonl`` — one ``{"file", "caption", "objects": [{"words": [...], "mask":
    "masks/NNNNN_K.png"}, ...]}`` per image — and the mask PNGs (non-zero = object). Generated images of these
    captions cannot be segmented (no grammar): only the reference images are scored."""

    name = "folder"

    def __init__(self, root: Path, meta: Path):
        self.root, self.meta = root, meta

    def objects(self, prompt: str) -> list[ObjectTruth] | None:
        return None

    def generated_mask(self, image: np.ndarray, obj: ObjectTruth) -> np.ndarray:
        raise NotImplementedError("folder datasets have no masks for generated images")

    def reference(self, n: int) -> list[ReferenceImage]:
        from PIL import Image

        from pipeline.data.folder import _load_rgb

        out = []
        for k, line in enumerate(self.meta.read_text().splitlines(), 1):
            if len(out) >= n:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image = _load_rgb(self.root / row["file"])
                objs = []
                for o in row["objects"]:
                    with Image.open(self.root / o["mask"]) as im:
                        mask = np.asarray(im.convert("L")) > 127
                    if mask.shape != image.shape[:2]:
                        raise ValueError(f"mask {o['mask']} is {mask.shape}, image {image.shape[:2]}")
                    objs.append(ObjectTruth(tuple(str(w) for w in o["words"]), o.get("side"), mask))
                out.append(ReferenceImage(image, str(row["caption"]), objs))
            except Exception as err:  # one bad row is skipped and logged, not a crash
                log.warning("%s line %d skipped: %s", self.meta, k, err)
        return out


def object_masks(dataset_cfg: Any) -> ObjectMasks | None:
    """The dataset's object masks, or None (a folder without ``objects.jsonl``)."""
    kind = getattr(dataset_cfg.kind, "value", dataset_cfg.kind)
    if kind == "shapes":
        return ShapesObjectMasks(dataset_cfg)
    if kind == "folder" and dataset_cfg.root:
        root = Path(str(dataset_cfg.root))
        meta = root / "objects.jsonl"
        if meta.is_file():
            return FolderObjectMasks(root, meta)
    return None


def object_word_positions(words: Sequence[str], objects: Sequence[ObjectTruth]) -> list[list[int] | None]:
    """Word indices of each object's words in ``words`` (a prompt split on whitespace), in caption order: the first
    consecutive run equal to the object's words after the previous object's. None for an object whose words are
    not there (truncated away)."""
    out, start = [], 0
    lower = [w.lower().strip(".,;:!?") for w in words]
    for obj in objects:
        target = [w.lower() for w in obj.words]
        k = len(target)
        found = next((p for p in range(start, len(lower) - k + 1) if lower[p : p + k] == target), None)
        out.append(None if found is None else list(range(found, found + k)))
        if found is not None:
            start = found + k
    return out
