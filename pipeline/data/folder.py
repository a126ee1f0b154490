"""A folder of real images with optional captions: how users bring their own reference set.

``root/`` holds image files (png, jpg, jpeg, webp, bmp; top level only, sorted by name) and optionally
``captions.jsonl`` with one ``{"file": "<name relative to root>", "caption": "..."}`` per line. Files
that cannot be decoded are skipped, counted in ``num_skipped`` and logged — never a crash. A folder
with no readable image is a ValueError naming the path.

What a folder holds is known without decoding it: its :class:`Manifest` lists every candidate file's relative path,
size and ``mtime_ns`` (plus the captions file's), and its :attr:`Manifest.digest` changes when one file is changed,
added or removed. Decoding every file to find the unreadable ones (the *check*: readable files, skipped files and
each readable image's shape) happens once per folder state: with ``check_cache=DIR`` its result is kept in
``DIR/folder-<root + manifest digest>.json`` and a later construction of the same, unchanged folder decodes
nothing. :func:`decoded_count` counts the images this process has decoded (a warm run's count stays at 0).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import threading
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "FolderSample", "FolderDataset", "Manifest", "scan", "decoded_count"]

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CHECK_VERSION = 1  # bump when the check's content or meaning changes

_decoded = 0
_decoded_lock = threading.Lock()


def decoded_count() -> int:
    """Images decoded by this process so far (every :func:`_load_rgb`, failed ones included)."""
    return _decoded


@dataclass(frozen=True)
class FolderSample:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    caption: str | None
    path: pathlib.Path


def _load_rgb(path: pathlib.Path) -> np.ndarray:
    from PIL import Image

    global _decoded
    with _decoded_lock:
        _decoded += 1
    with Image.open(path) as im:
        im.load()  # decode now: a truncated file must fail here, not later
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


# ----------------------------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class Manifest:
    """A folder's content by file-system metadata alone: ``files`` = (relative posix path, st_size, st_mtime_ns) of
    every candidate image, sorted by path; ``captions`` = the same for the captions file (None if absent)."""

    root: pathlib.Path
    files: tuple[tuple[str, int, int], ...]
    captions: tuple[str, int, int] | None

    @cached_property
    def digest(self) -> str:
        """sha256 (20 hex) over ``files`` and ``captions``: changing, adding or removing one file changes it."""
        body = json.dumps({"files": self.files, "captions": self.captions}, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()[:20]


def scan(root: str | pathlib.Path, captions_file: str | None = "captions.jsonl") -> Manifest:
    """The :class:`Manifest` of ``root`` (one ``stat`` per file; nothing opened)."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist or is not a directory")
    files = []
    with os.scandir(root) as entries:
        for e in entries:
            if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file():
                st = e.stat()  # follows a symbolic link, as is_file does
                files.append((e.name, int(st.st_size), int(st.st_mtime_ns)))
    files.sort()
    captions = None
    if captions_file and (root / captions_file).is_file():
        st = (root / captions_file).stat()
        captions = (pathlib.PurePath(captions_file).as_posix(), int(st.st_size), int(st.st_mtime_ns))
    return Manifest(root, tuple(files), captions)


# ----------------------------------------------------------------------------------------------- check
@dataclass(frozen=True)
class _Check:
    """What decoding every candidate of a manifest found: the readable files with their (H, W, 3) shapes, and the
    unreadable ones with the error."""

    readable: tuple[str, ...]
    shapes: tuple[tuple[int, int, int], ...]
    skipped: tuple[tuple[str, str], ...]  # (name, error)


