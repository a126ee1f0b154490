"""Figures for the metrics library at scale: time and peak RSS of precision/recall, density/coverage and KID on
2048-d features, against the reference implementations, and ours alone at N = 50 000 (bounded memory).

Features: synthetic Gaussian, real ~ N(0, I) and fake ~ N(0.1·1, I) (a shifted set), float32, written
once to ``.npy`` files in a temporary folder (row chunks, never whole in the parent).

(1) N = ``--n`` (default 10 000), d = ``--dim`` (2048). Each implementation runs in its own child process
(``subprocess``), which loads the features and reports its wall time for the metric call and its peak RSS
(``ru_maxrss``, the whole child: interpreter, torch, features, the metric), so no run sees another's memory.
  - ours: ``pipeline.metrics.precision_recall`` (k = 3), ``density_coverage`` (k = 5), both in one call
    (``pipeline.metrics.prdc.precision_recall_density_coverage``: shared distance passes, the same numbers),
    ``kernel_distance`` (100 subsets × 1000, seed 2020) and FID (``FeatureStats.from_features`` of each set, then
    ``frechet_distance``), features as read-only memmaps (``np.load(..., mmap_mode="r")``), float64.
  - baseline ``prdc``: ``compute_prdc(real, fake, nearest_k=5)`` (numpy float32 arrays; sklearn distances): its D/C
    is our D/C's reference; it computes P/R/D/C together from three N × N float32 distance matrices.
  - baseline torch-fidelity: ``metric_prc.prc_features_to_metric(fake, real)`` (its defaults: k = 3,
    ``save_cpu_ram=False``: three N × N float32 ``cdist`` matrices) for P/R, and
    ``metric_kid.kid_features_to_metric(real, fake)`` (100 × 1000, ``rng_seed`` 2020; its first input is drawn
    first, as our ``feats_real``) on float32 tensors, as its feature extractors give them (its KID then runs in
    float32 numpy); once more on float64 tensors for an exact agreement check.
Printed: a table (time, peak RSS, values), ours / baseline ratios, and the agreement: P/R equal to torch-fidelity's,
D/C equal to prdc's (up to distance ties, which float32 distances make more likely: counted), KID relative difference.

(2) N = ``--n-large`` (50 000), ours alone (the baselines hold three 50 000² float32 distance matrices, 10 GB each,
which do not fit in this machine's 24 GiB): FID, KID, PR, DC and PR + DC in one call, each in its own child:
time and peak RSS (goal ≤ 4 GiB).

``--device cuda``: the same metrics of ours on CUDA at each N (one child; features read from the memmaps), the
total time of FID + KID + PR + DC (goal at 50 000: < 30 s), peak GPU memory and the agreement with the CPU
results (PR/DC equal, FID/KID to 1e-6 relative).

Usage:
    python bench/prdc_scale.py                          # (1) at 10 000 and (2) at 50 000, CPU (~40 min on 2 cores)
    python bench/prdc_scale.py --skip-50k               # (1) only
    python bench/prdc_scale.py --n 2000 --n-large 5000  # dry run
    python bench/prdc_scale.py --device cuda            # + the CUDA runs and their agreement (GPU machine)
Baselines: ``pip install prdc torch-fidelity`` (not project dependencies; a missing one is reported and skipped).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED_KID = 2020  # torch-fidelity's default rng_seed
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
SHIFT, SCALE = 0.1, 1.0


# ------------------------------------------------------------------------------------------------ features


def write_features(path: Path, n: int, d: int, seed: int, shift: float, scale: float, chunk: int = 4096) -> None:
    """An (n, d) float32 .npy of N(shift, scale² I) rows, written chunk by chunk."""
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        out[start:stop] = rng.standard_normal((stop - start, d), dtype=np.float32) * scale + shift
    out.flush()
    del out


# ---------------------------------------------------------------------------------------------- the child


def _torch_fidelity():
    """torch-fidelity's ``prc_features_to_metric`` and ``kid_features_to_metric``.

    Its package ``__init__`` imports torchvision (for its datasets and image extractors), which this project does
    not install; these two feature-level functions are plain torch / numpy. Where torchvision is missing, only
    their two modules are loaded (the package ``__init__`` skipped, and ``torch_fidelity.utils``, the only
    torchvision importer they reach, replaced by a placeholder whose names they do not call)."""
    try:
        from torch_fidelity.metric_kid import kid_features_to_metric
        from torch_fidelity.metric_prc import prc_features_to_metric

        return prc_features_to_metric, kid_features_to_metric
    except ModuleNotFoundError as err:
        if err.name != "torchvision":
            raise
    for name in [m for m in sys.modules if m == "torch_fidelity" or m.startswith("torch_fidelity.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("torch_fidelity")
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = pkg
    utils = types.ModuleType("torch_fidelity.utils")
    for name in (
        "create_feature_extractor",
        "extract_featuresdict_from_input_id_cached",
        "resolve_feature_extractor",
        "resolve_feature_layer_for_metric",
    ):
        setattr(utils, name, None)
    sys.modules["torch_fidelity.utils"] = utils
    prc = importlib.import_module("torch_fidelity.metric_prc")
    kid = importlib.import_module("torch_fidelity.metric_kid")
    return prc.prc_features_to_metric, kid.kid_features_to_metric


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_job(job: dict) -> dict:
    """One implementation × metric on the saved features; returns values, seconds and memory figures."""
    import torch

    torch.set_num_threads(job["threads"])
    impl, metric, device = job["impl"], job["metric"], job.get("device", "cpu")
    real_path, fake_path = job["real"], job["fake"]
    if impl == "ours":
        from pipeline.metrics import FeatureStats, density_coverage, frechet_distance, kernel_distance, precision_recall
        from pipeline.metrics.prdc import precision_recall_density_coverage

        real = np.load(real_path, mmap_mode="r")
        fake = np.load(fake_path, mmap_mode="r")
        dev = None if device == "cpu" else device

        def fid():
            return {
                "fid": frechet_distance(
                    FeatureStats.from_features(real, device=dev), FeatureStats.from_features(fake, device=dev)
                )
            }

        def kid():
            m, s = kernel_distance(
                real, fake, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=SEED_KID, device=dev
            )
            return {"kid_mean": m, "kid_std": s}

        def pr():
            p, r = precision_recall(real, fake, k=3, device=dev)
            return {"precision": p, "recall": r}

        def dc():
            d, c = density_coverage(real, fake, k=5, device=dev)
            return {"density": d, "coverage": c}

        def prdc():
            p, r, d, c = precision_recall_density_coverage(real, fake, k_pr=3, k_dc=5, device=dev)
            return {"precision": p, "recall": r, "density": d, "coverage": c}

        calls = {"fid": fid, "kid": kid, "pr": pr, "dc": dc, "prdc": prdc}
        fns = [calls[m] for m in metric.split("+")]
    elif impl == "prdc":
        from prdc import compute_prdc

        real, fake = np.load(real_path), np.load(fake_path)

        def prdc():
            return {k: float(v) for k, v in compute_prdc(real, fake, nearest_k=5).items()}

        fns = [prdc]
    elif impl in ("torch-fidelity", "torch-fidelity-f64"):
        prc_fn, kid_fn = _torch_fidelity()
        real, fake = torch.from_numpy(np.load(real_path)), torch.from_numpy(np.load(fake_path))
        if impl == "torch-fidelity-f64":
            real, fake = real.double(), fake.double()

        def pr():
            return {
                k: v
                for k, v in prc_fn(fake, real, prc_neighborhood=3, verbose=False).items()
                if k in ("precision", "recall")
            }

        def kid():
            out = kid_fn(
                real, fake, kid_subsets=KID_SUBSETS, kid_subset_size=KID_SUBSET_SIZE, rng_seed=SEED_KID, verbose=False
            )
            return {"kid_mean": out["kernel_inception_distance_mean"], "kid_std": out["kernel_inception_distance_std"]}

        fns = [pr] if metric == "pr" else [kid]
    else:
        raise ValueError(f"Expected impl to be one of ours, prdc, torch-fidelity(-f64), got {impl!r}")

    cuda = device.startswith("cuda")
    if cuda:
        torch.zeros(1, device=device)  # context start-up outside the timing
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mib()
    values, seconds, by_fn = {}, {}, {}
    for fn in fns:
        if cuda:
            torch.cuda.synchronize()
        tic = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        seconds[fn.__name__] = time.perf_counter() - tic
        by_fn[fn.__name__] = out
        values.update({k: v for k, v in out.items() if k not in values})  # the first metric to give a key
    return {
        "values": values,
        "by_fn": by_fn,
        "seconds": seconds,
        "total_s": sum(seconds.values()),
        "rss_before_mib": rss_before,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def child(job: dict) -> dict | None:
    """Run ``job`` in a fresh Python process; None (and the error printed) when it failed."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"  !! {job['impl']} {job['metric']} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        return None
    return json.loads(lines[-1][len("RESULT ") :])


