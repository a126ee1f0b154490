"""The reference (real) image set of a run, whatever the dataset kind: batches, captions and identity.

``identity`` + ``content_hash`` key the reference-feature cache: the identity says what the set claims to be
(dataset name, kind, split, N, generation parameters or root and decoding version), the content hash what it is,
without decoding an image (folders: the digest of the folder's manifest — relative path, size and mtime_ns of every
candidate file and of the captions file, :class:`pipeline.data.folder.Manifest`; shapes: sha256 of the renderer's
source and the parameters), so an edited folder, a changed renderer or a changed decoding recomputes.

:func:`reference_set` is the one place every mode gets reference images from. Per process it keeps one dataset
object per dataset config (a folder's: as long as its manifest is unchanged, re-scanned at every call; shapes: its
captions, rendered once), so the stages of a run (and the jobs of a sweep) share one decoding check and one caption
pass, and a :class:`ReferenceSet` is a cheap view of its first N images.

A folder's unreadable images (``num_skipped``) and malformed captions lines (``num_bad_caption_lines``, with their
line numbers and reasons in ``bad_caption_lines``; :mod:`pipeline.data.folder` says what a good line is) are
logged here and carried on the set for the stages to report.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pipeline.data.folder import DECODE_VERSION, FolderDataset, scan
from pipeline.data.shapes import ShapesDataset
from pipeline.data.shapes import dataset as renderer
from pipeline.errors import UserError

__all__ = ["ReferenceSet", "References", "reference_set", "forget_datasets", "dataset_kind", "missing_root"]

log = logging.getLogger(__name__)


@dataclass
class ReferenceSet:
    identity: dict[str, Any]
    _images: Any  # indexable: i -> (H, W, 3) uint8, or a sample with ``.image``
    n: int
    captions: list[str] | None
    num_skipped: int = 0
    _hash: str | None = None  # what the set is (see the module docstring); required
    _shape: tuple[int, ...] | None = None  # (H, W, 3) of image 0, when known without decoding it
    files: list[str] | None = None  # folders: relative paths of the n images (in order); None otherwise
    bad_caption_lines: tuple[tuple[int, str], ...] = ()  # folders: (line, reason) of each captions line skipped

    @property
    def num_bad_caption_lines(self) -> int:
        """Captions-file lines skipped as malformed (non-string or empty caption, a path outside the folder, not
        JSON): counted like ``num_skipped``, their images have no caption."""
        return len(self.bad_caption_lines)

    def item(self, i: int) -> Any:
        """The dataset's own sample ``i`` (shapes: a Sample with objects and masks; folder: a FolderSample)."""
        return self._images[i]

    def image(self, i: int) -> np.ndarray:
        item = self._images[i]
        return item.image if hasattr(item, "image") else item

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[torch.Tensor]:
        """uint8 (B, 3, H, W) batches; a size change inside a folder starts a new batch."""
        stop = self.n if stop is None else stop
        buf: list[np.ndarray] = []
        for i in range(start, stop):
            img = self.image(i)
            if buf and (len(buf) == batch_size or img.shape != buf[0].shape):
                yield torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2).contiguous()
                buf = []
            buf.append(img)
        if buf:
            yield torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2).contiguous()

    def content_hash(self) -> str:
        if self._hash is None:
            raise ValueError(f"reference set {self.identity}: no content hash")
        return self._hash

    def image_shape(self) -> tuple[int, ...]:
        """(H, W, 3) of image 0 (no decoding when the dataset knows it)."""
        return tuple(self._shape) if self._shape is not None else tuple(self.image(0).shape)


_DATASETS: OrderedDict[tuple, Any] = OrderedDict()  # per process: dataset config -> dataset object (+ captions)
_MAX_DATASETS = 4  # a run uses at most two (dataset, mode.latent.ood_dataset); a sweep a few


def _remember(key: tuple, value: Any) -> Any:
    _DATASETS[key] = value
    _DATASETS.move_to_end(key)
    while len(_DATASETS) > _MAX_DATASETS:
        _DATASETS.popitem(last=False)
    return value


def forget_datasets() -> None:
    """Drop this process's dataset objects (the next :func:`reference_set` scans/renders again)."""
    _DATASETS.clear()


def dataset_kind(dataset_cfg: Any) -> str:
    """``dataset.kind`` as a string (an enum in a composed config, a string in a plain one)."""
    return str(getattr(dataset_cfg.kind, "value", dataset_cfg.kind))


def missing_root(dataset_cfg: Any) -> str | None:
    """Why the dataset has no reference images to read (a folder dataset without ``root``), or None."""
    if dataset_kind(dataset_cfg) == "folder" and not dataset_cfg.root:
        return "dataset.root: expected the folder of reference images (dataset=folder dataset.root=DIR)"
    return None


class References:
    """The run's reference images, whatever each mode needs of them: :meth:`first` ``(n)`` is the dataset's first
    ``n`` images (:func:`reference_set`: views of one dataset object per process, so every mode's set is the one
    it asked for, checked and captioned once)."""

    def __init__(self, dataset_cfg: Any, cache_dir: str | Path | None = None):
        self.dataset_cfg, self.cache_dir = dataset_cfg, cache_dir
        self._sets: dict[int | None, ReferenceSet] = {}

    @property
    def name(self) -> str:
        return str(self.dataset_cfg.name)

    def first(self, n: int | None = None) -> ReferenceSet:
        """The first ``n`` images (all if None: ``dataset.num_images``)."""
        if n not in self._sets:
            ref = self._sets[n] = reference_set(self.dataset_cfg, n, cache_dir=self.cache_dir)
            log.info(
                "reference set: %d images of %s (%s)",
                ref.n,
                self.name,
                ref.identity.get("split", ref.identity.get("root")),
            )
        return self._sets[n]

    def taken(self) -> list[ReferenceSet]:
        """The sets the run's modes took with :meth:`first`, in the order they were first asked for."""
        return list(self._sets.values())


