"""Resolution ceiling of attention mIoU for a UNet's cross-attention layout on 32×32 shapes images.

A *perfect* map of each layer is the object's mask area-pooled to the layer's grid; the attention mode averages
the layers' maps at latent resolution (bilinear), upsamples to the image and thresholds at τ. This prints the
mean IoU of that average with the true masks for the shipped layout (8×8 ×3 + the 2×2 mid block) against the
previous one (8×8 ×3, 4×4 ×3, 2×2 ×1) — why shapes_sd keeps cross-attention at the 8×8 level only.

Usage: python bench/attention_ceiling.py [--n 300]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.shapes import ShapesDataset
from pipeline.modes.attention.scoring import binarise, iou, to_image

LAYOUTS = {  # layer grid -> number of cross-attention layers at that grid
    "8x8 + mid (shipped)": {(8, 8): 3, (2, 2): 1},
    "8x8 + 4x4 + mid (baseline)": {(8, 8): 3, (4, 4): 3, (2, 2): 1},
    "8x8 only": {(8, 8): 3},
}


def perfect_map(mask: np.ndarray, layout: dict, latent=(8, 8)) -> torch.Tensor:
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    acc = sum(
        n * F.interpolate(F.adaptive_avg_pool2d(m, g), size=latent, mode="bilinear", align_corners=False)
        for g, n in layout.items()
    ) / sum(layout.values())
    return to_image(acc[0], mask.shape)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="test images")
    args = ap.parse_args()
    masks = [o.mask for s in ShapesDataset("test", args.n) for o in s.objects]
    taus = (0.3, 0.4, 0.5)
    res = {
        name: [float(np.mean([iou(binarise(perfect_map(m, lay), t), m) for m in masks])) for t in taus]
        for name, lay in LAYOUTS.items()
    }
    print(f"{len(masks)} objects; ceiling mIoU at τ = {taus}")
    for name, r in res.items():
        print(f"  {name:28s} " + "  ".join(f"{v:.3f}" for v in r))
    a, b = res["8x8 + mid (shipped)"][1], res["8x8 + 4x4 + mid (baseline)"][1]
    print(f"at τ = 0.4: shipped {a:.3f} vs baseline {b:.3f} = {a / b:.2f}x")


if __name__ == "__main__":
    main()
