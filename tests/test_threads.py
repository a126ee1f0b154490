"""The thread policy: fewer torch threads while other processes use this process's CPUs, back up when they stop."""

from __future__ import annotations

import torch

from pipeline.core import threads


def test_cpu_share_follows_what_other_processes_leave_free(monkeypatch):
    monkeypatch.delenv(threads.OFF, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        share = threads.CpuShare()
        share._cpus = {"cpu0", "cpu1"}
        share.active = True
        samples = iter(
            [
                (10.0, 1.0, 0.0),  # (busy CPU-s of our CPUs, own CPU-s, wall s) after a 1 s batch:
                (13.0, 2.0, 1.0),  # 3 CPU-s busy, 1 our own: another process took 2 CPUs -> 1 thread
                (14.0, 3.0, 2.0),  # only our own work: both CPUs free again -> 2 threads
                (14.1, 3.05, 2.1),
            ]
        )  # 0.1 s: too short to tell, unchanged
        monkeypatch.setattr(share, "_sample", lambda: next(samples))
        share._last = share._sample()
        assert share.update() == 1 and torch.get_num_threads() == 1
        assert share.update() == 2 and torch.get_num_threads() == 2
        assert share.update() == 2
        monkeypatch.setenv(threads.OFF, "off")
        assert not threads.CpuShare().active  # the benchmark's "before": torch's own threads
    finally:
        torch.set_num_threads(before)


def test_available_cpus_is_the_affinity_mask_at_most():
    import os

    assert 1 <= threads.available_cpus() <= len(os.sched_getaffinity(0))