# ------------------------------------------------------------------------------------------------ report


def fmt_values(values: dict) -> str:
    return ", ".join(f"{k} {v:.6g}" for k, v in values.items())


def row(label: str, res: dict | None) -> None:
    if res is None:
        print(f"  {label:<44} (failed)")
        return
    gpu = f", GPU peak {res['gpu_peak_mib']:.0f} MiB" if res.get("gpu_peak_mib") is not None else ""
    print(
        f"  {label:<44} {res['total_s']:8.1f} s  {res['peak_rss_mib']:7.0f} MiB  "
        f"({res['rss_before_mib']:.0f} before the call{gpu})  {fmt_values(res['values'])}"
    )


def ratio(label: str, ours: dict | None, base: dict | None, base_name: str) -> None:
    if ours is None or base is None:
        return
    print(
        f"  {label:<28} time {ours['total_s'] / base['total_s']:.2f}x, peak RSS "
        f"{ours['peak_rss_mib'] / base['peak_rss_mib']:.2f}x of {base_name}"
    )


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def agreement_counts(ours: dict, theirs: dict, keys: tuple[str, ...], n: int, scale: dict) -> str:
    """'equal' or the number of samples (memberships) on which two count-based fractions differ."""
    parts = []
    for k in keys:
        diff = round(abs(ours[k] - theirs[k]) * scale.get(k, n))
        parts.append(f"{k} {'equal' if diff == 0 else f'differs on {diff} of {scale.get(k, n)}'}")
    return ", ".join(parts)


