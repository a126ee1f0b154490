"""What a crash costs: a metrics run SIGKILLed at 50 % and resumed vs the same run uninterrupted.

    python bench/resume_overhead.py [--n 256] [overrides ...]

Three subprocesses on the default model (shapes_sd, ``mode=[metrics]``, N = ``--n``, batch 16), outputs in a
temporary folder, reference cache warm for all (a first run fills it): (1) uninterrupted; (2) killed after half of
its batches are on disk (``DIFFUSION_LENS_CRASH_AT=shard_written:<half>``, SIGKILL); (3) ``python -m pipeline.run.resume``
of (2). Prints each wall time, the ratio (2 + 3) / 1, and the same ratio without the second start-up (the killed
run's wall time minus the generation and feature time in its shards: imports, model load, reference features),
goal ≤ 1.05×; and whether the resumed run's scalars equal the uninterrupted run's (timings aside).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def launch(args: list[str], crash: str | None = None, module: str = "pipeline") -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    env.pop("DIFFUSION_LENS_CRASH_AT", None)
    if crash:
        env["DIFFUSION_LENS_CRASH_AT"] = crash
    tic = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if (res.returncode != 0) != bool(crash):
        raise SystemExit(f"{module} {args}: exit {res.returncode}\n{res.stderr[-3000:]}")
    return wall


def shard_seconds(run_dir: pathlib.Path) -> float:
    import numpy as np

    total = 0.0
    for p in (run_dir / "progress" / "metrics").glob("batch_*.npz"):
        with np.load(p) as z:
            meta = json.loads(z["meta"].tobytes().decode())
        total += meta["generation_seconds"] + meta["features_seconds"]
    return total


def main() -> None:
    from pipeline.core.metric_keys import is_timing

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    batches = -(-args.n // 16)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        common = [
            "mode=[metrics]",
            f"mode.metrics.num_samples={args.n}",
            "sampler.batch_size=16",
            f"paths.outputs={tmp / 'out'}",
            *args.overrides,
        ]
        launch([*common, f"hydra.run.dir={tmp / 'warmup'}", "mode.metrics.num_samples=16"])  # fills the reference cache
        whole = launch([*common, f"hydra.run.dir={tmp / 'whole'}"])
        killed = launch([*common, f"hydra.run.dir={tmp / 'killed'}"], crash=f"shard_written:{batches // 2}")
        startup = killed - shard_seconds(tmp / "killed")
        resumed = launch([str(tmp / "killed")], module="pipeline.run.resume")
        a, b = (json.loads((tmp / d / "results.json").read_text()) for d in ("whole", "killed"))
    same = {k: v for k, v in a.items() if not is_timing(k)} == {k: v for k, v in b.items() if not is_timing(k)}
    print(f"uninterrupted            {whole:7.1f} s   (N = {args.n}, {batches} batches of 16)")
    print(f"killed at 50 %           {killed:7.1f} s   (start-up {startup:.1f} s: imports, model, reference)")
    print(f"resumed                  {resumed:7.1f} s")
    print(
        f"(killed + resumed) / uninterrupted = {(killed + resumed) / whole:.3f}x; "
        f"without the second start-up {(killed + resumed - startup) / whole:.3f}x (goal <= 1.05x)"
    )
    print(f"resumed scalars equal the uninterrupted run's (timings aside): {same}")


if __name__ == "__main__":
    main()
