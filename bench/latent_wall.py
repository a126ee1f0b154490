"""Wall time of the whole latent mode on shapes_sd (every part, default counts): this tree vs a baseline commit.

    python bench/latent_wall.py --baseline 2492f09 [--repeats 2]

The baseline is checked out with ``git worktree`` into a temporary folder; both trees run
``python -m pipeline 'mode=[latent]'`` (outputs in a temporary folder, same seed) in turn, ``--repeats`` times,
alternating so a busy machine slows both alike. Prints each wall time, the ratio this / baseline (goal ≤ 1.05×) and
whether the results agree (every ``latent/*`` scalar, relative difference).
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


def run(tree: pathlib.Path, out: pathlib.Path, extra: list[str]) -> tuple[float, dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(tree)}
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "mode=[latent]",
        f"paths.outputs={out}",
        f"hydra.run.dir={out}/run",
        *extra,
    ]
    tic = time.perf_counter()
    res = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if res.returncode:
        raise SystemExit(f"{tree}: exit {res.returncode}\n{res.stderr[-3000:]}")
    return wall, json.loads((out / "run" / "results.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="a commit of this repository (before the change)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = pathlib.Path(tmp) / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base), args.baseline], cwd=REPO, check=True, capture_output=True
        )
        try:
            walls: dict[str, list[float]] = {"baseline": [], "this": []}
            results = {}
            for k in range(args.repeats):
                for name, tree in (("baseline", base), ("this", REPO)):
                    wall, results[name] = run(tree, pathlib.Path(tmp) / f"{name}{k}", args.overrides)
                    walls[name].append(wall)
                    print(f"run {k + 1}: {name:8s} {wall:6.1f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, capture_output=True)
    for k in range(args.repeats):
        print(f"pair {k + 1}: this / baseline = {walls['this'][k] / walls['baseline'][k]:.3f}x (goal <= 1.05x)")
    keys = sorted(k for k in results["baseline"] if k.startswith("latent/") and k in results["this"])
    diffs = {
        k: abs(results["this"][k] - results["baseline"][k]) / max(abs(results["baseline"][k]), 1e-12) for k in keys
    }
    worst = max(diffs, key=diffs.get)
    print(
        f"{len(keys)} latent/* scalars in both; largest relative difference {diffs[worst]:.2e} ({worst}); "
        f"only in baseline: {sorted(set(results['baseline']) - set(results['this']))}; "
        f"only here: {sorted(k for k in set(results['this']) - set(results['baseline']) if k.startswith('latent/'))}"
    )


if __name__ == "__main__":
    main()
