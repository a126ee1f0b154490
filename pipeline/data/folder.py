"""A folder of real images with optional captions: how users bring their own reference set.

``root/`` holds image files (png, jpg, jpeg, webp, bmp; top level only, sorted by name) and optionally
``captions.jsonl`` with one ``{"file": "<name relative to root>", "caption": "..."}`` per line. Files
that cannot be decoded are skipped, counted in ``num_skipped`` and logged — never a crash. A folder
with no readable image is a ValueError naming the path.

The folder and its jsonl files are untrusted data:

* **Captions are strings.** A captions line that is not a JSON object with a string ``file`` and a string
  ``caption`` (``null``, a number, a boolean, a list or an object) is skipped with a warning naming the file and
  its line number, and recorded in :attr:`FolderDataset.bad_caption_lines` (line number, reason) — never turned
  into a prompt such as ``"None"``. An empty or blank caption counts the same way (the image is left without a
  caption: an empty prompt is the unconditional one, not a description). Undecodable (non-UTF-8) lines too.
  A file captioned twice keeps its later caption, with a warning.
* **Every PIL mode converts to RGB with its full range scaled** (:func:`to_rgb`): 16-bit and 32-bit integer
  images are scaled, not clipped to white; alpha is dropped (see :func:`to_rgb` for each mode's rule).
* **Paths in dataset files stay inside the folder** (:func:`dataset_path`): a jsonl entry whose path is absolute,
  contains a ``..`` component, or (for paths that are opened: ``objects.jsonl``'s images and masks) resolves,
  symbolic links followed, to a location outside the folder is skipped with a warning naming the file, line and
  path, and is never opened. There is no switch to allow otherwise: copy the files into the folder (or point
  ``dataset.root`` at a folder that holds them all; the root itself may be a symbolic link). A captions entry is only
  a name matched against the scanned images, so it is checked lexically (absolute / ``..``). The image files
  themselves are found by listing the folder (top level): those are read as they are, symbolic links included —
  a folder of links to images kept elsewhere is a supported way to build a subset.

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

__all__ = [
    "IMAGE_SUFFIXES",
    "FolderSample",
    "FolderDataset",
    "Manifest",
    "scan",
    "decoded_count",
    "to_rgb",
    "dataset_path",
    "read_jsonl",
]

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CHECK_VERSION = 3  # bump when the check's content or meaning changes (2: to_rgb reads every PIL mode)
DECODE_VERSION = 2  # bump when to_rgb gives other pixels for some file (2: 16-bit/I/F scaled, not clipped):
# it is part of a folder reference set's identity, so features cached from the old pixels are recomputed

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


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _scale_16bit(a: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, x / 65535 * 255 rounded half up, exactly (integer arithmetic)."""
    return ((a.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)


def _min_max(a: np.ndarray) -> np.ndarray:
    """The finite values' minimum -> 0 and maximum -> 255 (rounded); a constant image -> 0; NaN -> 0, +inf -> 255,
    -inf -> 0."""
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    out = np.zeros(a.shape, dtype=np.float64)
    if finite.any():
        lo, hi = float(a[finite].min()), float(a[finite].max())
        if hi > lo:
            out[finite] = (a[finite] - lo) * (255.0 / (hi - lo))
    out[a == np.inf] = 255.0
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def to_rgb(im) -> np.ndarray:
    """A PIL image of any mode as an (H, W, 3) uint8 RGB array, its full range scaled to 0..255.

    * 8-bit modes (1, L, P, RGB, RGBX, CMYK, YCbCr, LAB, HSV) go through PIL's own conversion to RGB (CMYK by PIL's
      plain formula, LAB as CIE L*a*b* D50 → sRGB; an embedded ICC profile is not applied).
    * Alpha is dropped, not composited: LA, PA, RGBA and a P image with a transparent colour give their colour
      channels as stored (a fully transparent pixel keeps its colour); premultiplied La / RGBa are un-premultiplied
      first.
    * I;16 / I;16L / I;16B / I;16N (16-bit grey): x / 65535 × 255, rounded (65535 → 255, 32768 → 128).
    * I (32-bit signed): if every value lies in 0..65535 the 16-bit rule (I is how 16-bit data often arrives);
      otherwise the image's minimum → 0 and maximum → 255 (min–max; a constant image → 0).
    * F (32-bit float): if every finite value lies in [0, 1], x × 255 rounded (the float-image convention);
      otherwise min–max over the finite values. NaN and −inf → 0, +inf → 255.
    * 16-bit-per-channel RGB/RGBA PNGs: Pillow opens them as 8-bit RGB/RGBA itself, keeping the high byte
      (x >> 8: 65535 → 255, 32768 → 128; at most 1 below x / 65535 × 255 rounded) — scaled, not clipped; the low
      byte is lost, as Pillow offers no 16-bit RGB mode.

    Grey results are repeated over the three channels. A multi-frame file gives its first frame. A mode PIL cannot
    convert is a ValueError naming it (the caller counts the file as unreadable)."""
    mode = im.mode
    if mode in _SIXTEEN_BIT:
        grey = _scale_16bit(np.asarray(im))
    elif mode == "I":
        a = np.asarray(im)
        grey = _scale_16bit(a) if a.size and a.min() >= 0 and a.max() <= 65535 else _min_max(a)
    elif mode == "F":
        a = np.asarray(im)
        finite = a[np.isfinite(a)]
        if finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1):
            grey = np.rint(np.clip(np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0), 0, 1) * 255).astype(np.uint8)
        else:
            grey = _min_max(a)
    else:
        if mode in ("La", "RGBa"):  # premultiplied: PIL converts these to their straight-alpha form only
            im = im.convert({"La": "LA", "RGBa": "RGBA"}[mode])
        elif mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")  # PIL warns on P -> RGB with a transparent colour; the alpha is dropped below
        try:
            rgb = im.convert("RGB")
        except ValueError as err:
            raise ValueError(f"PIL mode {mode!r} cannot be converted to RGB: {err}") from err
        return np.asarray(rgb, dtype=np.uint8).copy()
    return np.repeat(grey[:, :, None], 3, axis=2)


