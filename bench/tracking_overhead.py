"""Figure for the foundation: what the run machinery (Hydra config, MLflow params/metrics/artifacts, results.json)
costs on top of the analysis itself.

Baseline: the schedule stage run with no tracker (pure computation + plots written to disk).
Measured: ``run_pipeline`` on the same config with a warm embedded SQLite store.
Prints both wall times and the ratio. Usage: python bench/tracking_overhead.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import compose_cfg  # noqa: E402

from pipeline.core.context import RunContext  # noqa: E402
from pipeline.run.runner import execute, run_pipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cfg = compose_cfg([], out)
        run_pipeline(cfg, out / "warmup")  # migrates the SQLite store, warms imports and font cache
        bare, full = [], []
        for i in range(args.repeats):
            tic = time.perf_counter()
            execute(RunContext(cfg, out / f"bare{i}"), ["schedule"])
            bare.append(time.perf_counter() - tic)
            tic = time.perf_counter()
            run_pipeline(cfg, out / f"full{i}")
            full.append(time.perf_counter() - tic)
    b, f = statistics.median(bare), statistics.median(full)
    print(
        f"schedule stage alone (baseline): {b:.2f} s | full tracked run: {f:.2f} s | ratio {f / b:.2f}x "
        f"(median of {args.repeats})"
    )


if __name__ == "__main__":
    main()
