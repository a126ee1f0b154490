"""Figures for the metrics stage: (3) warm reference cache vs cold, (4) peak memory at N = 10 000 vs N = 1 000.

(3) Baseline: the reference stage with an empty cache (features extracted); measured: the same stage with the
    cache filled (features loaded). Extractor: the FID Inception-v3 with random weights (as slow as the real
    one) on `--n-ref` shapes images.
(4) Peak RSS of a whole metrics run (tiny random unconditional pipeline, 1 sampling step, shapes_net features,
    each N in its own process) at N = 1 000 and N = 10 000. The generated images stream, so the only growth
    allowed is the stored feature matrices (fake pool + logits, float32, plus one concatenated copy); the
    ratio is printed after subtracting that growth.

Usage: python bench/metrics_stage.py [--n-ref 500] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_CHILD = r"""
import json, resource, sys
sys.path.insert(0, {tests!r})
from conftest import compose_cfg
from pipeline.runner import run_pipeline
cfg = compose_cfg({overrides!r}, {out!r})
run_pipeline(cfg, {out!r} + "/run")
print("RESULT", json.dumps({{"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def cache_figure(n_ref: int) -> None:
    import torch

    from conftest import compose_cfg
    from pipeline.context import RunContext
    from pipeline.features.inception import FIDInceptionV3
    from pipeline.runner import _run_stage

    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp) / "inception_random.pth"
        torch.save(FIDInceptionV3().state_dict(), w)
        cfg = compose_cfg(["mode=[metrics]", "features=[inception]", f"features.inception.weights_path={w}",
                           f"dataset.num_images={n_ref}"], Path(tmp) / "out")
        times = []
        for _ in range(2):  # cold, then warm
            ctx = RunContext(cfg, Path(tmp) / "run")
            ctx.device = torch.device("cpu")
            tic = time.perf_counter()
            _run_stage("real_features", ctx, set())
            times.append(time.perf_counter() - tic)
    print(f"(3) reference stage, {n_ref} images, Inception: cold {times[0]:.1f} s, warm {times[1]:.2f} s "
          f"-> warm = {100 * times[1] / times[0]:.1f} % of cold")


def memory_figure() -> None:
    from tiny import tiny_ddpm

    from pipeline.zoo.shapes_net import ShapesNet

    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_ddpm(Path(tmp) / "ddpm")
        net = Path(tmp) / "net"
        ShapesNet().save_pretrained(net)
        peaks = {}
        for n in (1000, 10000):
            out = str(Path(tmp) / f"out{n}")
            overrides = ["model=hub", "features=[shapes_net]", "dataset=shapes", f"model.path={model}", "mode=[metrics]", f"features.shapes_net.model={net}",
                         f"mode.metrics.num_samples={n}", "dataset.num_images=1000", "sampler.num_inference_steps=1",
                         "sampler.batch_size=250", "mode.metrics.kid_subsets=10"]
            code = _CHILD.format(tests=str(REPO / "tests"), overrides=overrides, out=out)
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
            if not line:
                raise SystemExit(proc.stdout[-2000:] + proc.stderr[-4000:])
            peaks[n] = json.loads(line[0][7:])["maxrss_kb"] * 1024
        dims = 128 + 400  # shapes_net pool + joint-label logits
        growth = (10000 - 1000) * dims * 4 * 2  # float32, stored + one concatenated copy
        adjusted = peaks[10000] - growth
        print(f"(4) peak RSS: N=1000 {peaks[1000] / 2**20:.0f} MiB, N=10000 {peaks[10000] / 2**20:.0f} MiB; "
              f"feature matrices grow by {growth / 2**20:.0f} MiB; ratio without them {adjusted / peaks[1000]:.3f}x "
              f"(raw {peaks[10000] / peaks[1000]:.3f}x)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-ref", type=int, default=500)
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    cache_figure(args.n_ref)
    if not args.skip_memory:
        memory_figure()


if __name__ == "__main__":
    main()
