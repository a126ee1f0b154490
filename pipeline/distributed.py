"""Sharded runs under ``torch.distributed``: one large metrics evaluation split across processes.

Launch with ``torchrun --nproc_per_node K -m pipeline ...`` (GPUs: backend NCCL, one GPU per process by
``LOCAL_RANK``) or ``python -m torch.distributed.run --nproc_per_node K -m pipeline ... model.device=cpu``
(backend gloo). A launch is detected from the environment torchrun sets (``WORLD_SIZE`` > 1, ``RANK``,
``LOCAL_RANK``); without one every helper here is a no-op identity and nothing is initialised.

Sharding: rank r of w generates the contiguous samples ``[r·n // w, (r+1)·n // w)`` (sample i always uses seed
+ i, so the union of the shards is exactly the single-process sample set).

Merge convention: exact sums, never averaged metrics. FID statistics merge by all-reducing the float64 sums
(n, Σx, Σxxᵀ) of every shard, so the merged ``FeatureStats`` equal one pass over all N features up to float64
summation order; per-sample matrices (pool features for KID/PR/DC, logits for IS, image/text embeddings, judged
rows) are gathered in rank order = sample-index order, so every metric sees the very set a single process sees.
"""

from __future__ import annotations

import atexit
import logging
import os
from datetime import timedelta
from typing import Any

import torch

log = logging.getLogger(__name__)

TIMEOUT = timedelta(hours=1)  # rank 0 may extract a large reference set while the others wait at a collective


def launched() -> bool:
    """True in a process started by torchrun (or ``torch.distributed.run``) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """Global rank: the process group's once initialised, else ``RANK`` of a launch, else 0."""
    if _dist():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    if _dist():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def is_main() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    """True once the process group of a multi-process launch is up (collectives are live)."""
    return _dist() and torch.distributed.get_world_size() > 1


def local_device(device: torch.device) -> torch.device:
    """Under a launch, a CUDA device becomes this process's GPU ``cuda:LOCAL_RANK``; anything else is unchanged."""
    device = torch.device(device)
    if not launched() or device.type != "cuda":
        return device
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1))
    if device.index is not None and device.index != local.index:
        log.warning("model.device=%s under torchrun: rank %d uses %s (its LOCAL_RANK)", device, rank(), local)
    return local


def init(device: torch.device | str = "cpu") -> bool:
    """Initialise the default process group once per process if launched; True when distributed.

    Backend: NCCL when the model runs on CUDA, else gloo (also when a node runs more processes than it has GPUs:
    NCCL refuses two ranks on one GPU). Rendezvous by the ``env://`` variables torchrun sets.
    """
    if not launched():
        return False
    if _dist():
        return True
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" and torch.cuda.is_available() else "gloo"
    if backend == "nccl" and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > torch.cuda.device_count():
        log.warning("%s processes on a node with %d GPU(s): backend gloo instead of NCCL",
                    os.environ["LOCAL_WORLD_SIZE"], torch.cuda.device_count())
        backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, timeout=TIMEOUT)
    atexit.register(_destroy)
    log.info("torch.distributed: rank %d of %d, backend %s, device %s", rank(), world_size(), backend, device)
    return True


def _destroy() -> None:
    if _dist():
        torch.distributed.destroy_process_group()


def shard(n: int) -> tuple[int, int]:
    """(start, count) of this rank's contiguous shard of n samples: ``[r·n // w, (r+1)·n // w)``."""
    r, w = rank(), world_size()
    start, stop = r * n // w, (r + 1) * n // w
    return start, stop - start


def _comm_device() -> torch.device:
    """Tensors of a collective live here: the current GPU for NCCL, the CPU for gloo."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_scalars(values: list[float] | tuple[float, ...], op: str = "sum") -> list[float]:
    """Element-wise sum (or ``op="max"``) of a few float64 numbers over ranks; identity when not distributed."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
    return t.tolist()


def all_reduce_stats(stats: Any) -> Any:
    """Merged ``FeatureStats`` of every rank's shard (a new object; every rank gets it): n, Σx and Σxxᵀ are
    summed in float64, exactly as ``FeatureStats.merge``. A rank with no features contributes zeros."""
    from pipeline.metrics.stats import FeatureStats

    if not is_distributed():
        return stats
    dim = int(all_reduce_scalars([stats.dim or 0], op="max")[0])
    if dim == 0:
        return FeatureStats()  # no rank saw a feature
    if stats.dim is None:
        stats = FeatureStats(dim)
    state = stats.to_dict()
    flat = torch.cat([torch.tensor([float(state["n"])], dtype=torch.float64), torch.from_numpy(state["sum"]),
                      torch.from_numpy(state["sum_outer"]).reshape(-1)]).to(_comm_device())
    torch.distributed.all_reduce(flat)
    flat = flat.cpu()
    return FeatureStats.from_dict({"n": int(round(flat[0].item())), "dim": dim, "sum": flat[1 : 1 + dim].numpy(),
                                   "sum_outer": flat[1 + dim :].reshape(dim, dim).numpy()})


def all_gather_rows(x: torch.Tensor | None) -> torch.Tensor | None:
    """Rows of every rank's (n_r, ...) tensor concatenated in rank order (every rank gets all of them).

    Shards may differ in length (or be empty: pass None or a 0-row tensor): sizes are gathered first, then each
    tensor is padded to the longest and trimmed after the gather. None when no rank has a tensor. Identity when
    not distributed.
    """
    if not is_distributed():
        return x
    meta = (0, None, None) if x is None else (int(x.shape[0]), tuple(x.shape[1:]), x.dtype)
    metas: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(metas, meta)
    shapes = {m[1] for m in metas if m[1] is not None}
    if not shapes:
        return None
    if len(shapes) > 1:
        raise ValueError(f"all_gather_rows: ranks hold tensors of different trailing shapes {sorted(shapes)}")
    tail = shapes.pop()
    dtype = next(m[2] for m in metas if m[2] is not None)
    longest = max(m[0] for m in metas)
    dev = _comm_device()
    padded = torch.zeros((longest, *tail), dtype=dtype, device=dev)
    if x is not None and len(x):
        padded[: len(x)] = x.to(dev)
    parts = [torch.empty_like(padded) for _ in metas]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[: m[0]] for p, m in zip(parts, metas)]).cpu()


def all_gather_list(items: list) -> list:
    """Every rank's list of small picklable items (judged rows, a few images), concatenated in rank order."""
    if not is_distributed():
        return items
    lists: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(lists, items)
    return [item for part in lists for item in part]