def _check_path(cache_dir: pathlib.Path, manifest: Manifest) -> pathlib.Path:
    key = json.dumps([CHECK_VERSION, str(manifest.root.resolve()), manifest.digest])
    return cache_dir / f"folder-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def _load_check(path: pathlib.Path, manifest: Manifest) -> _Check | None:
    try:
        row = json.loads(path.read_text())
        if row["digest"] != manifest.digest:
            return None
        check = _Check(tuple(row["readable"]), tuple(tuple(s) for s in row["shapes"]),
                       tuple(tuple(s) for s in row["skipped"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: decode again
    if len(check.readable) != len(check.shapes):
        return None
    return check


def _save_check(path: pathlib.Path, manifest: Manifest, check: _Check) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: parallel writers never share it
    tmp.write_text(json.dumps({"version": CHECK_VERSION, "root": str(manifest.root.resolve()), "digest": manifest.digest,
                               "readable": check.readable, "shapes": check.shapes, "skipped": check.skipped}))
    tmp.replace(path)  # atomic: a parallel job never reads half a file


def _decode_check(manifest: Manifest) -> _Check:
    readable, shapes, skipped = [], [], []
    for name, _, _ in manifest.files:
        try:
            shape = _load_rgb(manifest.root / name).shape
        except Exception as err:  # PIL raises several types for corrupt data
            skipped.append((name, f"{type(err).__name__}: {err}"))
        else:
            readable.append(name)
            shapes.append(tuple(int(s) for s in shape))
    return _Check(tuple(readable), tuple(shapes), tuple(skipped))


# ----------------------------------------------------------------------------------------------- dataset
class FolderDataset:
    """Images of ``root`` with their captions, if any. Every file is decoded once at construction to find the
    unreadable ones, unless ``check_cache`` (a directory) holds that check for the folder's current
    :class:`Manifest`; ``manifest``: one :func:`scan` has already made (saves a second scan)."""

    def __init__(self, root: str | pathlib.Path, captions_file: str | None = "captions.jsonl",
                 check_cache: str | pathlib.Path | None = None, manifest: Manifest | None = None):
        self.root = pathlib.Path(root)
        self.manifest = manifest if manifest is not None else scan(self.root, captions_file)
        self.captions = self._read_captions(captions_file) if captions_file else {}
        cached = None
        if check_cache is not None:
            check_path = _check_path(pathlib.Path(check_cache), self.manifest)
            cached = _load_check(check_path, self.manifest)
        check = cached if cached is not None else _decode_check(self.manifest)
        self.check_cached = cached is not None  # True: nothing was decoded
        self._names = list(check.readable)  # relative posix paths of the readable images, in order
        self.shapes: list[tuple[int, int, int]] = list(check.shapes)
        self.skipped: list[pathlib.Path] = [self.root / n for n, _ in check.skipped]
        for name, err in check.skipped:
            log.warning("skipping unreadable image %s: %s", self.root / name, err)
        if not self._names:
            raise ValueError(
                f"dataset folder {self.root} has no readable image (looked for {', '.join(IMAGE_SUFFIXES)}; "
                f"{len(self.skipped)} unreadable)"
            )
        if check_cache is not None and cached is None:
            _save_check(check_path, self.manifest, check)
        listed = {name for name, _, _ in self.manifest.files}
        missing = [n for n in self.captions if n not in listed and not (self.root / n).is_file()]
        if missing:
            log.warning("%s names %d files not in %s, e.g. %s", captions_file, len(missing), self.root, missing[:3])
        if self.skipped:
            log.warning("%s: skipped %d unreadable of %d image files", self.root, len(self.skipped),
                        len(self.manifest.files))

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

    @cached_property
    def paths(self) -> list[pathlib.Path]:
        """The readable images, in order."""
        return [self.root / n for n in self._names]

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def has_captions(self) -> bool:
        return any(n in self.captions for n in self._names)

    def caption_of(self, path: pathlib.Path) -> str | None:
        return self.captions.get(path.relative_to(self.root).as_posix())

    def names(self, n: int | None = None) -> list[str]:
        """Relative posix paths of the first ``n`` (all if None) readable images."""
        return self._names[:n]

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, i: int) -> FolderSample:
        p = self.root / self._names[i]
        return FolderSample(_load_rgb(p), self.caption_of(p), p)

    def __iter__(self):
        return (self[i] for i in range(len(self)))