def cuda_agreement(cpu: dict, gpu: dict) -> str:
    parts = []
    for k in ("precision", "recall", "density", "coverage"):
        if k in cpu and k in gpu:
            parts.append(f"{k} {'equal' if cpu[k] == gpu[k] else f'Δ {abs(cpu[k] - gpu[k]):.2g}'}")
    for k in ("fid", "kid_mean", "kid_std"):
        if k in cpu and k in gpu:
            parts.append(f"{k} rel {rel(gpu[k], cpu[k]):.1e}")
    return ", ".join(parts)


def have(module: str, pip_name: str) -> bool:
    if importlib.util.find_spec(module) is None:
        print(f"  not installed: pip install {pip_name}   (baseline skipped)")
        return False
    return True


OURS = {
    "pr": "ours precision_recall (k=3)",
    "dc": "ours density_coverage (k=5)",
    "prdc": "ours PR + DC in one call (k=3, k=5)",
    "kid": "ours kernel_distance (100 x 1000)",
    "fid": "ours FID (FeatureStats.from_features)",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="samples per set for the comparison with the baselines")
    ap.add_argument("--n-large", type=int, default=50_000, help="samples per set for ours alone")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--skip-50k", action="store_true", help="skip the --n-large part")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda to add the CUDA runs of ours")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(run_job(json.loads(args.child))), flush=True)
        return
    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(f"--device {args.device}: torch.cuda.is_available() is False; the CUDA runs are skipped")
        cuda = False
    print(
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; "
        f"d = {args.dim}; real ~ N(0, I), fake ~ N({SHIFT}·1, {SCALE:g}² I), float32 .npy; each row a child process "
        "(time of the metric call; peak RSS of the whole child)",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        # (1) N = --n: ours vs the baselines
        n = args.n
        base = features(Path(tmp), n, args.dim, args.threads)
        print(f"\n(1) N = {n} real + {n} fake", flush=True)
        res = {("ours", m): child({**base, "impl": "ours", "metric": m}) for m in OURS}
        if have("prdc", "prdc"):
            res[("prdc", "prdc")] = child({**base, "impl": "prdc", "metric": "prdc"})
        if have("torch_fidelity", "torch-fidelity"):
            for impl, metric in (("torch-fidelity", "pr"), ("torch-fidelity", "kid"), ("torch-fidelity-f64", "kid")):
                res[(impl, metric)] = child({**base, "impl": impl, "metric": metric})
        labels = {
            **{("ours", m): label for m, label in OURS.items()},
            ("prdc", "prdc"): "prdc compute_prdc (k=5, P/R/D/C)",
            ("torch-fidelity", "pr"): "torch-fidelity PRC (k=3, float32)",
            ("torch-fidelity", "kid"): "torch-fidelity KID (float32 features)",
            ("torch-fidelity-f64", "kid"): "torch-fidelity KID (float64 features)",
        }
        print(f"  {'':<44} {'time':>10}  {'peak RSS':>11}")
        for key, label in labels.items():
            if key in res:
                row(label, res[key])
        get = res.get
        print("  ratios (ours / baseline):")
        ratio("PR vs torch-fidelity PRC", get(("ours", "pr")), get(("torch-fidelity", "pr")), "torch-fidelity")
        ratio("DC vs prdc (P/R/D/C)", get(("ours", "dc")), get(("prdc", "prdc")), "prdc")
        ratio("PR + DC, one call, vs prdc", get(("ours", "prdc")), get(("prdc", "prdc")), "prdc")
        ratio(
            "KID vs torch-fidelity KID",
            get(("ours", "kid")),
            get(("torch-fidelity", "kid")),
            "torch-fidelity (float32)",
        )
        print("  agreement:")
        ours_pr, ours_dc, ours_kid = get(("ours", "pr")), get(("ours", "dc")), get(("ours", "kid"))
        if ours_pr and get(("torch-fidelity", "pr")):
            print(
                "    P/R vs torch-fidelity: "
                + agreement_counts(
                    ours_pr["values"], res[("torch-fidelity", "pr")]["values"], ("precision", "recall"), n, {}
                )
            )
        if ours_dc and get(("prdc", "prdc")):
            print(
                "    D/C vs prdc: "
                + agreement_counts(
                    ours_dc["values"], res[("prdc", "prdc")]["values"], ("density", "coverage"), n, {"density": 5 * n}
                )
                + "  (density: ball memberships, of k·M)"
            )
        for key, what in ((("torch-fidelity", "kid"), "float32"), (("torch-fidelity-f64", "kid"), "float64")):
            if ours_kid and get(key):
                t = res[key]["values"]
                print(
                    f"    KID vs torch-fidelity ({what} features, same subsets): mean rel "
                    f"{rel(ours_kid['values']['kid_mean'], t['kid_mean']):.1e}, std rel "
                    f"{rel(ours_kid['values']['kid_std'], t['kid_std']):.1e}"
                )
        one_call_check(res)
        if cuda:
            report_cuda(base, res, n)

        # (2) N = --n-large: ours alone
        if args.skip_50k:
            return
        n = args.n_large
        gb = 3 * n * n * 4 / 1e9
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        print(
            f"\n(2) N = {n} real + {n} fake, ours alone: prdc and torch-fidelity (default save_cpu_ram=False) hold "
            f"three {n}x{n} float32 distance matrices ({gb:.0f} GB), which do not fit in this machine's "
            f"{ram:.0f} GiB; features as memmaps",
            flush=True,
        )
        for path in (base["real"], base["fake"]):
            os.remove(path)
        base = features(Path(tmp), n, args.dim, args.threads)
        res = {}
        for metric in ("fid", "kid", "pr", "dc", "prdc"):
            res[("ours", metric)] = child({**base, "impl": "ours", "metric": metric})
            row(OURS[metric], res[("ours", metric)])
        done = [r for r in res.values() if r is not None]
        if done:
            peak = max(r["peak_rss_mib"] for r in done)
            sep = sum(r["total_s"] for (_, m), r in res.items() if r is not None and m != "prdc")
            print(
                f"  largest peak RSS {peak:.0f} MiB = {peak / 4096:.2f}x the 4 GiB goal; FID + KID + PR + DC "
                f"{sep:.0f} s",
                end="",
            )
            if all(get_ok(res, m) for m in ("fid", "kid", "prdc")):
                one = sum(res[("ours", m)]["total_s"] for m in ("fid", "kid", "prdc"))
                print(f", with PR + DC in one call {one:.0f} s", end="")
            print()
        one_call_check(res)
        if cuda:
            report_cuda(base, res, n, goal_s=30.0 if n >= 50_000 else None)


def get_ok(res: dict, metric: str) -> bool:
    return res.get(("ours", metric)) is not None


def features(tmp: Path, n: int, dim: int, threads: int) -> dict:
    real, fake = tmp / f"real_{n}.npy", tmp / f"fake_{n}.npy"
    write_features(real, n, dim, seed=0, shift=0.0, scale=1.0)
    write_features(fake, n, dim, seed=1, shift=SHIFT, scale=SCALE)
    return {"real": str(real), "fake": str(fake), "threads": threads}


def one_call_check(res: dict) -> None:
    """precision_recall_density_coverage must give precision_recall's and density_coverage's numbers."""
    if all(get_ok(res, m) for m in ("pr", "dc", "prdc")):
        sep = {**res[("ours", "pr")]["values"], **res[("ours", "dc")]["values"]}
        same = sep == res[("ours", "prdc")]["values"]
        print(
            f"    PR + DC in one call vs the two calls: {'identical' if same else 'DIFFERENT: ' + str(sep)}; "
            f"time {res[('ours', 'prdc')]['total_s'] / (res[('ours', 'pr')]['total_s'] + res[('ours', 'dc')]['total_s']):.2f}x "
            "of the two calls"
        )


def report_cuda(base: dict, cpu_res: dict, n: int, goal_s: float | None = None) -> None:
    """Ours on CUDA (FID, KID, PR, DC and the one-call PR + DC in one child) and the agreement with the CPU
    children's values."""
    gpu = child({**base, "impl": "ours", "metric": "fid+kid+pr+dc+prdc", "device": "cuda"})
    print(f"  CUDA, N = {n}:")
    row("ours FID, KID, PR, DC, PR + DC on cuda", gpu)
    if gpu is None:
        return
    sec = gpu["seconds"]
    four = sec["fid"] + sec["kid"] + sec["pr"] + sec["dc"]
    print(
        "    per metric: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in sec.items())
        + f"; FID + KID + PR + DC {four:.1f} s"
        + (f" (goal < {goal_s:.0f} s)" if goal_s else "")
        + f", with PR + DC in one call {sec['fid'] + sec['kid'] + sec['prdc']:.1f} s"
    )
    one = gpu["by_fn"]["prdc"]
    sep = {**gpu["by_fn"]["pr"], **gpu["by_fn"]["dc"]}
    print(f"    one call vs the two calls on cuda: {'identical' if one == sep else 'DIFFERENT'}")
    cpu_values = {}
    for m in ("fid", "kid", "pr", "dc"):
        if cpu_res.get(("ours", m)):
            cpu_values.update(cpu_res[("ours", m)]["values"])
    print("    CUDA vs CPU: " + cuda_agreement(cpu_values, gpu["values"]))


if __name__ == "__main__":
    main()
