"""What a run costs (pipeline.core.cost, the cost/* keys): FLOPs with the CPU attention kernel counted, energy
counters (RAPL wrap-around, unreadable counters said), a run's cost scalars from its shards' meters, generation's
phase timers and chosen indices, and one warning line per cause (pipeline.core.repeats)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.core import cost as C
from pipeline.core.repeats import once_per_cause
from pipeline.models.generation import generate


def test_attention_flops_on_cpu_equal_the_math_backends_matmuls():
    """torch's counter has no formula for the CPU flash kernel (it would count 0); ours equals the bmm's of the
    math backend, which torch's counter does count."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = torch.randn(2, 3, 16, 8), torch.randn(2, 3, 24, 8), torch.randn(2, 3, 24, 4)
    _, ours = C.count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as math:
        F.scaled_dot_product_attention(q, k, v)
    assert ours == math.get_total_flops() == 2 * 2 * 3 * 16 * 24 * (8 + 4)
    lin = torch.nn.Linear(8, 5)
    _, flops = C.count_flops(lambda: lin(torch.randn(7, 8)))
    assert flops == 2 * 7 * 8 * 5  # 2 FLOPs per multiply-add


def _zone(root, name, energy_uj, limit_uj):
    zone = root / name
    zone.mkdir()
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{limit_uj}\n")
    return zone


def test_rapl_counter_sums_packages_unwraps_and_says_why_when_unreadable(tmp_path):
    p0 = _zone(tmp_path, "intel-rapl:0", 900, 1000)
    _zone(tmp_path, "intel-rapl:1", 10, 1000)
    _zone(p0, "intel-rapl:0:0", 5, 1000)  # a subzone (cores) of package 0: inside its total, not added again
    meter = C.EnergyCounter("cpu", rapl_root=str(tmp_path))
    assert meter.source == "rapl" and meter.read() == 0.0
    (p0 / "energy_uj").write_text("100\n")  # wrapped: 900 -> 1000 -> 100 is 200 µJ
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("60\n")
    assert meter.read() == pytest.approx(250e-6)
    (p0 / "energy_uj").unlink()  # becomes unreadable mid-run: None and a reason, never an exception
    assert meter.read() is None and "unreadable" in meter.reason
    empty = C.EnergyCounter("cpu", rapl_root=str(tmp_path / "none"))
    assert empty.read() is None and "no RAPL package counter" in empty.reason


def test_run_cost_per_image_and_what_it_cannot_give():
    timings = {"text_encoding": 0.5, "denoising": 3.0, "decoding": 0.5}
    meters = [
        {"timings": {**timings, "denoiser_flops": 4e9}, "peak_rss_mb": 100.0, "energy_joules": 8.0},
        {"timings": timings, "peak_rss_mb": 120.0, "energy_joules": 12.0},
    ]
    batches = [(4, 4.0, 1.0, meters[0]), (4, 6.0, 1.0, meters[1])]
    out, why = C.run_cost(batches, nfe=25)
    assert out["cost/sec_per_image"] == pytest.approx(12.0 / 8)
    assert out["cost/images_per_second"] == pytest.approx(8 / 12.0)
    assert out["cost/batch_seconds_p50"] == pytest.approx(np.percentile([4.0, 6.0], 50))
    assert out["cost/batch_seconds_p95"] == pytest.approx(np.percentile([4.0, 6.0], 95))
    assert out["cost/sec_per_image_denoising"] == pytest.approx(6.0 / 8)
    assert out["cost/sec_per_image_features"] == pytest.approx(2.0 / 8)
    assert out["cost/flops_per_image"] == pytest.approx(4e9 / 4 * 25)  # one call on a batch of 4, x NFE
    assert out["cost/achieved_tflops"] == pytest.approx(1e9 * 25 * 8 / 6.0 / 1e12)
    assert out["cost/peak_rss_mb"] == 120.0 and out["cost/energy_joules_per_image"] == pytest.approx(20.0 / 8)
    assert not why
    # the native path: one "call" per batch, no phase split and no FLOPs; a skipped energy counter says why
    native = {"timings": {"call": 4.0}, "peak_rss_mb": 1.0, "energy_skipped": "no RAPL package counter under /x"}
    out, why = C.run_cost([(4, 4.0, 0.5, native)], nfe=None)
    assert "cost/sec_per_image_denoising" not in out and "native path" in why["cost/sec_per_image_denoising"]
    assert "cost/flops_per_image" in why and why["cost/energy_joules_per_image"].startswith("no RAPL")


