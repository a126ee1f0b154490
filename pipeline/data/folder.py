"""A folder of real images with optional captions: how users bring their own reference set.

``root/`` holds image files (png, jpg, jpeg, webp, bmp; top level only, sorted by name) and optionally
``captions.jsonl`` with one ``{"file": "<name relative to root>", "caption": "..."}`` per line. Files
that cannot be decoded are skipped, counted in ``num_skipped`` and logged — never a crash. A folder
with no readable image is a ValueError naming the path.
"""

from __future__ import annotations

import json
import logging
import pathlib
from dataclasses import dataclass

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "FolderSample", "FolderDataset"]

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class FolderSample:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    caption: str | None
    path: pathlib.Path


def _load_rgb(path: pathlib.Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # decode now: a truncated file must fail here, not later
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


class FolderDataset:
    """Images of ``root`` (decoded and checked once, at construction) with their captions, if any."""

    def __init__(self, root: str | pathlib.Path, captions_file: str | None = "captions.jsonl"):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise ValueError(f"dataset folder {self.root} does not exist or is not a directory")
        self.captions = self._read_captions(captions_file) if captions_file else {}
        candidates = sorted(p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        self.paths: list[pathlib.Path] = []
        self.skipped: list[pathlib.Path] = []
        for p in candidates:
            try:
                _load_rgb(p)
            except Exception as err:  # PIL raises several types for corrupt data
                log.warning("skipping unreadable image %s: %s", p, err)
                self.skipped.append(p)
            else:
                self.paths.append(p)
        if not self.paths:
            raise ValueError(
                f"dataset folder {self.root} has no readable image (looked for {', '.join(IMAGE_SUFFIXES)}; "
                f"{len(self.skipped)} unreadable)"
            )
        missing = [n for n in self.captions if not (self.root / n).is_file()]
        if missing:
            log.warning("%s names %d files not in %s, e.g. %s", captions_file, len(missing), self.root, missing[:3])
        if self.skipped:
            log.warning("%s: skipped %d unreadable of %d image files", self.root, len(self.skipped), len(candidates))

    def _read_captions(self, captions_file: str) -> dict[str, str]:
        path = self.root / captions_file
        if not path.is_file():
            return {}
        captions = {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[str(row["file"])] = str(row["caption"])
            except (ValueError, KeyError, TypeError) as err:
                log.warning("%s line %d skipped: expected {\"file\": ..., \"caption\": ...}, got %r (%s)",
                            path, n, line[:80], err)
        return captions

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def has_captions(self) -> bool:
        return any(self.caption_of(p) is not None for p in self.paths)

    def caption_of(self, path: pathlib.Path) -> str | None:
        return self.captions.get(path.relative_to(self.root).as_posix())

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> FolderSample:
        p = self.paths[i]
        return FolderSample(_load_rgb(p), self.caption_of(p), p)

    def __iter__(self):
        return (self[i] for i in range(len(self)))
