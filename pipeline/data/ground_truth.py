"""What a dataset knows beyond its images: the small ground-truth interfaces generic stages ask, so that no mode
compares a dataset's name or kind or parses its captions.

* :func:`ground_truth` — a judge of generated images: prompt adherence (:meth:`GroundTruth.adherence`) and
  single-attribute edits between two prompts (:meth:`GroundTruth.edit`, :meth:`GroundTruth.edited_object`,
  :meth:`GroundTruth.edit_rows`): ``dataset=shapes`` only (caption grammar, a trained judge of shape/colour/side).
  :func:`no_judge` says why a dataset has none, naming the datasets that have one.
* :func:`object_masks` — which caption words name which object, and that object's pixels: ``dataset=shapes``
  (masks of its reference images; on *generated* images the prompt gives the side and the object's pixels are
  segmented from the image: :attr:`ObjectMasks.segments_generated`), and a folder with ``objects.jsonl`` +
  ``masks/`` (the layout :func:`pipeline.data.shapes.export` writes; masks of its reference images only).
  ``objects.jsonl`` is untrusted: malformed lines and paths leaving the folder are skipped, counted and never
  opened (:class:`FolderObjectMasks`). :func:`no_object_masks` says why a dataset has none.

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
from PIL import Image

from pipeline.data.folder import _json_type, _load_rgb, dataset_path, read_jsonl, to_rgb
from pipeline.data.reference import dataset_kind, reference_set
from pipeline.data.shapes import parse_caption
from pipeline.data.shapes import truth as shapes_truth
from pipeline.features.shapes_net import ShapesNetExtractor, _resolve
from pipeline.zoo.shapes_net import compare

__all__ = [
    "GroundTruth",
    "ShapesGroundTruth",
    "ground_truth",
    "no_judge",
    "judged_datasets",
    "ObjectTruth",
    "ObjectMasks",
    "object_masks",
    "no_object_masks",
    "no_segmentation",
    "object_word_positions",
    "FolderObjectMasks",
    "load_mask",
]

log = logging.getLogger(__name__)


class GroundTruth(Protocol):
    name: str

    def parses(self, prompts: Sequence[str]) -> str | None:
        """None when every prompt is in the dataset's caption grammar, else the reason (naming a prompt)."""

    def adherence(self, images: torch.Tensor, prompts: Sequence[str]) -> list[dict[str, Any]]:
        """One row per image: what the judge saw, and ``correct`` (every captioned object drawn as captioned)."""

    def edit(self, source: str, target: str) -> tuple[str, str, str] | None:
        """(attribute, from, to) when the two prompts differ in exactly one attribute of one object, else None."""

    def edited_object(self, prompt: str, edit: tuple[str, str, str]) -> str | None:
        """Which object of ``prompt`` the edit applies to (shapes: its side), None when none does."""

    def judge(self, images: torch.Tensor) -> list:
        """What the judge sees in each generated image (uint8 or [0, 1] NCHW)."""

    def edit_rows(self, judged: dict[float, list], objects: list[str | None], edit: tuple[str, str, str]) -> list[dict]:
        """Per edit scale: ``flip_rate`` (judged not the target at scale 0 and the target at the scale), ``n``,
        ``target_rate``, ``source_rate``, from :meth:`judge`'s outputs per scale and :meth:`edited_object` per image."""


class ShapesGroundTruth:
    """Shapes captions ("a red circle on the left and ...") judged by the project's trained ShapesNet."""

    name = "shapes"

    def __init__(self, device: torch.device, judge=None):
        self.device = device
        self._judge = judge  # a ShapesNetExtractor already built for features=[shapes_net], if any

    def parses(self, prompts: Sequence[str]) -> str | None:
        for p in dict.fromkeys(prompts):
            try:
                parse_caption(p)
            except ValueError as e:
                return str(e)
        return None

    def _judge_net(self) -> ShapesNetExtractor:
        if self._judge is None:
            self._judge = ShapesNetExtractor(_resolve(None), "bilinear", 256, self.device)
        return self._judge

    def adherence(self, images: torch.Tensor, prompts: Sequence[str]) -> list[dict[str, Any]]:
        return [
            {"prompt": p, "judged": json.dumps(j), **compare(j, parse_caption(p))}
            for p, j in zip(prompts, self._judge_net().judge(images))
        ]

    def edit(self, source: str, target: str) -> tuple[str, str, str] | None:
        return shapes_truth.one_attribute_edit(source, target)

    def edited_object(self, prompt: str, edit: tuple[str, str, str]) -> str | None:
        return shapes_truth.edited_side(prompt, edit)

    def judge(self, images: torch.Tensor) -> list:
        return self._judge_net().judge(images)

    def edit_rows(self, judged: dict[float, list], objects: list[str | None], edit: tuple[str, str, str]) -> list[dict]:
        return shapes_truth.flip_rows(judged, objects, edit)


