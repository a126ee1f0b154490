"""Attention mIoU on shapes_sd (the issue's bar: ≥ 0.5) against two named baselines on the same generated images.

Runs the attention mode (N dataset prompts, 20 DDIM steps, guidance 5, snapshots at steps 2/10/18) and reads
``attention/miou`` (shape words, τ = 0.4). Baselines, from the run's own images and masks:

- *side-only map*: a map that knows only on which half the object is (the whole half lit) — what the maps of
  the first, ungrounded shapes_sd amounted to (README, *Attention mode*); IoU = |mask| / |half|;
- *swapped word*: the other object's shape word (``attention/miou_swapped``, two-object captions).

Also printed: ``attention/miou_reference`` (DAAM's real-image protocol on 50 reference images, which the mode runs
by default; its time is included in the printed seconds). Masks of generated images come from the dataset's
ground truth (:class:`pipeline.data.ground_truth.ShapesObjectMasks`), exactly as the mode segments them.

Usage: python bench/attention_miou.py [--prompts 100] [--model DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--model", default=None, help="a StableDiffusionPipeline dir (default: the built-in shapes_sd)")
    args = ap.parse_args()
    from pipeline.config import compose_config
    from pipeline.data.ground_truth import ShapesObjectMasks
    from pipeline.modes.attention.scoring import iou
    from pipeline.run.runner import run_pipeline

    masks = ShapesObjectMasks()  # generated images: the prompt's side, bright pixels (the mode's segmentation)

    overrides = [
        "model=shapes_sd",
        "mode=[attention]",
        f"mode.attention.num_prompts={args.prompts}",
        "sampler.num_inference_steps=20",
        "mode.attention.steps=[2,10,18]",
        "sampler.guidance_scale=5",
    ]
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
            for obj in masks.objects(str(prompt)) or []:  # the caption's objects, as the mode parses them
                mask = masks.generated_mask(image, obj)
                if mask.sum() >= 4:  # scored objects only, as the mode does (fewer pixels: not drawn)
                    side_only.append(iou(masks.generated_mask(np.full_like(image, 255), obj), mask))
    r = run.results
    nan = float("nan")
    miou, base = r["attention/miou"], float(np.mean(side_only))
    n_ref = int(r.get("attention/num_reference_scored", 0))
    print(
        f"{int(r['attention/num_prompts'])} prompts, {int(r['attention/num_scored'])} objects scored "
        f"({seconds:.0f} s, including the real-image protocol on {n_ref} reference objects)"
    )
    print(
        f"attention/miou (shape words) {miou:.3f}; colour words {r.get('attention/miou_colour', nan):.3f}; bar 0.5: "
        f"{'PASS' if miou >= 0.5 else 'FAIL'}"
    )
    print(
        f"baseline side-only map {base:.3f}: ratio {miou / base:.2f}x; "
        f"swapped-word control {r.get('attention/miou_swapped', nan):.3f}; "
        f"reference images (DAAM's real-image protocol) {r.get('attention/miou_reference', nan):.3f}"
    )


if __name__ == "__main__":
    main()
