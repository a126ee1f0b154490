"""Figure for sweeps: wall time of a scheduler sweep vs the work it cannot avoid.

One `python -m pipeline -m` process runs K metrics jobs on shapes_sd (one scheduler each). Baseline (the
unavoidable work): the sum over jobs of generation + generated-image feature time, plus one reference
extraction (``metrics/*_seconds`` of the children, read back from MLflow). Measured: the wall time of the whole
command (imports, Hydra, model load, MLflow, figures, artifacts included) and of the parent run. Target:
wall <= 1.1 x baseline, and one model load per sweep process (children tagged ``model_cache=miss``: 1).

Usage: python bench/sweep_overhead.py [--schedulers ddim,euler,dpmpp_2m,unipc] [--n 640] [--steps 25]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schedulers", default="ddim,euler,dpmpp_2m,unipc")
    ap.add_argument("--n", type=int, default=640)
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args()
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pipeline",
            "-m",
            "mode=[metrics]",
            f"scheduler={args.schedulers}",
            f"mode.metrics.num_samples={args.n}",
            f"sampler.num_inference_steps={args.steps}",
            f"paths.outputs={tmp}",
        ]
        tic = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - tic
        if proc.returncode:
            raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
        client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "parent")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    m = [c.data.metrics for c in children]
    work = sum(x["metrics/generation_seconds"] + x["metrics/fake_features_seconds"] for x in m)
    ref = max(x["metrics/reference_seconds"] for x in m)  # the one extraction; the hits load from disk
    loads = sum(c.data.tags["model_cache"] == "miss" for c in children)
    refs = sum(c.data.tags["reference_cache"] == "miss" for c in children)
    span = (parent.info.end_time - parent.info.start_time) / 1000
    baseline = work + ref
    print(
        f"{len(children)} jobs (schedulers {args.schedulers}), N={args.n}, {args.steps} steps, shapes_sd, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"baseline: generation + fake features summed over jobs {work:.1f} s + one reference extraction {ref:.1f} s "
        f"= {baseline:.1f} s"
    )
    print(
        f"sweep command wall {wall:.1f} s -> {wall / baseline:.3f}x baseline; parent run span {span:.1f} s -> "
        f"{span / baseline:.3f}x"
    )
    print(f"model loads in the sweep process: {loads}; reference extractions: {refs}")


if __name__ == "__main__":
    main()