_JUDGED = {"shapes": ShapesGroundTruth}  # dataset kind -> its ground truth (a judge of generated images)


def judged_datasets() -> list[str]:
    """The dataset kinds with a judge of generated images."""
    return sorted(_JUDGED)


def no_judge(dataset_cfg: Any, purpose: str = "judge prompts with") -> str | None:
    """None when the dataset has a ground truth (:func:`ground_truth`), else why not, naming the datasets that do."""
    if dataset_kind(dataset_cfg) in _JUDGED:
        return None
    return (
        f"dataset {dataset_cfg.name!r} has no ground truth to {purpose}; datasets with a judge: "
        f"{', '.join(judged_datasets())}"
    )


def ground_truth(dataset_cfg: Any, device: torch.device, extractors: dict | None = None) -> GroundTruth | None:
    """The dataset's ground truth, or None when it has none (``dataset=folder``; :func:`no_judge` says why)."""
    cls = _JUDGED.get(dataset_kind(dataset_cfg))
    return None if cls is None else cls(device, (extractors or {}).get("shapes_net"))


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
    segments_generated: bool  # True: :meth:`objects` / :meth:`generated_mask` work on generated images

    def objects(self, prompt: str) -> list[ObjectTruth] | None:
        """The objects a prompt names, or None when generated images of it cannot be segmented."""

    def generated_mask(self, image: np.ndarray, obj: ObjectTruth) -> np.ndarray:
        """(H, W) bool: the object's pixels in a generated image (only for objects from :meth:`objects`)."""

    def reference(self, n: int) -> list[ReferenceImage]:
        """Up to ``n`` reference images with their captions and object masks."""


FOREGROUND = shapes_truth.FOREGROUND


class ShapesObjectMasks:
    """Shapes captions ("a red circle on the left and ..."): generated images are segmented by brightness in the
    half the prompt names; reference images carry their painted masks."""

    name = "shapes"
    segments_generated = True

    def __init__(self, dataset_cfg: Any = None):
        self.dataset_cfg = dataset_cfg  # needed for reference() only

    def objects(self, prompt: str) -> list[ObjectTruth] | None:
        try:
            return [ObjectTruth((colour, shape), side) for colour, shape, side in parse_caption(prompt)]
        except ValueError:
            return None  # not a shapes caption: maps only

    def generated_mask(self, image: np.ndarray, obj: ObjectTruth) -> np.ndarray:
        return shapes_truth.segment(image, obj.side)

    def reference(self, n: int) -> list[ReferenceImage]:
        ref = reference_set(self.dataset_cfg, n)
        out = []
        for i in range(ref.n):
            s = ref.item(i)
            out.append(
                ReferenceImage(s.image, s.caption, [ObjectTruth(tuple(o.words), o.side, o.mask) for o in s.objects])
            )
        return out


_OBJECTS_ROW = (
    '{"file": "<image path>", "caption": "<text>", "objects": [{"words": ["<word>", ...], '
    '"mask": "<mask path>", "side": <optional string>}, ...]}'
)


def _objects_row_error(root: Path, row: Any) -> str | None:
    """Why a parsed ``objects.jsonl`` line is refused (None: good). Every path on the line is checked here, before
    any file is opened (:func:`pipeline.data.folder.dataset_path`)."""
    if not isinstance(row, dict):
        return f"expected a JSON object {_OBJECTS_ROW}, got {_json_type(row)}"
    missing = [k for k in ("file", "caption", "objects") if k not in row]
    if missing:
        return f"no {' or '.join(repr(k) for k in missing)} key; expected {_OBJECTS_ROW}"
    if not isinstance(row["caption"], str) or not row["caption"].strip():
        return (
            f"caption is {_json_type(row['caption'])} ({json.dumps(row['caption'])[:60]}); expected a non-empty string"
        )
    if not isinstance(row["objects"], list) or not row["objects"]:
        return f"objects is {_json_type(row['objects'])}; expected a non-empty array of objects"
    try:
        dataset_path(root, row["file"])
    except ValueError as err:
        return f"file: {err}"
    for k, o in enumerate(row["objects"]):
        if not isinstance(o, dict) or "words" not in o or "mask" not in o:
            return f'objects[{k}]: expected {{"words": [...], "mask": ...}}, got {json.dumps(o)[:80]}'
        words = o["words"]
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
            return f"objects[{k}].words: expected a non-empty array of non-empty strings, got {json.dumps(words)[:80]}"
        if not isinstance(o.get("side"), (str, type(None))):
            return f"objects[{k}].side is {_json_type(o['side'])}; expected a string or null"
        try:
            dataset_path(root, o["mask"])
        except ValueError as err:
            return f"objects[{k}].mask: {err}"
    return None


