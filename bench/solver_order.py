"""Measured convergence orders of every deterministic solver option against a reference solution, and what the
trajectory study costs next to one default metrics run.

For each model: one schedule-mode run with ``mode.schedule.trajectory=true`` over the model's deterministic solver
options × step counts (K = 8 prompts / seeds, guidance 5, reference: the family's second-order solver at 500 steps,
checked against 250), read back from its tables: per solver the measured order with its 95 % interval over prompts,
the NFE range of the fit, the local orders, the textbook order, and whether the reference converged. The stochastic
options are listed as skipped. Timing: the trajectory stage's wall time (reference cache cold, then warm: the second
run reuses the cached reference) against one default metrics run (``python -m pipeline 'mode=[metrics]'``, the
README's main job) in the same process — the ratio is printed.

Models: ``shapes_sd`` (ε, β schedule), ``shapes_sd3`` (rectified flow), ``shapes_ddpm`` (pixel DDPM, unconditional);
``--tiny``: the random-weight tiny SDXL and FLUX.2 pipelines of tests/tiny, where orders mean nothing (random
weights): the bench only checks the study runs and says so.

Usage: python bench/solver_order.py [--models shapes_sd,shapes_sd3,shapes_ddpm] [--steps 5,10,20,40,80]
       [--spacing linspace] [--sigmas default] [--solvers euler,heun] [--reference-steps 500] [--samples 8]
       [--t-map default|smooth|round-euler] [--no-baseline] [--warm] [--tiny]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SOLVERS = {
    "diffusion": ["euler", "heun", "dpmpp_2m", "unipc", "ddim", "pndm", "euler_ancestral"],
    "flow": ["flow_euler", "flow_heun", "flow_dpmpp_2m", "flow_unipc"],
}


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def patch_t_map(kind: str) -> None:
    """Change how Euler / Heun map a σ to the model's timestep (diffusers' ``_sigma_to_t``: piecewise linear in log σ
    between the trained σ's), for the cause-finding runs: ``smooth`` = a C² cubic spline through the same knots (Euler
    and Heun — the reference too: one smooth ODE), ``round-euler`` = Euler's timesteps rounded to integers as
    DPM-Solver++ / UniPC store theirs (the Heun reference untouched)."""
    import diffusers
    import numpy as np
    from scipy.interpolate import CubicSpline

    original = diffusers.EulerDiscreteScheduler._sigma_to_t

    def smooth(self, sigma, log_sigmas):
        spline = CubicSpline(np.asarray(log_sigmas, dtype=np.float64), np.arange(len(log_sigmas), dtype=np.float64))
        x = np.clip(np.log(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10)), log_sigmas[0], log_sigmas[-1])
        return spline(x).reshape(np.shape(sigma))

    def rounded(self, sigma, log_sigmas):
        return np.round(original(self, sigma, log_sigmas))

    if kind == "smooth":
        for cls in (diffusers.EulerDiscreteScheduler, diffusers.HeunDiscreteScheduler):
            cls._sigma_to_t = smooth
    elif kind == "round-euler":
        diffusers.EulerDiscreteScheduler._sigma_to_t = rounded
    elif kind != "default":
        raise SystemExit(f"--t-map {kind!r}: expected default, smooth or round-euler")


def study(model: str, path: str | None, flow: bool, args, outputs: Path, extra=()) -> dict:
    from pipeline.config import compose_config
    from pipeline.run.runner import run_pipeline

    solvers = args.solvers.split(",") if args.solvers else SOLVERS["flow" if flow else "diffusion"]
    own = solvers[0]
    steps = [int(s) for s in args.steps.split(",")]
    overrides = [
        "mode=[schedule]",
        f"model={model}",
        f"scheduler={own}",
        f"sampler.num_inference_steps={steps[len(steps) // 2]}",
        "sampler.guidance_scale=5",
        "mode.schedule.trajectory=true",
        f"mode.schedule.solvers=[{','.join(solvers[1:])}]",
        f"mode.schedule.step_counts=[{args.steps}]",
        f"mode.schedule.reference_steps={args.reference_steps}",
        f"mode.schedule.trajectory_samples={args.samples}",
        f"paths.outputs={outputs}",
        *extra,
    ]
    if path:
        overrides.append(f"model.path={path}")
    if not flow and args.spacing and args.spacing != "none":
        overrides.append(f"sampler.timestep_spacing={args.spacing}")
    if args.sigmas != "default":
        overrides.append(f"sampler.sigmas={args.sigmas}")
    cfg = compose_config(overrides)
    run_dir = outputs / f"{model}-{time.time_ns()}"
    tic = time.perf_counter()
    out = run_pipeline(cfg, run_dir)
    wall = time.perf_counter() - tic
    assert out.status == "FINISHED", out
    return {
        "wall": wall,
        "orders": _rows(run_dir / "tables" / "trajectory_order.csv"),
        "errors": _rows(run_dir / "tables" / "trajectory_error.csv"),
        "findings": (run_dir / "tables" / "trajectory_findings.md").read_text(),
        "tags": out.tags if hasattr(out, "tags") else {},
    }


def baseline_seconds(outputs: Path) -> float:
    from pipeline.config import compose_config
    from pipeline.run.runner import run_pipeline

    cfg = compose_config(["mode=[metrics]", f"paths.outputs={outputs}"])
    tic = time.perf_counter()
    out = run_pipeline(cfg, outputs / f"metrics-{time.time_ns()}")
    assert out.status == "FINISHED"
    return time.perf_counter() - tic


def report(model: str, res: dict, meaningful: bool = True) -> None:
    print(f"\n== {model}: study wall {res['wall']:.1f} s")
    print(res["findings"].strip())
    if not meaningful:
        print("   (random weights: orders mean nothing here; the study ran)")
        return
    print(f"   {'solver':16s} {'order':>6s}  {'95% interval':>16s}  {'NFE range':>10s}  textbook  local orders")
    for o in res["orders"]:
        rng = f"{o['fit_nfe_min']}-{o['fit_nfe_max']}" if o["fit_nfe_min"] else "-"
        interval = f"[{float(o['order_ci_low']):.2f}, {float(o['order_ci_high']):.2f}]"
        print(
            f"   {o['solver']:16s} {float(o['order']):6.2f}  {interval:>16s}  {rng:>10s}  "
            f"{o['textbook_order']:>8s}  {o['local_orders']}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="shapes_sd,shapes_sd3,shapes_ddpm")
    ap.add_argument("--steps", default="5,10,20,40,80")
    ap.add_argument("--spacing", default="linspace", help="sampler.timestep_spacing of every β-schedule solver")
    ap.add_argument("--sigmas", default="default")
    ap.add_argument(
        "--solvers", default="", help="comma-separated scheduler options (default: every one of the family)"
    )
    ap.add_argument("--reference-steps", type=int, default=500)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--t-map", default="default", help="default | smooth | round-euler (see patch_t_map)")
    ap.add_argument("--override", action="append", default=[], help="an extra Hydra override of every study run")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--warm", action="store_true", help="run each study twice (the second with the cached reference)")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    outputs = Path(tempfile.mkdtemp(prefix="solver_order_"))
    patch_t_map(args.t_map)
    if args.tiny:
        from tiny import tiny_family, tiny_sdxl  # tests/tiny: the random-weight family pipelines

        for family, flow in (("sdxl", False), ("flux2", True)):
            path = tiny_sdxl(outputs / family) if family == "sdxl" else tiny_family(family, outputs / family)
            args.steps, args.reference_steps, args.samples = "2,4,8", 32, 2
            args.solvers = "flow_euler,flow_dpmpp_2m,flow_unipc" if flow else "euler,heun,dpmpp_2m,unipc,ddim"
            extra = ["dataset=shapes", "features=[shapes_net]"]  # model=hub defaults to a folder and Inception
            report(f"tiny {family}", study("hub", str(path), flow, args, outputs, extra=extra), meaningful=False)
        return
    base = None if args.no_baseline else baseline_seconds(outputs)
    if base is not None:
        print(f"baseline: one default metrics run (README's main job) {base:.1f} s")
    for model in args.models.split(","):
        flow = model == "shapes_sd3"
        res = study(model, None, flow, args, outputs, extra=args.override)
        report(model, res)
        if base is not None:
            print(f"   study / default metrics run: {res['wall'] / base:.2f}x (reference cache cold)")
        if args.warm:
            warm = study(model, None, flow, args, outputs)
            print(
                f"   again, reference cached: {warm['wall']:.1f} s" + (f" = {warm['wall'] / base:.2f}x" if base else "")
            )


if __name__ == "__main__":
    main()