def _load_rgb(path: pathlib.Path) -> np.ndarray:
    """The image at ``path`` as (H, W, 3) uint8 RGB (:func:`to_rgb`)."""
    from PIL import Image

    global _decoded
    with _decoded_lock:
        _decoded += 1
    with Image.open(path) as im:
        im.load()  # decode now: a truncated file must fail here, not later
        return to_rgb(im)


# ----------------------------------------------------------------------------------------------- untrusted jsonl
def dataset_path(root: str | pathlib.Path, name: object, follow_links: bool = True) -> str:
    """``name``, a path a dataset file gives, as a normalised relative posix path inside ``root`` (``./a.png`` ->
    ``a.png``); a ValueError saying why when it is not one: not a non-empty string, a NUL byte, an absolute path, a
    ``..`` component, or (``follow_links``, for paths that will be opened) a location outside ``root`` once
    symbolic links are resolved. Nothing is opened; ``follow_links`` resolves the path on the file system."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"expected a non-empty path relative to the dataset folder, got {_json_type(name)} {name!r}")
    if "\0" in name:
        raise ValueError(f"path {name!r} contains a NUL byte")
    pure = pathlib.PurePosixPath(name)
    if pure.is_absolute() or os.path.isabs(name):
        raise ValueError(f"path {name!r} is absolute; expected a path relative to the dataset folder {root}")
    if ".." in pure.parts:
        raise ValueError(f"path {name!r} has a '..' component; expected a path inside the dataset folder {root}")
    rel = pure.as_posix()
    if rel in ("", "."):
        raise ValueError(f"path {name!r} names the dataset folder itself; expected a file inside it")
    if follow_links:
        base = pathlib.Path(root).resolve()
        target = (base / rel).resolve()
        if target != base and base not in target.parents:
            raise ValueError(
                f"path {name!r} resolves to {target}, outside the dataset folder {base} "
                "(a symbolic link out of the folder; copy the file into the folder instead)"
            )
    return rel


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages ("null", not "NoneType")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def read_jsonl(path: pathlib.Path):
    """``(line number, parsed value or None, error or None)`` for every non-blank line of ``path``: a line that is
    not UTF-8 or not JSON gives its error instead of a value (the caller skips and counts it). A UTF-8 byte-order
    mark on line 1 is ignored."""
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as err:
            yield n, None, f"not UTF-8 ({err})"
            continue
        if not line.strip():
            continue
        try:
            yield n, json.loads(line), None
        except ValueError as err:
            yield n, None, f"not JSON ({err}): {line[:80]!r}"


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


def _check_body(manifest: Manifest, check: _Check) -> dict:
    return {
        "version": CHECK_VERSION,
        "root": str(manifest.root.resolve()),
        "digest": manifest.digest,
        "readable": list(check.readable),
        "shapes": [list(s) for s in check.shapes],
        "skipped": [list(s) for s in check.skipped],
    }


def _body_sha256(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _load_check(path: pathlib.Path, manifest: Manifest) -> _Check | None:
    """The cached check of ``manifest``, verified (it is data: a cache another job or person wrote): a sha256 over
    its content, the manifest's digest, names that are exactly the manifest's files, (H, W, 3) shapes. Absent: None;
    anything else wrong: a warning naming the file, then None (the folder is decoded again)."""
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text())
        body = {k: row[k] for k in ("version", "root", "digest", "readable", "shapes", "skipped")}
        if row.get("sha256") != _body_sha256(body):
            raise ValueError("checksum mismatch")
        if row["digest"] != manifest.digest:
            raise ValueError("written for another state of the folder")
        check = _Check(
            tuple(row["readable"]), tuple(tuple(s) for s in row["shapes"]), tuple(tuple(s) for s in row["skipped"])
        )
        names = {name for name, _, _ in manifest.files}
        listed = list(check.readable) + [n for n, _ in check.skipped]
        if sorted(listed) != sorted(names) or len(check.readable) != len(check.shapes):
            raise ValueError("its file list is not the folder's")
        if not all(len(s) == 3 and s[2] == 3 and all(isinstance(x, int) and x > 0 for x in s) for s in check.shapes):
            raise ValueError("an image shape is not (H, W, 3)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("folder check cache %s unusable (%s): the folder is checked again", path, e)
        return None
    return check


def _save_check(path: pathlib.Path, manifest: Manifest, check: _Check) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = _check_body(manifest, check)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: parallel writers never share it
    try:
        tmp.write_text(json.dumps({**body, "sha256": _body_sha256(body)}))
        tmp.replace(path)  # atomic: a parallel job never reads half a file
    except OSError as e:  # a full disk costs the cache, not the run
        tmp.unlink(missing_ok=True)
        log.warning("could not write the folder check cache %s: %s", path, e)


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
_CAPTION_ROW = '{"file": "<path relative to the folder>", "caption": "<text>"}'


def _caption_row_error(root: pathlib.Path, row: object) -> str | None:
    """Why a parsed captions line is refused, or None when it is good."""
    if not isinstance(row, dict):
        return f"expected a JSON object {_CAPTION_ROW}, got {_json_type(row)}"
    missing = [k for k in ("file", "caption") if k not in row]
    if missing:
        return f"no {' or '.join(repr(k) for k in missing)} key; expected {_CAPTION_ROW}"
    if not isinstance(row["caption"], str):
        return f"caption is {_json_type(row['caption'])} ({json.dumps(row['caption'])[:60]}); expected a string"
    if not row["caption"].strip():
        return "caption is empty; expected text (leave the file out of the captions file for no caption)"
    try:
        dataset_path(root, row["file"], follow_links=False)
    except ValueError as err:
        return f"file: {err}"
    return None


def _line_list(lines: list[tuple[int, str]], limit: int = 10) -> str:
    shown = ", ".join(str(n) for n, _ in lines[:limit])
    return shown + (f", ... ({len(lines) - limit} more)" if len(lines) > limit else "")


class FolderDataset:
    """Images of ``root`` with their captions, if any. Every file is decoded once at construction to find the
    unreadable ones, unless ``check_cache`` (a directory) holds that check for the folder's current
    :class:`Manifest`; ``manifest``: one :func:`scan` has already made (saves a second scan)."""

    def __init__(
        self,
        root: str | pathlib.Path,
        captions_file: str | None = "captions.jsonl",
        check_cache: str | pathlib.Path | None = None,
        manifest: Manifest | None = None,
    ):
        self.root = pathlib.Path(root)
        self.manifest = manifest if manifest is not None else scan(self.root, captions_file)
        self.bad_caption_lines: list[tuple[int, str]] = []  # (line number, reason) of each captions line skipped
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
            log.warning(
                "%s: skipped %d unreadable of %d image files", self.root, len(self.skipped), len(self.manifest.files)
            )

    def _read_captions(self, captions_file: str) -> dict[str, str]:
        """``{relative path: caption}``; every line that is not ``{"file": <path inside the folder>, "caption":
        <non-empty string>}`` is skipped, logged (file, line, reason) and kept in :attr:`bad_caption_lines`."""
        path = self.root / captions_file
        if not path.is_file():
            return {}
        captions: dict[str, str] = {}
        first_line: dict[str, int] = {}
        for n, row, error in read_jsonl(path):
            if error is None:
                error = _caption_row_error(self.root, row)
            if error is not None:
                self.bad_caption_lines.append((n, error))
                log.warning("%s line %d skipped: %s", path, n, error)
                continue
            name = dataset_path(self.root, row["file"], follow_links=False)
            if name in captions:
                log.warning(
                    "%s line %d: %s is captioned again (first on line %d); the later caption is used",
                    path,
                    n,
                    name,
                    first_line[name],
                )
            first_line.setdefault(name, n)
            captions[name] = row["caption"]
        if self.bad_caption_lines:
            log.warning(
                "%s: %d line(s) skipped (lines %s); their images have no caption",
                path,
                len(self.bad_caption_lines),
                _line_list(self.bad_caption_lines),
            )
        return captions

    @property
    def num_bad_caption_lines(self) -> int:
        """Lines of the captions file skipped as malformed (see :attr:`bad_caption_lines`)."""
        return len(self.bad_caption_lines)

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