_INTEGER_MODES = ("1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N")


def load_mask(path: Path) -> np.ndarray:
    """(H, W) bool: a mask file's object pixels. The file is read with :func:`pipeline.data.folder.to_rgb` (any PIL
    mode, full range scaled, alpha dropped) and a pixel is object where its largest channel is above half the range
    (> 127 of 255: 0/255 masks, 16-bit 0/65535 masks and antialiased edges at half coverage). A single-band integer
    mask whose values are all 0 or 1 — a 0/1 label image — is read as is (1 = object)."""
    with Image.open(path) as im:
        im.load()
        if im.mode in _INTEGER_MODES:
            raw = np.asarray(im)
            if raw.size and raw.min() >= 0 and raw.max() == 1:  # a 0/1 label image: threshold would empty it
                return raw == 1
        return to_rgb(im).max(axis=2) > 127


class FolderObjectMasks:
    """A folder with ``objects.jsonl`` — one ``{"file", "caption", "objects": [{"words": [...], "mask":
    "masks/NNNNN_K.png"}, ...]}`` per image — and the mask PNGs (object where above half the range:
    :func:`load_mask`). Generated images of these captions cannot be segmented (no grammar): only the reference
    images are scored.

    ``objects.jsonl`` is untrusted data: a line that is not such an object (a non-string caption or word, a missing
    key, not JSON), whose image or mask path is absolute, has a ``..`` component or resolves outside the folder
    (symbolic links followed; :func:`pipeline.data.folder.dataset_path`), or whose image or mask cannot be read is
    skipped with a warning naming the file, the line and the reason, and recorded in :attr:`bad_lines`. A refused
    path is never opened. There is no switch to allow paths outside the folder: copy the files into it."""

    name = "folder"
    segments_generated = False

    def __init__(self, root: Path, meta: Path):
        self.root, self.meta = root, meta
        self.bad_lines: list[tuple[int, str]] = []  # (line number, reason) skipped by the last reference()

    @property
    def num_bad_lines(self) -> int:
        return len(self.bad_lines)

    def objects(self, prompt: str) -> list[ObjectTruth] | None:
        return None

    def generated_mask(self, image: np.ndarray, obj: ObjectTruth) -> np.ndarray:
        raise NotImplementedError("folder datasets have no masks for generated images")

    def reference(self, n: int) -> list[ReferenceImage]:
        out: list[ReferenceImage] = []
        self.bad_lines = []
        for k, row, error in read_jsonl(self.meta):
            if len(out) >= n:
                break
            if error is None:
                error = _objects_row_error(self.root, row)
            if error is None:
                try:  # paths checked above: only files inside the folder are opened
                    image = _load_rgb(self.root / dataset_path(self.root, row["file"]))
                    objs = []
                    for o in row["objects"]:
                        mask = load_mask(self.root / dataset_path(self.root, o["mask"]))
                        if mask.shape != image.shape[:2]:
                            raise ValueError(f"mask {o['mask']} is {mask.shape}, image {image.shape[:2]}")
                        objs.append(ObjectTruth(tuple(o["words"]), o.get("side"), mask))
                    out.append(ReferenceImage(image, row["caption"], objs))
                except Exception as err:  # PIL raises several types for corrupt data; one bad row is not a crash
                    error = f"{type(err).__name__}: {err}"
            if error is not None:
                self.bad_lines.append((k, error))
                log.warning("%s line %d skipped: %s", self.meta, k, error)
        if self.bad_lines:
            shown = ", ".join(str(k) for k, _ in self.bad_lines[:10]) + (", ..." if len(self.bad_lines) > 10 else "")
            log.warning("%s: %d line(s) skipped (lines %s)", self.meta, len(self.bad_lines), shown)
        return out


def no_object_masks(dataset_cfg: Any) -> str:
    """Why :func:`object_masks` gave None for this dataset (and what would give masks)."""
    return (
        f"dataset {dataset_cfg.name!r} has no object masks (objects.jsonl + masks/, the layout "
        "`python -m pipeline.data.shapes.export DIR` writes)"
    )


def no_segmentation(dataset_cfg: Any) -> str:
    """Why generated images of this dataset's captions cannot be segmented (:attr:`ObjectMasks.segments_generated`)."""
    able = ", ".join(sorted(k for k, cls in _MASKS.items() if cls.segments_generated))
    return (
        f"dataset {dataset_cfg.name!r} cannot segment generated images (no caption grammar); datasets that can: {able}"
    )


_MASKS = {"shapes": ShapesObjectMasks, "folder": FolderObjectMasks}


def object_masks(dataset_cfg: Any) -> ObjectMasks | None:
    """The dataset's object masks, or None (a folder without ``objects.jsonl``: :func:`no_object_masks`)."""
    kind = dataset_kind(dataset_cfg)
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
