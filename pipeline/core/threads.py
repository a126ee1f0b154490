"""CPU thread policy: a run degrades gracefully on a shared machine instead of collapsing.

Measured on the 2-core machine (``bench/busy_machine.py``, README *Benchmarks*): torch's OpenMP threads busy-wait
between parallel regions, so next to one other CPU-bound process every region waits for a descheduled thread and the
default metrics job's generation ran 3.7× slower than alone. The obvious fix, ``OMP_WAIT_POLICY=PASSIVE``, made the
job barely slower when busy (1.05×) but 1.57× slower *alone* (threads sleep and wake at every region), and a
shorter spin (``GOMP_SPINCOUNT``) did not help when busy. So the policy is adaptive instead:

- torch threads start at the CPUs this process may actually use (affinity mask, cgroup v2 ``cpu.max`` quota), not
  ``os.cpu_count()`` (a container limited to 2 CPUs on a 64-core host would otherwise start 64 spinning threads);
- :class:`CpuShare`, updated once per generated batch, measures how much CPU *other* processes used on this
  process's CPUs since the last batch (``/proc/stat`` minus this process's own CPU time) and lowers the thread
  count to the CPUs they leave free (never below 1, never above the starting count), raising it again when they
  are gone. OpenMP keeps its fast active wait when the machine is ours.

``DIFFUSION_LENS_THREAD_POLICY=off`` (or an explicit ``OMP_NUM_THREADS``) leaves threads as torch sets them.
"""

from __future__ import annotations

import logging
import math
import os
import time

__all__ = ["available_cpus", "configure_torch", "CpuShare"]

log = logging.getLogger(__name__)

OFF = "DIFFUSION_LENS_THREAD_POLICY"


def enabled() -> bool:
    return os.environ.get(OFF, "").strip().lower() not in ("off", "0", "false", "no") and not os.environ.get(
        "OMP_NUM_THREADS"
    )


def available_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by a cgroup v2 CPU quota (``cpu.max``)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def configure_torch() -> None:
    """torch intra-op threads = available CPUs (the CLI calls it once at start-up)."""
    if not enabled():
        return
    import torch

    torch.set_num_threads(available_cpus())


class CpuShare:
    """Keep torch's thread count at the CPUs other processes leave free; call :meth:`update` between batches."""

    def __init__(self) -> None:
        import torch

        self._torch = torch
        self.active = enabled() and os.path.exists("/proc/stat")
        self.ceiling = torch.get_num_threads()
        try:
            self._cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        except (AttributeError, OSError):
            self._cpus = None
        self._tick = os.sysconf("SC_CLK_TCK") if self.active else 100
        self._last = self._sample() if self.active else None

    def _sample(self) -> tuple[float, float, float] | None:
        """(busy CPU-seconds of this process's CPUs, own CPU-seconds, wall seconds)."""
        busy = 0
        try:
            with open("/proc/stat") as f:
                for line in f:
                    if not line.startswith("cpu") or line.startswith("cpu "):
                        continue
                    name, *fields = line.split()
                    if self._cpus is None or name in self._cpus:
                        v = [int(x) for x in fields[:8]]
                        busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
        except (OSError, ValueError, IndexError):
            self.active = False
            return None
        t = os.times()
        return busy / self._tick, t.user + t.system, time.monotonic()

    def update(self) -> int:
        """Re-measure; set and return the thread count."""
        if not self.active:
            return self._torch.get_num_threads()
        now = self._sample()
        if now is None or self._last is None:
            return self._torch.get_num_threads()
        d_busy, d_own, d_wall = (a - b for a, b in zip(now, self._last))
        self._last = now
        if d_wall < 0.2:  # too short to tell
            return self._torch.get_num_threads()
        others = max(0.0, (d_busy - d_own) / d_wall)  # CPUs' worth of other processes' work
        want = max(1, min(self.ceiling, round(len(self._cpus or range(self.ceiling)) - others)))
        if want != self._torch.get_num_threads():
            log.info(
                "other processes used %.1f of %d CPUs: %d torch thread(s)",
                others,
                len(self._cpus or range(self.ceiling)),
                want,
            )
            self._torch.set_num_threads(want)
        return want
