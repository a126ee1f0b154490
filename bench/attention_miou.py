"""Attention mIoU on shapes_sd (the issue's bar: ≥ 0.5) against two named baselines on the same generated images.

Runs the attention mode (N dataset prompts, 20 DDIM steps, guidance 5, snapshots at steps 2/10/18) and reads
``attention/miou`` (shape words, τ = 0.4). Baselines, from the run's own images and masks:

- *side-only map*: a map that knows only on which half the object is (the whole half lit) — what the maps of
  the first, ungrounded shapes_sd amounted to (README, *Attention mode*); IoU = |mask| / |half|;
- *swapped word*: the other object's shape word (``attention/miou_swapped``, two-object captions).

Usage: python bench/attention_miou.py [--prompts 100] [--model DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--model", default=None, help="a StableDiffusionPipeline dir (default: the built-in shapes_sd)")
    args = ap.parse_args()
    from pipeline.config import compose_config
    from pipeline.data.shapes import parse_caption
    from pipeline.runner import run_pipeline
    from pipeline.stages.attention import iou, object_mask

    overrides = ["model=shapes_sd", "mode=[attention]", f"mode.attention.num_prompts={args.prompts}",
                 "sampler.num_inference_steps=20", "mode.attention.steps=[2,10,18]", "sampler.guidance_scale=5"]
    if args.model:
        overrides.append(f"model.path={args.model}")
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        run = run_pipeline(compose_config([*overrides, f"paths.outputs={tmp}/out"]), Path(tmp) / "run")
        seconds = time.perf_counter() - tic
        z = np.load(Path(tmp) / "run" / "tables" / "attention_maps.npz")
        side_only = []
        for i, prompt in enumerate(z["prompts"]):
            image = z[f"image_{i:04d}"]
            for _, _, side in parse_caption(str(prompt)):
                mask = object_mask(image, side)
                if mask.any():  # scored objects only, as the mode does
                    side_only.append(iou(object_mask(np.full_like(image, 255), side), mask))
    r = run.results
    miou, base = r["attention/miou"], float(np.mean(side_only))
    print(f"{int(r['attention/num_prompts'])} prompts, {int(r['attention/num_scored'])} objects scored ({seconds:.0f} s)")
    print(f"attention/miou (shape words) {miou:.3f}; colour words {r['attention/miou_colour']:.3f}; bar 0.5: "
          f"{'PASS' if miou >= 0.5 else 'FAIL'}")
    print(f"baseline side-only map {base:.3f}: ratio {miou / base:.2f}x; "
          f"swapped-word control {r['attention/miou_swapped']:.3f}")


if __name__ == "__main__":
    main()