def test_generation_times_its_phases_counts_flops_once_and_regenerates_chosen_samples(model_of):
    model = model_of("sdxl")
    sampler = model.pipe.scheduler
    prompts = ["a red circle", "a blue square", "a green triangle"]
    kw = dict(prompts=prompts, height=32, width=32, progress=False)
    run = list(generate(model, sampler, 6, 3, 2, 5.0, 0, cost=True, **kw))
    assert set(run[0].timings) == {"text_encoding", "denoising", "decoding", "denoiser_flops"}
    assert set(run[1].timings) == {"text_encoding", "denoising", "decoding"}  # counted once per call
    assert run[0].timings["denoiser_flops"] > 0 and all(t["denoising"] > 0 for t in (b.timings for b in run))
    images = torch.cat([b.images for b in run])
    chosen = list(generate(model, sampler, 0, 3, 2, 5.0, 0, indices=[4, 1], **kw))
    assert [b.indices for b in chosen] == [[4, 1]] and chosen[0].prompts == [prompts[4 % 3], prompts[1]]
    diff = (chosen[0].images.int() - images[[4, 1]].int()).abs().max()
    assert diff <= 1  # per-sample seeds: the run's images up to float rounding of another batch composition


def test_repeated_warnings_print_once_per_cause_and_end_with_their_count(caplog):
    logger = logging.getLogger("pipeline.test_repeats")
    root = logging.getLogger()
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handlers = [Collect(), Collect()]  # e.g. Hydra's console and file handlers: each sees the first line once
    for h in handlers:
        root.addHandler(h)
    try:
        with once_per_cause():
            for n in (32, 64, 32):
                logger.warning("fewer samples than dimensions (%d in the second set)", n)
            logger.warning("another cause")
            logger.error("errors always print")
            logger.error("errors always print")
    finally:
        for h in handlers:
            root.removeHandler(h)
    firsts = [m for m in seen if m.startswith("fewer")]
    assert firsts == ["fewer samples than dimensions (32 in the second set)"] * 2  # once per handler
    assert seen.count("another cause") == 2 and seen.count("errors always print") == 4
    summary = [m for m in seen if "in this run" in m]
    assert summary == ["3× in this run (printed once above): fewer samples than dimensions (32 in the second set)"] * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generation_reports_memory_peaks_flops_and_energy_or_why_not(model_of):
    """On CUDA: the memory peaks are positive, the FLOPs equal the CPU count (the same shapes), and energy comes from
    NVML where nvidia-ml-py reads it, else a reason."""
    model = model_of("sdxl")
    kw = dict(prompts=["a red circle"], height=32, width=32, progress=False, cost=True)
    cpu = next(generate(model, model.pipe.scheduler, 2, 2, 2, 5.0, 0, **kw)).timings["denoiser_flops"]
    model.pipe.to("cuda")
    try:
        meter = C.EnergyCounter("cuda")
        torch.cuda.reset_peak_memory_stats()
        before = meter.read()
        batch = next(generate(model, model.pipe.scheduler, 2, 2, 2, 5.0, 0, **kw))
        allocated, reserved = C.cuda_peaks_mb("cuda")
        assert 0 < allocated <= reserved and batch.timings["denoiser_flops"] == cpu
        after = meter.read()
        assert (after is not None and after >= before) if meter.source == "nvml" else bool(meter.reason)
    finally:
        model.pipe.to("cpu")
