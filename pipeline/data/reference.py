"""The reference (real) image set of a run, whatever the dataset kind: batches, captions and identity.

``identity`` + ``content_hash`` key the reference-feature cache: the identity says what the set claims to be
(dataset name, kind, split, N, generation parameters or root), the content hash what it is (folders: sha256
over every image's pixels and shape, in order; shapes: sha256 of the renderer's source and the parameters),
so an edited folder or a changed renderer recomputes.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pipeline.errors import UserError

__all__ = ["ReferenceSet", "reference_set"]

log = logging.getLogger(__name__)


@dataclass
class ReferenceSet:
    identity: dict[str, Any]
    _images: Any  # indexable: i -> (H, W, 3) uint8
    n: int
    captions: list[str] | None
    num_skipped: int = 0
    _hash: str | None = None

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
            h = hashlib.sha256()
            for i in range(self.n):
                img = np.ascontiguousarray(self.image(i))
                h.update(str(img.shape).encode())
                h.update(img.tobytes())
            self._hash = h.hexdigest()[:16]
        return self._hash

    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.image(0).shape)


def reference_set(dataset_cfg: Any, n: int | None = None, split: str | None = None) -> ReferenceSet:
    """The first ``n`` images (all if None) of the configured dataset."""
    kind = getattr(dataset_cfg.kind, "value", dataset_cfg.kind)
    n = int(n if n is not None else dataset_cfg.num_images)
    if kind == "shapes":
        from pipeline.data.shapes import ShapesDataset

        split = split or dataset_cfg.split
        try:
            ds = ShapesDataset(split=split, n=n, seed=dataset_cfg.seed, size=dataset_cfg.size,
                               shapes=list(dataset_cfg.shapes), colours=list(dataset_cfg.colours), p_two=dataset_cfg.p_two)
        except ValueError as e:
            raise UserError(f"dataset ({dataset_cfg.name}): {e}") from e
        identity = {"name": dataset_cfg.name, "kind": kind, "split": split, "n": n, "seed": dataset_cfg.seed,
                    "size": dataset_cfg.size, "shapes": list(dataset_cfg.shapes), "colours": list(dataset_cfg.colours),
                    "p_two": dataset_cfg.p_two}
        # procedural images are a pure function of the renderer's code and these parameters: hash those
        # (rendering every image just to hash it would cost as much as a cold reference pass)
        import pipeline.data.shapes as renderer

        code = hashlib.sha256(Path(renderer.__file__).read_bytes() + repr(sorted(identity.items())).encode())
        return ReferenceSet(identity, ds, n, [s.caption for s in ds], _hash=code.hexdigest()[:16])
    if kind == "folder":
        from pipeline.data.folder import FolderDataset

        if not dataset_cfg.root:
            raise UserError("dataset.root: expected the folder of reference images (dataset=folder dataset.root=DIR)")
        try:
            ds = FolderDataset(dataset_cfg.root, dataset_cfg.captions_file)
        except ValueError as e:
            raise UserError(f"dataset.root: {e}") from e
        if ds.num_skipped:
            log.warning("dataset.root %s: %d unreadable file(s) skipped", dataset_cfg.root, ds.num_skipped)
        n = min(n, len(ds))
        captions = [ds.caption_of(p) for p in ds.paths[:n]] if ds.has_captions else None
        identity = {"name": dataset_cfg.name, "kind": kind, "root": str(ds.root.resolve()), "n": n}
        return ReferenceSet(identity, ds, n, captions, ds.num_skipped)
    raise UserError(f"dataset.kind: {kind!r}; expected shapes or folder")


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
