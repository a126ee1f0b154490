"""OOD detection on the shapes model (issue 6): AUROC / FPR95 per score against unseen colours (and unseen shapes,
uniform noise), which score wins, and its ratio to the baseline (the per-dimension z-score norm).

    python bench/latent_ood.py [--model shapes_sd] [--fit 200] [--eval 100] [--shapes] [--threads 2] [key=value ...]

Runs ``mode=[latent] mode.latent.parts=[ood]`` through the real pipeline (outputs in a temporary folder unless
``--outputs``); trailing ``key=value`` are Hydra overrides (e.g. ``mode.latent.recon_timesteps=[100,300]``).
Bar (issue 6): AUROC >= 0.95 for the best score against the unseen-colour set.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

SCORES = ("zscore", "mahalanobis", "recon", "vae")
BAR = 0.95


def run(model: str, name: str, extra: list[str], outputs: pathlib.Path) -> dict[str, float]:
    from pipeline.config import compose_config
    from pipeline.run.runner import run_pipeline

    cfg = compose_config(
        [
            "model=hub",
            "features=[shapes_net]",
            "dataset=shapes",
            f"model.path={model}",
            "mode=[latent]",
            "mode.latent.parts=[ood]",
            f"paths.outputs={outputs}",
            f"tracking.run_name=bench_latent_ood_{name}",
            *extra,
        ]
    )
    tic = time.perf_counter()
    out = run_pipeline(cfg, outputs / "runs" / name)
    print(f"[{name}: {time.perf_counter() - tic:.0f} s, run dir {outputs / 'runs' / name}]")
    return out.results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes_sd", help="zoo name or model directory")
    ap.add_argument("--fit", type=int, default=200, help="in-distribution images the scores are fitted on")
    ap.add_argument("--eval", type=int, default=100, help="held-out in-distribution images = OOD images per set")
    ap.add_argument("--shapes", action="store_true", help="also the unseen-shapes set (diamond, cross)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--outputs", default=None, help="outputs folder (default: a temporary one)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, key=value")
    args = ap.parse_args()

    import torch

    from pipeline import zoo

    torch.set_num_threads(args.threads)
    model = args.model if pathlib.Path(args.model).is_dir() else str(zoo.locate(args.model))
    outputs = pathlib.Path(args.outputs or tempfile.mkdtemp(prefix="latent_ood_"))
    common = [f"mode.latent.ood_fit_samples={args.fit}", f"mode.latent.ood_eval_samples={args.eval}", *args.overrides]
    sets = {"unseen_colours": run(model, "unseen_colours", common, outputs)}
    if args.shapes:
        sets["unseen_shapes"] = run(
            model,
            "unseen_shapes",
            [
                *common,
                "mode.latent.ood_noise=false",
                "mode.latent.ood_dataset.name=shapes_unseen_shapes",
                "mode.latent.ood_dataset.shapes=[diamond,cross]",
                "mode.latent.ood_dataset.colours=[red,green,blue,yellow]",
            ],
            outputs,
        )

    r = sets["unseen_colours"]
    print(f"\nOOD detection on {args.model}: fit {args.fit}, {args.eval} held-out vs {args.eval} OOD images")
    print(f"{'score':<14}" + "".join(f"{name + ' AUROC':>24}{'FPR95':>8}" for name in [*sets, "noise"]))
    scores = [s for s in SCORES if f"latent/ood_auroc_{s}" in r]  # vae: latent pipelines only
    for s in scores:
        row = f"{s:<14}"
        for res in sets.values():
            row += f"{res[f'latent/ood_auroc_{s}']:>24.3f}{res[f'latent/ood_fpr95_{s}']:>8.3f}"
        if f"latent/ood_auroc_{s}_noise" in r:
            row += f"{r[f'latent/ood_auroc_{s}_noise']:>24.3f}{r[f'latent/ood_fpr95_{s}_noise']:>8.3f}"
        print(row)
    best = max(scores, key=lambda s: r[f"latent/ood_auroc_{s}"])
    base = r["latent/ood_auroc_zscore"]
    au = r[f"latent/ood_auroc_{best}"]
    print(f"\nwinner (unseen colours): {best}, AUROC {au:.3f} (bar >= {BAR}: {'PASS' if au >= BAR else 'FAIL'})")
    print(
        f"baseline zscore AUROC {base:.3f}: ratio best / baseline = {au / max(base, 1e-12):.2f}; "
        f"error ratio (1 - best) / (1 - baseline) = {(1 - au) / max(1 - base, 1e-12):.2f}"
    )


if __name__ == "__main__":
    main()
