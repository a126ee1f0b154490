"""Reference caches that need no decoding: a folder reference's warm run vs its cold run.

Exports a shapes folder (``--n`` images, 64×64, :func:`pipeline.data.shapes.export`), then times the metrics
mode's ``reference`` + ``real_features`` stages on it (``dataset=folder``, ``features=[shapes_net]``, the built-in
extractor) in a fresh process each: **cold** (empty cache: the folder is decoded to be checked, then again to
extract the features; the named baseline) and **warm** (check and features from the cache). Extractor construction
is not timed. Prints both times, warm / cold (goal ≤ 5 %) and the images decoded in each (goal warm: 0).

``--baseline COMMIT`` also times that commit's warm run (its tree exported with ``git archive`` into a temporary
folder, or a directory holding such a tree; its own cache), for the figure before the change.

Usage: python bench/reference_cache.py [--n 10000] [--folder DIR] [--repeats 3] [--baseline COMMIT]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_CHILD = r"""
import json, logging, sys, time
sys.path[:0] = [{tree!r}, {tree!r} + "/tests"]
import torch
from conftest import compose_cfg
from pipeline.core.context import RunContext
from pipeline.run.runner import _run_stage
import pipeline.data.folder as F

if hasattr(F, "decoded_count"):
    count = F.decoded_count
else:  # a tree from before the counter: count the folder's one decoding function
    calls = [0]
    load = F._load_rgb
    def counted(path):
        calls[0] += 1
        return load(path)
    F._load_rgb = counted
    count = lambda: calls[0]

hits = []
class Hits(logging.Handler):
    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("reference cache "):
            hits.append(msg.startswith("reference cache hit"))
logging.getLogger("pipeline.features.stages").addHandler(Hits())
logging.getLogger("pipeline.features.stages").setLevel(logging.INFO)

cfg = compose_cfg({overrides!r}, {out!r})
ctx = RunContext(cfg, {out!r} + "/run")
ctx.device = torch.device("cpu")
done = set()
_run_stage("extractors", ctx, done)  # not timed: the same in both runs
before = count()
tic = time.perf_counter()
_run_stage("reference", ctx, done)
_run_stage("real_features", ctx, done)
seconds = time.perf_counter() - tic
pool = ctx.get("real_features")["shapes_net"]["pool"]
print("RESULT", json.dumps({{"seconds": seconds, "decoded": count() - before, "hit": all(hits) and bool(hits),
                            "n": ctx.get("reference").n, "pool_sum": float(pool.double().sum())}}))
"""


def export_folder(folder: Path, n: int) -> None:
    from pipeline.data.shapes import ShapesDataset, export

    if len(list(folder.glob("*.png"))) == n:
        return
    shutil.rmtree(folder, ignore_errors=True)
    tic = time.perf_counter()
    export(ShapesDataset("test", n, seed=0, size=64), folder)
    print(f"exported {n} shapes images (64x64) to {folder} in {time.perf_counter() - tic:.1f} s")


def run_child(tree: Path, folder: Path, n: int, out: Path) -> dict:
    overrides = [
        "mode=[metrics]",
        "features=[shapes_net]",
        "dataset=folder",
        f"dataset.root={folder}",
        f"dataset.num_images={n}",
    ]
    code = _CHILD.format(tree=str(tree), overrides=overrides, out=str(out))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tree, env=env)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
    if proc.returncode or not line:
        raise SystemExit(f"{tree}: exit {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return json.loads(line[0][7:])


def export_tree(commit: str, dest: Path) -> Path:
    if Path(commit).is_dir():  # a tree exported already
        return Path(commit).resolve()
    data = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest)
    return dest


def measure(tree: Path, folder: Path, n: int, out: Path, repeats: int) -> tuple[dict, dict]:
    """Cold (empty cache) then warm, ``repeats`` times each; the fastest of each."""
    colds, warms = [], []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        colds.append(run_child(tree, folder, n, out))
        warms.append(run_child(tree, folder, n, out))
    cold, warm = min(colds, key=lambda r: r["seconds"]), min(warms, key=lambda r: r["seconds"])
    if any(c["hit"] for c in colds) or not all(w["hit"] for w in warms):
        raise SystemExit(f"{tree}: expected cold misses and warm hits, got {colds} / {warms}")
    if len({r["pool_sum"] for r in colds + warms}) != 1:
        raise SystemExit(f"{tree}: warm features differ from cold: {colds} / {warms}")
    return cold, warm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="images in the folder (small for a dry run)")
    ap.add_argument("--folder", type=Path, default=None, help="where to export the folder (kept; default: temporary)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--baseline", default=None, help="a commit of this repository (or a directory with its tree): its warm run too"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = args.folder or tmp / "shapes"
        export_folder(folder, args.n)
        cold, warm = measure(REPO, folder, args.n, tmp / "out", args.repeats)
        rows = [("cold (empty cache; baseline)", cold), ("warm (cache filled)", warm)]
        if args.baseline:
            tree = export_tree(args.baseline, tmp / "baseline")
            rows.append((f"warm at {args.baseline}", measure(tree, folder, args.n, tmp / "out_base", args.repeats)[1]))
        print(
            f"\nreference + real_features stages, folder of {cold['n']} shapes images 64x64, shapes_net, "
            f"fastest of {args.repeats}, each run a fresh process"
        )
        print(f"{'run':<34} {'seconds':>9} {'decoded':>9}")
        for name, r in rows:
            print(f"{name:<34} {r['seconds']:>9.3f} {r['decoded']:>9d}")
        print(
            f"warm / cold = {100 * warm['seconds'] / cold['seconds']:.2f} % (goal <= 5 %); "
            f"images decoded warm: {warm['decoded']} (goal 0); features identical: yes"
        )
        if args.baseline:
            print(f"warm at {args.baseline} / warm now = {rows[2][1]['seconds'] / warm['seconds']:.1f}x")


if __name__ == "__main__":
    main()
