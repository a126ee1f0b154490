"""The default metrics job alone and next to one competing CPU-bound process, before and after the thread policy
(``pipeline/core/threads.py``: threads = available CPUs, lowered batch by batch to the CPUs other processes leave free).

"before" = ``DIFFUSION_LENS_THREAD_POLICY=off`` (torch's defaults: active-spinning OpenMP threads). Each job is
``python -m pipeline 'mode=[metrics]'`` on the built-in shapes_sd in its own process (outputs in a temporary
directory, a warm reference cache so every job does the same work); reported: the job's wall time and its
generation time (``metrics/generation_seconds``). Competitor: ``python -c "while True: pass"``.

    python bench/busy_machine.py            # goals: after busy / after alone <= 2.5; after alone / before alone <= 1.05
    python bench/busy_machine.py --worst-prompts   # the per-prompt table + worst-prompts figure's share of the
                                                   # metrics stage, alone and busy (goal <= 5 %)
    python bench/busy_machine.py --worst-prompts mode.metrics.per_prompt=true   # 4 samples per prompt
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def metrics_job(outputs: Path, samples: int, overrides=(), env: dict | None = None) -> tuple[float, float, dict]:
    """One ``python -m pipeline 'mode=[metrics]'`` job on the built-in model in its own process: (wall seconds, the
    metrics stage's seconds from its log, its results.json). Also used by ``bench/cost_overhead.py``."""
    env = env or {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    tic = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "mode=[metrics]",
            f"paths.outputs={outputs}",
            f"mode.metrics.num_samples={samples}",
            *overrides,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - tic
    if proc.returncode:
        sys.exit(f"job failed:\n{proc.stderr[-3000:]}")
    stage = float(re.search(r"stage metrics done in ([\d.]+) s", proc.stdout + proc.stderr).group(1))
    results = sorted(outputs.glob("runs/*/*/results.json"), key=lambda p: p.stat().st_mtime)[-1]
    return wall, stage, json.loads(results.read_text())


def job(outputs: Path, policy: bool, busy: bool, samples: int, parts: bool = False, extra: tuple = ()):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    env.pop("OMP_WAIT_POLICY", None)
    if not policy:
        env["DIFFUSION_LENS_THREAD_POLICY"] = "off"
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(0.5 if busy else 0)
        wall, stage, r = metrics_job(outputs, samples, extra, env)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if parts:  # (the metrics stage's seconds, the per-prompt table + worst-prompts figure's seconds)
        return stage, r["metrics/per_prompt_seconds"]
    return wall, r["metrics/generation_seconds"]


def worst_prompts(samples: int, extra: tuple) -> None:
    """The per-prompt outputs' share of the metrics stage, alone and next to one competing process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        job(out, True, False, samples, extra=extra)  # warm-up
        for label, busy in (("alone", False), ("busy", True)):
            stage, part = job(out, True, busy, samples, parts=True, extra=extra)
            print(
                f"  {label:>5}: metrics stage {stage:6.1f} s, per-prompt table + worst-prompts figure {part:5.2f} s "
                f"= {100 * part / stage:.1f} % (goal <= 5 %)",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256, help="mode.metrics.num_samples (default: the job's own)")
    ap.add_argument("--worst-prompts", action="store_true", help="the worst-prompts figure's share instead")
    ap.add_argument("overrides", nargs="*", help="config overrides for every job, e.g. mode.metrics.per_prompt=true")
    args = ap.parse_args()
    if args.worst_prompts:
        worst_prompts(args.samples, tuple(args.overrides))
        return
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"{os.cpu_count()} CPUs, load average {load} before; default metrics job, N = {args.samples}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        job(out, True, False, args.samples)  # warm-up: SQLite store, reference cache, page cache
        rows = {}
        for label, policy, busy in (
            ("before, alone", False, False),
            ("after, alone", True, False),
            ("before, busy", False, True),
            ("after, busy", True, True),
        ):
            rows[label] = job(out, policy, busy, args.samples)
            print(f"  {label:>14}: wall {rows[label][0]:6.1f} s, generation {rows[label][1]:6.1f} s", flush=True)
    for i, what in ((0, "wall"), (1, "generation")):
        a, b = rows["after, alone"][i], rows["before, alone"][i]
        print(
            f"{what:>10}: after alone / before alone = {a / b:.3f} (goal <= 1.05); "
            f"busy / alone: before {rows['before, busy'][i] / b:.2f}x, after {rows['after, busy'][i] / a:.2f}x (goal <= 2.5)"
        )


if __name__ == "__main__":
    main()
