"""What generating and judging an image costs: phase timers, FLOPs, memory and energy readers (``cost/*`` keys).

Conventions (docs/cost.md):

- **NFE** is denoiser evaluations per image (:func:`pipeline.models.generation.nfe`); classifier-free guidance
  doubles the batch of each call, not the NFE.
- **FLOPs** are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the first denoiser call of a run and
  multiplied by the NFE: matmul-type operations only (mm, addmm, bmm, convolution, attention), 2 FLOPs per
  multiply-add, as torch's counter and fvcore count them; elementwise work (norms, activations, the solver step)
  is not counted. torch 2.13's counter has no formula for the CPU attention kernel
  (``_scaled_dot_product_flash_attention_for_cpu``, what ``F.scaled_dot_product_attention`` runs on CPU) and would
  count it as 0: :data:`_CUSTOM_FLOPS` adds it (2·B·H·Sq·Sk·(Dqk + Dv), torch's own SDPA formula; tested against
  the math backend, whose bmm's the counter does count).
- **Wall seconds** are ``time.perf_counter`` around each phase, with ``torch.cuda.synchronize`` on CUDA so a phase's
  kernels are charged to it.
- **Energy**: NVML's total-energy counter of the GPU (``nvmlDeviceGetTotalEnergyConsumption``, mJ since the driver
  loaded; ``nvidia-ml-py``, optional) on CUDA; on CPU the Linux RAPL package counters
  (``/sys/class/powercap/intel-rapl:<n>/energy_uj``, µJ, wrapping at ``max_energy_range_uj``). Both measure the
  whole device or package, other processes included: a figure for an otherwise idle machine. Where neither is
  readable the reason is returned (the run tags ``skipped.cost/energy_joules_per_image`` with it).
- **Memory**: the process's peak resident set (``ru_maxrss``) on CPU; ``torch.cuda.max_memory_allocated`` and
  ``max_memory_reserved`` (since the stage reset them) on CUDA.
"""

from __future__ import annotations

import glob
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from pipeline.core.metric_keys import (
    COST_ACHIEVED_TFLOPS,
    COST_BATCH_P50,
    COST_BATCH_P95,
    COST_CUDA_ALLOCATED,
    COST_CUDA_RESERVED,
    COST_ENERGY,
    COST_FLOPS,
    COST_IMAGES_PER_SECOND,
    COST_PEAK_RSS,
    COST_SEC_PER_IMAGE,
    cost_phase_key,
)

