"""Attention mIoU on shapes_sd / shapes_sd3 (the bar: ≥ 0.5) against named baselines on the same generated images,
attention probabilities vs ConceptAttention's output-space maps, and where the maps localise (layer x step).

Runs the attention mode (N dataset prompts, 20 DDIM steps, guidance 5, snapshots at steps 2/10/18) and reads
``attention/miou`` (shape words, τ = 0.4). Baselines, from the run's own images and masks:

- *side-only map*: a map that knows only on which half the object is (the whole half lit) — what the maps of
  the first, ungrounded shapes_sd amounted to (README, *Attention mode*); IoU = |mask| / |half|;
- *swapped word*: the other object's shape word (``attention/miou_swapped``, two-object captions).

Also printed: ``attention/miou_reference`` (DAAM's real-image protocol on 50 reference images, which the mode runs
by default; its time is included in the printed seconds). Masks of generated images come from the dataset's
ground truth (:class:`pipeline.data.ground_truth.ShapesObjectMasks`), exactly as the mode segments them.

Output space (joint-attention models: shapes_sd3): ``attention/miou_output`` (the head noun's concept map, concepts
= the ground truth's head nouns) beside ``attention/miou``, and the reference images' zero-shot segmentation
(pixel accuracy, mIoU, mAP at the mean-value threshold) for both kinds. The layer x step table
(``tables/attention_miou_layer_step.csv``) is printed as its per-layer and per-step means with the best ranges.

Usage: python bench/attention_miou.py [--prompts 100] [--model shapes_sd|shapes_sd3|DIR]
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
    ap.add_argument("--model", default="shapes_sd", help="shapes_sd, shapes_sd3 or a pipeline dir of either kind")
    args = ap.parse_args()
    from pipeline.config import compose_config
    from pipeline.data.ground_truth import ShapesObjectMasks
    from pipeline.modes.attention.scoring import iou
    from pipeline.run.runner import run_pipeline

    masks = ShapesObjectMasks()  # generated images: the prompt's side, bright pixels (the mode's segmentation)

    builtin = args.model in ("shapes_sd", "shapes_sd3")
    overrides = [
        f"model={args.model if builtin else 'shapes_sd'}",
        "mode=[attention]",
        f"mode.attention.num_prompts={args.prompts}",
        "sampler.num_inference_steps=20",
        "mode.attention.steps=[2,10,18]",
        "sampler.guidance_scale=5",
    ]
    if not builtin:
        overrides.append(f"model.path={args.model}")
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        run = run_pipeline(compose_config([*overrides, f"paths.outputs={tmp}/out"]), Path(tmp) / "run")
        seconds = time.perf_counter() - tic
        z = np.load(Path(tmp) / "run" / "tables" / "attention_maps.npz")
        import csv

        table = list(csv.DictReader(open(Path(tmp) / "run" / "tables" / "attention_miou_layer_step.csv")))
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
    for kind, suffix in (("attention probabilities", ""), ("output space (ConceptAttention)", "_output")):
        if f"attention/miou{suffix}" not in r and f"attention/seg_miou{suffix}" not in r:
            print(f"{kind}: not available for this model")
            continue
        print(
            f"{kind}: generated miou {r.get(f'attention/miou{suffix}', nan):.3f}, reference miou "
            f"{r.get(f'attention/miou_reference{suffix}', nan):.3f}; zero-shot segmentation of the reference objects "
            f"(mean-value threshold): accuracy {r.get(f'attention/seg_accuracy{suffix}', nan):.3f}, mIoU "
            f"{r.get(f'attention/seg_miou{suffix}', nan):.3f}, mAP {r.get(f'attention/seg_map{suffix}', nan):.3f}; best "
            f"layers {r.get(f'attention/best_layers_first{suffix}', nan):.0f}-"
            f"{r.get(f'attention/best_layers_last{suffix}', nan):.0f} ({r.get(f'attention/miou_best_layers{suffix}', nan):.3f}), "
            f"best steps {r.get(f'attention/best_steps_first{suffix}', nan):.0f}-"
            f"{r.get(f'attention/best_steps_last{suffix}', nan):.0f} ({r.get(f'attention/miou_best_steps{suffix}', nan):.3f})"
        )
    col = {"": "miou", "_output": "miou_output"}
    layers = sorted({int(row["layer"]) for row in table})
    print(
        "per layer (mean over steps): "
        + ", ".join(
            f"{la}: "
            + "/".join(
                f"{np.mean([float(row[c]) for row in table if int(row['layer']) == la and row.get(c)]):.3f}"
                for c in col.values()
                if any(row.get(c) for row in table)
            )
            for la in layers
        )
        + "  (probs/output)"
    )


if __name__ == "__main__":
    main()