def reference_set(
    dataset_cfg: Any, n: int | None = None, split: str | None = None, cache_dir: str | Path | None = None
) -> ReferenceSet:
    """The first ``n`` images (all if None) of the configured dataset. ``cache_dir`` (``paths.cache``): where a
    folder's decoding check is kept (``<cache_dir>/reference/folder-*.json``), so an unchanged folder is never
    decoded to be checked again; None: checked by decoding, once per process and folder state."""
    kind = dataset_kind(dataset_cfg)
    n = int(n if n is not None else dataset_cfg.num_images)
    if kind == "shapes":
        return _shapes(dataset_cfg, n, split or dataset_cfg.split)
    if kind == "folder":
        return _folder(dataset_cfg, n, cache_dir)
    raise UserError(f"dataset.kind: {kind!r}; expected shapes or folder")


def _shapes(dataset_cfg: Any, n: int, split: str) -> ReferenceSet:
    try:
        ds = ShapesDataset(
            split=split,
            n=n,
            seed=dataset_cfg.seed,
            size=dataset_cfg.size,
            shapes=list(dataset_cfg.shapes),
            colours=list(dataset_cfg.colours),
            p_two=dataset_cfg.p_two,
        )
    except ValueError as e:
        raise UserError(f"dataset ({dataset_cfg.name}): {e}") from e
    identity = {
        "name": dataset_cfg.name,
        "kind": "shapes",
        "split": split,
        "n": n,
        "seed": dataset_cfg.seed,
        "size": dataset_cfg.size,
        "shapes": list(dataset_cfg.shapes),
        "colours": list(dataset_cfg.colours),
        "p_two": dataset_cfg.p_two,
    }
    # procedural images are a pure function of the renderer's code and these parameters: hash those
    # (rendering every image just to hash it would cost as much as a cold reference pass)
    code = hashlib.sha256(Path(renderer.__file__).read_bytes() + repr(sorted(identity.items())).encode())
    # captions need a render per image: kept per process, extended when a larger n asks
    key = ("shapes", repr(sorted((k, v) for k, v in identity.items() if k != "n")))
    captions = _remember(key, _DATASETS.get(key, []))
    captions += [ds[i].caption for i in range(len(captions), n)]
    size = int(dataset_cfg.size)
    return ReferenceSet(identity, ds, n, captions[:n], _hash=code.hexdigest()[:16], _shape=(size, size, 3))


def _folder(dataset_cfg: Any, n: int, cache_dir: str | Path | None) -> ReferenceSet:
    if missing_root(dataset_cfg):
        raise UserError(missing_root(dataset_cfg))
    root, captions_file = Path(str(dataset_cfg.root)), dataset_cfg.captions_file
    try:
        manifest = scan(root, captions_file)  # stat only: what the folder holds now
        key = ("folder", str(root.resolve()), captions_file)
        ds = _DATASETS.get(key)
        if ds is None or ds.manifest.digest != manifest.digest:
            check_cache = Path(str(cache_dir)) / "reference" if cache_dir is not None else None
            ds = FolderDataset(root, captions_file, check_cache=check_cache, manifest=manifest)
        _remember(key, ds)
    except ValueError as e:
        raise UserError(f"dataset.root: {e}") from e
    if ds.num_skipped:
        log.warning("dataset.root %s: %d unreadable file(s) skipped", dataset_cfg.root, ds.num_skipped)
    if ds.num_bad_caption_lines:
        log.warning(
            "dataset.root %s: %d line(s) of %s skipped (line %s); their images have no caption",
            dataset_cfg.root,
            ds.num_bad_caption_lines,
            captions_file,
            ", ".join(f"{k}: {why}" for k, why in ds.bad_caption_lines[:3])
            + (", ..." if ds.num_bad_caption_lines > 3 else ""),
        )
    n = min(n, len(ds))
    names = ds.names(n)
    captions = [ds.captions.get(name) for name in names] if ds.has_captions else None
    # "decode": how the images are decoded (folder.to_rgb), so a change to it recomputes cached features
    identity = {
        "name": dataset_cfg.name,
        "kind": "folder",
        "root": str(ds.root.resolve()),
        "n": n,
        "decode": DECODE_VERSION,
    }
    return ReferenceSet(
        identity,
        ds,
        n,
        captions,
        ds.num_skipped,
        _hash=manifest.digest,
        _shape=ds.shapes[0],
        files=names,
        bad_caption_lines=tuple(ds.bad_caption_lines),
    )


def read_prompts(path: str) -> list[str]:
    """One prompt per line; blank lines ignored."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file {str(p)!r} does not exist; expected a text file with one prompt per line")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts file {str(p)!r} has no prompt")
    return prompts


def cycle(prompts: Sequence[str], n: int) -> list[str]:
    return [prompts[i % len(prompts)] for i in range(n)]