__all__ = ["run_cost", "count_flops", "EnergyCounter", "Stopwatch", "peak_rss_mb", "cuda_peaks_mb", "percentile"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------- FLOPs
def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``softmax(Q Kᵀ) V`` from the shapes (B, H, Sq, D), (B, Hk, Sk, D), (B, Hk, Sk, Dv): 2·B·H·Sq·Sk·D for
    Q Kᵀ and 2·B·H·Sq·Sk·Dv for the product with V (torch.utils.flop_counter's ``sdpa_flop_count``)."""
    *batch, heads, sq, d = query
    sk, dv = key[-2], value[-1]
    b = 1
    for n in batch:
        b *= n
    return 2 * b * heads * sq * sk * (d + dv)


def _custom_flops() -> dict:
    ops = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            ops[op] = _sdpa_flops
    return ops


_CUSTOM_FLOPS = _custom_flops()


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``(fn(), FLOPs it ran)`` under torch's flop counter, with the CPU attention kernel counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------------- time
class Stopwatch:
    """Seconds per named phase, summed; ``with watch("denoising"): ...``. On CUDA each phase ends with a
    ``torch.cuda.synchronize`` so queued kernels are charged to the phase that launched them."""

    def __init__(self, device: torch.device | str | None = None):
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = {}

    def __call__(self, phase: str):
        return _Phase(self, phase)


class _Phase:
    def __init__(self, watch: Stopwatch, phase: str):
        self.watch, self.phase = watch, phase

    def __enter__(self):
        self.tic = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.watch.cuda and exc[0] is None:
            torch.cuda.synchronize()
        self.watch.seconds[self.phase] = self.watch.seconds.get(self.phase, 0.0) + time.perf_counter() - self.tic


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics (numpy's default,
    ``method="linear"``)."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ----------------------------------------------------------------------------------------------------- memory
def peak_rss_mb() -> float:
    """This process's peak resident set size so far, MiB (``getrusage``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if os.uname().sysname == "Linux" else peak / 2**20


def cuda_peaks_mb(device: torch.device | str) -> Optional[tuple[float, float]]:
    """``(max_memory_allocated, max_memory_reserved)`` of a CUDA ``device`` in MiB; None elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20, torch.cuda.max_memory_reserved(device) / 2**20


# ----------------------------------------------------------------------------------------------------- energy
RAPL_ROOT = "/sys/class/powercap"


class EnergyCounter:
    """A cumulative energy reading in joules of the device a run computes on: :meth:`read` (None when unavailable).

    ``source`` says which counter (``nvml`` / ``rapl``), ``reason`` why there is none. Wrap-around of the RAPL
    counters is handled between consecutive reads (read at least once per wrap period: minutes at full load)."""

    def __init__(self, device: torch.device | str, rapl_root: str = RAPL_ROOT):
        self.device = torch.device(device)
        self.source: Optional[str] = None
        self.reason: Optional[str] = None
        self._read: Optional[Callable[[], float]] = None
        if self.device.type == "cuda":
            self._open_nvml()
        elif self.device.type == "cpu":
            self._open_rapl(rapl_root)
        else:
            self.reason = f"no energy counter for device type {self.device.type!r} (NVML: CUDA; RAPL: CPU)"

    def read(self) -> Optional[float]:
        if self._read is None:
            return None
        try:
            return self._read()
        except Exception as e:  # a counter that stops being readable mid-run: say so, never fail the run
            self.reason = f"{self.source} counter became unreadable: {type(e).__name__}: {e}"
            self._read, self.source = None, None
            return None

    # ---- NVML
    def _open_nvml(self) -> None:
        try:
            import pynvml  # nvidia-ml-py
        except ImportError:
            self.reason = "NVML unavailable: pip install nvidia-ml-py (optional) to measure GPU energy"
            return
        try:
            pynvml.nvmlInit()
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises NotSupported on pre-Volta GPUs
        except Exception as e:
            self.reason = f"NVML total-energy counter not readable: {type(e).__name__}: {e}"
            return
        self.source = "nvml"
        self._read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0  # mJ -> J

    # ---- RAPL
    def _open_rapl(self, root: str) -> None:
        # the package domains only (intel-rapl:0, intel-rapl:1; not their core/uncore/dram subzones intel-rapl:0:0)
        zones = sorted(p for p in glob.glob(os.path.join(root, "intel-rapl:*")) if p.count(":") == 1)
        if not zones:
            self.reason = f"no RAPL package counter under {root} (not an x86 Linux host, or powercap not exposed)"
            return
        readers = []
        for zone in zones:
            energy = Path(zone) / "energy_uj"
            try:
                int(energy.read_text())
                limit = int((Path(zone) / "max_energy_range_uj").read_text())
            except (OSError, ValueError) as e:
                self.reason = (
                    f"RAPL counter {energy} not readable ({type(e).__name__}: {e}); since Linux 5.10 it is "
                    "root-only: `sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj` to allow it"
                )
                return
            readers.append(_RaplZone(energy, limit))
        self.source = "rapl"
        self._read = lambda: sum(z.read() for z in readers)


class _RaplZone:
    """One RAPL package counter as an unwrapped running total in joules."""

    def __init__(self, path: Path, limit_uj: int):
        self.path, self.limit = path, limit_uj
        self.last = int(path.read_text())
        self.total_uj = 0

    def read(self) -> float:
        now = int(self.path.read_text())
        self.total_uj += now - self.last if now >= self.last else now + self.limit - self.last
        self.last = now
        return self.total_uj / 1e6


# ----------------------------------------------------------------------------------------------------- a run
def run_cost(batches: list, nfe: int | None) -> tuple[dict[str, float], dict[str, str]]:
    """The ``cost/*`` scalars of a run from its shards' meters (``batches``: per shard ``(images, generation s,
    features s, cost meters or None)``), and ``{key: reason}`` for those that cannot be given. Conventions:
    :mod:`pipeline.core.cost`; per image = over every generated image, invalid ones included."""
    out: dict[str, float] = {}
    why: dict[str, str] = {}
    n = sum(b[0] for b in batches)
    gen, feat = sum(b[1] for b in batches), sum(b[2] for b in batches)
    if not n:
        return out, why
    out[COST_SEC_PER_IMAGE] = (gen + feat) / n
    out[COST_IMAGES_PER_SECOND] = n / (gen + feat) if gen + feat > 0 else float("nan")
    latencies = [b[1] for b in batches]
    out[COST_BATCH_P50], out[COST_BATCH_P95] = percentile(latencies, 50), percentile(latencies, 95)
    out[cost_phase_key("features")] = feat / n
    meters = [b[3] for b in batches]
    if any(c is None for c in meters):
        why[cost_phase_key("denoising")] = "some batches were generated with mode.metrics.cost=false"
        return out, why
    timings = [c["timings"] for c in meters]
    if all("denoising" in t for t in timings):
        for phase in ("text_encoding", "denoising", "decoding"):
            out[cost_phase_key(phase)] = sum(t.get(phase, 0.0) for t in timings) / n
    else:
        for phase in ("text_encoding", "denoising", "decoding"):
            why[cost_phase_key(phase)] = (
                "the native path (scheduler=native on a family without an adapter) runs "
                "the pipeline's own __call__ as one piece: no phase split"
            )
    counted = [
        (b[0], c["timings"]["denoiser_flops"]) for b, c in zip(batches, meters) if "denoiser_flops" in c["timings"]
    ]
    if counted and nfe is not None:
        images, flops = counted[0]
        out[COST_FLOPS] = flops / images * nfe
        denoise = sum(t.get("denoising", 0.0) for t in timings)
        if denoise > 0:
            out[COST_ACHIEVED_TFLOPS] = out[COST_FLOPS] * n / denoise / 1e12
    else:
        why[COST_FLOPS] = (
            "the native path's __call__ has no separate denoiser call to count"
            if not all("denoising" in t for t in timings)
            else "no batch of this run counted its first denoiser call (all generated by an older attempt)"
        )
    out[COST_PEAK_RSS] = max(c["peak_rss_mb"] for c in meters)
    for key, field_ in ((COST_CUDA_ALLOCATED, "cuda_max_allocated_mb"), (COST_CUDA_RESERVED, "cuda_max_reserved_mb")):
        if all(field_ in c for c in meters):
            out[key] = max(c[field_] for c in meters)
    if all("energy_joules" in c for c in meters):
        out[COST_ENERGY] = sum(c["energy_joules"] for c in meters) / n
    else:
        why[COST_ENERGY] = next((c["energy_skipped"] for c in meters if "energy_skipped" in c), "not measured")
    return out, why
