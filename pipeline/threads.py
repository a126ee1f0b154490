"""CPU thread policy: a run degrades gracefully on a shared machine instead of collapsing.

Measured on the 2-core machine (``bench/busy_machine.py``, README *Benchmarks*): torch's OpenMP threads busy-wait
between parallel regions, so next to one other CPU-bound process each region waits for a descheduled spinning thread
and a job ran ~3× slower; with ``OMP_WAIT_POLICY=PASSIVE`` idle threads sleep and the same job degrades far less.

- ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it. OpenMP reads it once, when torch is first imported, so
  :func:`configure_environment` runs from ``pipeline/__init__.py`` — before anything imports torch when the project
  is started as ``python -m pipeline`` (a program that imports torch before ``pipeline`` keeps its own policy).
- torch threads = the CPUs this process may actually use (its affinity mask and cgroup CPU quota), not
  ``os.cpu_count()`` (a container limited to 2 CPUs on a 64-core host would otherwise start 64 threads).

``DIFFUSION_LENS_THREAD_POLICY=off`` leaves both as torch would (the benchmark's "before").
"""

from __future__ import annotations

import math
import os

__all__ = ["configure_environment", "available_cpus", "configure_torch"]

OFF = "DIFFUSION_LENS_THREAD_POLICY"


def _enabled() -> bool:
    return os.environ.get(OFF, "").strip().lower() not in ("off", "0", "false", "no")


def configure_environment() -> None:
    """Set the OpenMP wait policy before torch starts (no torch import here)."""
    if _enabled():
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def available_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by a cgroup v2 CPU quota (``cpu.max``)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def configure_torch() -> None:
    """torch intra-op threads = available CPUs (unless the policy is off or OMP_NUM_THREADS was set)."""
    if not _enabled() or os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    torch.set_num_threads(available_cpus())
