"""Figures for the metrics stage: (3) warm reference cache vs cold, (4) peak memory at N = 10 000 vs N = 1 000.

(3) Baseline: the reference stage with an empty cache (features extracted); measured: the same stage with the
    cache filled (features loaded). Extractor: the FID Inception-v3 with random weights (as slow as the real
    one) on `--n-ref` shapes images.
(4) Peak RSS of a whole metrics run (tiny random unconditional pipeline, 1 sampling step, shapes_net features,
    each N in its own process) at N = 1 000 and N = 10 000. The generated images stream, so the only growth
    allowed is the stored feature matrices (fake pool + logits, float32, plus one concatenated copy); the
    ratio is printed after subtracting that growth.

(5) ``--additions``: what the intervals, FD∞, Vendi, per-prompt table and worst-prompts figure cost. On the
    default metrics run (shapes_sd, N = 256, in-process): the metrics stage's wall time including generation,
    split into generation + features, the intervals (the interval functions timed where the stage calls them)
    and the rest; goal: intervals ≤ 20 % of the stage. On synthetic features, N = 10 000, d = 2048: the interval
    cost (FD subsampling, KID subsampling, bootstrap of precision/density) and FD∞. CMMD and Vendi at N = 10 000
    on synthetic 768-d embeddings: time and peak RSS (each in its own process).

Usage: python bench/metrics_stage.py [--n-ref 500] [--skip-memory] [--additions-only]
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
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_CHILD = r"""
import json, resource, sys
sys.path.insert(0, {tests!r})
from conftest import compose_cfg
from pipeline.run.runner import run_pipeline
cfg = compose_cfg({overrides!r}, {out!r})
run_pipeline(cfg, {out!r} + "/run")
print("RESULT", json.dumps({{"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def cache_figure(n_ref: int) -> None:
    import torch
    from conftest import compose_cfg

    from pipeline.core.context import RunContext
    from pipeline.features.inception import FIDInceptionV3
    from pipeline.run.runner import _run_stage

    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp) / "inception_random.pth"
        torch.save(FIDInceptionV3().state_dict(), w)
        cfg = compose_cfg(
            [
                "mode=[metrics]",
                "features=[inception]",
                f"features.inception.weights_path={w}",
                f"dataset.num_images={n_ref}",
            ],
            Path(tmp) / "out",
        )
        times = []
        for _ in range(2):  # cold, then warm
            ctx = RunContext(cfg, Path(tmp) / "run")
            ctx.device = torch.device("cpu")
            tic = time.perf_counter()
            _run_stage("real_features", ctx, set())
            times.append(time.perf_counter() - tic)
    print(
        f"(3) reference stage, {n_ref} images, Inception: cold {times[0]:.1f} s, warm {times[1]:.2f} s "
        f"-> warm = {100 * times[1] / times[0]:.1f} % of cold"
    )


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
            overrides = [
                "model=hub",
                "features=[shapes_net]",
                "dataset=shapes",
                f"model.path={model}",
                "mode=[metrics]",
                f"features.shapes_net.model={net}",
                f"mode.metrics.num_samples={n}",
                "dataset.num_images=1000",
                "sampler.num_inference_steps=1",
                "sampler.batch_size=250",
                "mode.metrics.kid_subsets=10",
            ]
            code = _CHILD.format(tests=str(REPO / "tests"), overrides=overrides, out=out)
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
            if not line:
                raise SystemExit(proc.stdout[-2000:] + proc.stderr[-4000:])
            peaks[n] = json.loads(line[0][7:])["maxrss_kb"] * 1024
        dims = 128 + 400  # shapes_net pool + joint-label logits
        growth = (10000 - 1000) * dims * 4 * 2  # float32, stored + one concatenated copy
        adjusted = peaks[10000] - growth
        print(
            f"(4) peak RSS: N=1000 {peaks[1000] / 2**20:.0f} MiB, N=10000 {peaks[10000] / 2**20:.0f} MiB; "
            f"feature matrices grow by {growth / 2**20:.0f} MiB; ratio without them {adjusted / peaks[1000]:.3f}x "
            f"(raw {peaks[10000] / peaks[1000]:.3f}x)"
        )


_TIMED = ("fd_subsample_sd", "kernel_subsample_sd", "bootstrap_interval")


def additions_default_run() -> None:
    """Split of the default metrics run's metrics stage: generation + features / intervals / the rest."""
    from conftest import compose_cfg

    import pipeline.modes.metrics.stage as st
    from pipeline.run.runner import run_pipeline

    spent = {name: 0.0 for name in (*_TIMED, "fd_inf", "_per_prompt_outputs")}

    def timed(name, fn):
        def wrapper(*a, **k):
            tic = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - tic

        return wrapper

    for name in spent:
        setattr(st, name, timed(name, getattr(st, name)))
    wall = {}
    from pipeline.core.registry import STAGES, load_stages

    load_stages()
    original = STAGES["metrics"].fn

    def stage_timed(ctx, cfg):
        tic = time.perf_counter()
        try:
            return original(ctx, cfg)
        finally:
            wall["stage"] = time.perf_counter() - tic

    import dataclasses

    STAGES["metrics"] = dataclasses.replace(STAGES["metrics"], fn=stage_timed)
    with tempfile.TemporaryDirectory() as tmp:
        out = run_pipeline(compose_cfg(["mode=[metrics]"], Path(tmp)), Path(tmp) / "run")
    r = out.results
    gen = r["metrics/generation_seconds"] + r["metrics/fake_features_seconds"]
    ci = sum(spent[n] for n in _TIMED)
    rest = wall["stage"] - gen - ci - spent["fd_inf"] - spent["_per_prompt_outputs"]
    print(
        f"(5) default metrics run (shapes_sd, N = 256, k = 4 samples per prompt): metrics stage {wall['stage']:.1f} s"
    )
    print(
        f"    generation + features {gen:.1f} s, intervals {ci:.2f} s = {ci / wall['stage']:.1%} of the stage "
        f"(goal <= 20 %), per-prompt table + worst-prompts figure {spent['_per_prompt_outputs']:.2f} s, "
        f"FD-inf {spent['fd_inf']:.2f} s (skipped below N = 2000), rest {rest:.1f} s"
    )
    print("    interval functions: " + ", ".join(f"{n} {spent[n]:.2f} s" for n in _TIMED))


def additions_synthetic(n: int = 10_000, d: int = 2048) -> None:
    import numpy as np
    import torch

    from pipeline.metrics import FeatureStats, frechet_distance, precision_recall_density_coverage
    from pipeline.metrics.intervals import bootstrap_interval, fd_inf, fd_subsample_sd, kernel_subsample_sd

    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32))
    fake = torch.from_numpy((rng.normal(size=(n, d)) + 0.05).astype(np.float32))
    ref = FeatureStats.from_features(real).reference()
    t = {}
    tic = time.perf_counter()
    frechet_distance(FeatureStats.from_features(fake), ref)
    t["FD point"] = time.perf_counter() - tic
    tic = time.perf_counter()
    fd_subsample_sd(fake, ref, 20)
    t["FD interval (20 subsets)"] = time.perf_counter() - tic
    tic = time.perf_counter()
    kernel_subsample_sd(real, fake, "kid", 20)
    t["KID interval (20 subsets)"] = time.perf_counter() - tic
    per_fake: dict = {}
    tic = time.perf_counter()
    precision_recall_density_coverage(real, fake, per_fake=per_fake)
    t["PR + DC point"] = time.perf_counter() - tic
    tic = time.perf_counter()
    bootstrap_interval(per_fake["precision"])
    bootstrap_interval(per_fake["density"])
    t["precision + density bootstrap (200)"] = time.perf_counter() - tic
    tic = time.perf_counter()
    fd_inf(fake, ref)
    t["FD-inf (8 nested sizes)"] = time.perf_counter() - tic
    print(f"(5) synthetic features N = {n}, d = {d}:")
    for k, v in t.items():
        print(f"    {k:<38s} {v:7.1f} s")
    extra = t["FD interval (20 subsets)"] + t["KID interval (20 subsets)"] + t["precision + density bootstrap (200)"]
    print(f"    intervals together {extra:.1f} s")


_CMMD_CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
sys.path.insert(0, {repo!r})
from pipeline.metrics.cmmd import cmmd
from pipeline.metrics.vendi import vendi_score
rng = np.random.default_rng(0)
def unit(x): return x / np.linalg.norm(x, axis=1, keepdims=True)
x = torch.from_numpy(unit(rng.normal(size=({n}, 768))).astype(np.float32))
y = torch.from_numpy(unit(rng.normal(size=({n}, 768)) + 0.02).astype(np.float32))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tic = time.perf_counter()
value = {call}
print("RESULT", json.dumps({{"seconds": time.perf_counter() - tic, "value": value,
      "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "before_kb": before}}))
"""


def additions_cmmd_vendi(n: int = 10_000) -> None:
    print(f"(5) CMMD and Vendi at N = {n}, synthetic 768-d unit embeddings (each its own process):")
    for label, call in (("CMMD (chunked kernel sums)", "cmmd(x, y)"), ("Vendi (768 x 768 Gram)", "vendi_score(y)")):
        code = _CMMD_CHILD.format(repo=str(REPO), n=n, call=call)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        line = next((l for l in res.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(res.stderr[-2000:])
        r = json.loads(line[7:])
        print(
            f"    {label:<30s} {r['seconds']:6.1f} s, peak RSS {r['maxrss_kb'] / 1024:.0f} MiB "
            f"({r['before_kb'] / 1024:.0f} before the call), value {r['value']:.4g}"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-ref", type=int, default=500)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--additions-only", action="store_true", help="only (5): intervals, FD-inf, CMMD, Vendi")
    args = ap.parse_args()
    if not args.additions_only:
        cache_figure(args.n_ref)
        if not args.skip_memory:
            memory_figure()
    additions_default_run()
    additions_synthetic()
    additions_cmmd_vendi()


if __name__ == "__main__":
    main()
