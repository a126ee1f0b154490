"""Sharded runs under ``torch.distributed``: one large metrics evaluation split across processes.

Launch with ``torchrun --nproc_per_node K -m pipeline ...`` (GPUs: backend NCCL, one GPU per process by
``LOCAL_RANK``) or ``python -m torch.distributed.run --nproc_per_node K -m pipeline ... model.device=cpu``
(backend gloo). A launch is detected from the environment torchrun sets (``WORLD_SIZE`` > 1, ``RANK``,
``LOCAL_RANK``); without one every helper here is a no-op identity and nothing is initialised.

Sharding: rank r of w generates the contiguous samples ``[r·n // w, (r+1)·n // w)`` (sample i always uses seed
+ i, so the union of the shards is exactly the single-process sample set).

Merge convention: every rank persists its batches as shards in rank 0's run dir (``pipeline.core.progress``; one node,
or a run dir on a shared filesystem); after a barrier rank 0 reads every shard in sample order and computes each
metric on exactly the single-process set, so a sharded run reports the single-process scalars exactly. A resumed
sharded run (``torchrun ... -m pipeline.run.resume RUN_DIR``) lets each rank regenerate only its missing batches.
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
        log.warning(
            "%s processes on a node with %d GPU(s): backend gloo instead of NCCL",
            os.environ["LOCAL_WORLD_SIZE"],
            torch.cuda.device_count(),
        )
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


def shard(n: int, r: int | None = None) -> tuple[int, int]:
    """(start, count) of rank ``r``'s (default: this rank's) contiguous shard of n samples: ``[r·n // w, (r+1)·n // w)``."""
    r, w = (rank() if r is None else r), world_size()
    start, stop = r * n // w, (r + 1) * n // w
    return start, stop - start


def all_gather_list(items: list) -> list:
    """Every rank's list of small picklable items (judged rows, a few images), concatenated in rank order."""
    if not is_distributed():
        return items
    lists: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(lists, items)
    return [item for part in lists for item in part]


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself when not distributed)."""
    return all_gather_list([obj])[0] if is_distributed() else obj


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()
