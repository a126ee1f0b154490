"""Cost accounting's own cost: the default metrics run with ``mode.metrics.cost=true`` (phase timers, the FLOP count
of the first denoiser call, memory peaks, RAPL/NVML reads per batch) against ``mode.metrics.cost=false``.

Two measurements, both on the built-in shapes_sd:

- whole runs: ``python -m pipeline 'mode=[metrics]'`` (N = 256 unless ``--samples``) in their own processes, with
  and without, interleaved ``--repeats`` times after a warm-up (reference cache, page cache); the min wall of each
  side and their ratio, and the metrics stage's seconds (from the run log);
- in process: ``generate()`` of the same 64 images with ``cost=True`` vs ``cost=False``, interleaved, min of
  ``--repeats`` — the part the meters touch, without process start-up noise.

    python bench/cost_overhead.py               # goal: with / without <= 1.02 (wall)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from busy_machine import metrics_job  # noqa: E402 - bench/ is on sys.path when a bench script runs


def run(outputs: Path, cost: bool, samples: int) -> tuple[float, float, dict]:
    return metrics_job(outputs, samples, [f"mode.metrics.cost={str(cost).lower()}"])


def in_process(repeats: int) -> None:
    import torch
    from omegaconf import OmegaConf

    from pipeline.models.adapter import ModelAdapter
    from pipeline.models.generation import generate
    from pipeline.models.loading import load_pipeline
    from pipeline.zoo import locate

    cfg = OmegaConf.create(
        {"path": str(locate("shapes_sd")), "dtype": "float32", "variant": None, "revision": None, "allow_pickle": False}
    )
    model = ModelAdapter(load_pipeline(cfg, torch.device("cpu")))
    prompts = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")]

    def once(cost: bool) -> float:
        tic = time.perf_counter()
        for _ in generate(model, model.pipe.scheduler, 64, 16, 25, 7.5, 0, prompts=prompts, progress=False, cost=cost):
            pass
        return time.perf_counter() - tic

    once(False)  # warm-up
    times = {True: [], False: []}
    for _ in range(repeats):
        for cost in (False, True):
            times[cost].append(once(cost))
    a, b = min(times[True]), min(times[False])
    print(f"in process, generate() of 64 images, min of {repeats}: with {a:.2f} s, without {b:.2f} s: {a / b:.3f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with open("/proc/loadavg") as f:
        print(f"{os.cpu_count()} CPUs, load average {f.read().split()[0]} before")
    in_process(args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        run(out, True, args.samples)  # warm-up: SQLite store, reference cache, page cache
        sides: dict[bool, list] = {True: [], False: []}
        for _ in range(args.repeats):
            for cost in (False, True):
                sides[cost].append(run(out, cost, args.samples))
    (wa, sa, with_), (wb, sb, _) = min(sides[True]), min(sides[False])
    print(
        f"whole runs, N = {args.samples}, min of {args.repeats}: wall with {wa:.1f} s, without {wb:.1f} s: "
        f"{wa / wb:.3f}x (goal <= 1.02); metrics stage {sa:.1f} s vs {sb:.1f} s: {sa / sb:.3f}x"
    )
    print("a run's cost keys:", {k: round(v, 4) for k, v in sorted(with_.items()) if k.startswith("cost/")})


if __name__ == "__main__":
    main()
