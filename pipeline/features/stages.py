"""The features room's shared stage: ``real_features``, the reference set's features per extractor, produced once
per run from a disk cache (``<paths.cache>/reference/``) keyed by the set's identity + content hash, N, the
extractor's describe() (weights hash, input size, resize) and :data:`CACHE_VERSION`.

Only rank 0 loads or extracts them under ``torchrun`` (:mod:`pipeline.core.distributed`). Everything read back is
checksummed and checked against its name (:func:`pipeline.core.progress.load_verified`)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline import metrics as M
from pipeline.core import distributed as dist
from pipeline.core.progress import load_verified, save_verified
from pipeline.core.registry import stage
from pipeline.data.stages import compared_reference, use_cache

__all__ = ["real_features_stage", "CACHE_VERSION"]

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when the cached content or its meaning changes (3: verified .npz, was a torch pickle)


def _cache_path(cfg, ref, extractor) -> tuple[Path, dict]:
    """``<paths.cache>/reference/<extractor>-<digest>.npz``; the key: the set's identity and content hash (folders:
    their manifest, nothing decoded), N, the extractor's describe() (weights hash, input size, resize) and
    :data:`CACHE_VERSION`."""
    key = {
        "version": CACHE_VERSION,
        "dataset": ref.identity,
        "content": ref.content_hash(),
        "n": ref.n,
        "extractor": extractor.describe(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Path(cfg.paths.cache) / "reference" / f"{extractor.name}-{digest}.npz", key


def _entry_files(ref) -> str | None:
    """A folder's readable file list as one string (a list of 10 000 strings loads 10× slower)."""
    return None if ref.files is None else "\n".join(ref.files)


def _entry_meta(key: dict, ref) -> dict:
    """What an entry records besides its features: its full key (a file copied over another entry's name is
    caught) and what the features were computed from (image shape, skipped files, a folder's readable files)."""
    return {
        "key": json.dumps(key, sort_keys=True, default=str),
        "files": _entry_files(ref),
        "image_shape": [int(s) for s in ref.image_shape()],
        "num_skipped": int(ref.num_skipped),
    }


def _load_entry(path: Path, key: dict, ref) -> torch.Tensor | None:
    """The cached (N, d) pool, or None after a warning naming ``path`` and what is wrong with it: damaged (truncated,
    checksum mismatch, not a verified ``.npz``, unreadable) or describing another key or reference set. The caller
    then extracts the features again and overwrites the entry. The file is data: nothing in it is unpickled
    (:func:`pipeline.core.progress.load_verified`, sha256 over the features and the meta)."""
    try:
        arrays, meta = load_verified(path)
    except (OSError, ValueError) as e:
        log.warning(
            "reference cache %s is damaged (%s): its features are extracted again and the file rewritten", path, e
        )
        return None
    want = _entry_meta(key, ref)
    differ = [name for name in want if meta.get(name) != want[name]]
    pool = arrays.get("pool")
    if pool is None or pool.ndim != 2 or pool.dtype.kind != "f" or len(pool) != ref.n:
        differ.append(f"pool {None if pool is None else (pool.dtype.name, pool.shape)} for N = {ref.n}")
    if differ:
        log.warning(
            "reference cache %s does not describe this reference set (%s differ): its features are extracted "
            "again and the file rewritten",
            path,
            ", ".join(differ),
        )
        return None
    return torch.from_numpy(pool)


def _save_entry(path: Path, key: dict, ref, pool: torch.Tensor) -> None:
    """Write the entry atomically (a parallel job reads the old file or the new one, never half of one). A failed
    write (full disk, read-only cache) costs only the cache: a warning, and the run goes on."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_verified(path, {"pool": pool.detach().cpu().numpy()}, _entry_meta(key, ref))
    except OSError as e:
        log.warning(
            "reference cache %s not written (%s): this run goes on without it; free space there, set "
            "paths.cache=DIR elsewhere, or mode.metrics.cache=false",
            path,
            e,
        )


def _extract_reference(ref, extractor, batch_size: int) -> torch.Tensor:
    chunks = []
    with tqdm(total=ref.n, desc=f"reference {extractor.name}", unit="img", dynamic_ncols=True) as bar:
        for batch in ref.batches(batch_size):
            chunks.append(extractor(batch)["pool"])
            bar.update(len(batch))
    return torch.cat(chunks)


_REF_STATS: dict[str, M.ReferenceStats] = {}  # per process: the reference square-root factor is computed once


def _features_of(cfg, ref, name: str, ex, cached: bool) -> tuple[dict, bool]:
    """One extractor's reference pool (from the cache when ``cached`` and its entry matches), its statistics and
    the seconds it took; and whether the cache had it."""
    path, key = _cache_path(cfg, ref, ex)
    tic = time.perf_counter()
    pool = _load_entry(path, key, ref) if cached and path.is_file() else None
    hit = pool is not None
    if hit:
        log.info("reference cache hit: %s (%s)", path.name, name)
    else:
        pool = _extract_reference(ref, ex, int(cfg.features[name].batch_size))
        if cached:
            _save_entry(path, key, ref, pool)
        log.info("reference cache miss: extracted %d x %d (%s) -> %s", *pool.shape, name, path.name)
    stats_key = str(path) + str(ref.n)
    if stats_key not in _REF_STATS:
        _REF_STATS[stats_key] = M.FeatureStats().update(pool).reference()
    return {"pool": pool, "stats": _REF_STATS[stats_key], "seconds": time.perf_counter() - tic}, hit


@stage("real_features", needs=("reference", "extractors"), produces=("real_features",))
def real_features_stage(ctx, cfg):
    """Reference pool features per extractor, from the disk cache when its key matches (rank 0 only when
    distributed: the other ranks return None and never touch the cache). An entry also records what it was
    computed from: the image shape, the number of skipped files and the folder's readable file list; a damaged or
    mismatching entry is recomputed and rewritten (:func:`_load_entry`)."""
    if dist.init(ctx.device) and not dist.is_main():
        return {"real_features": None}
    ref = compared_reference(ctx, cfg)
    out, hits = {}, []
    for name, ex in ctx.get("extractors").items():
        out[name], hit = _features_of(cfg, ref, name, ex, use_cache(cfg))
        hits.append(hit)
    ctx.tag("reference_cache", "hit" if all(hits) else "miss")
    return {"real_features": out}
