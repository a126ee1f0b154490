"""Figure for the metrics mode: one feature pass serving every metric vs the separate-metric approach.

Same N real and N generated-like images (shapes test/val splits, 32x32, upsampled to 299), same network (the
FID Inception-v3 with locally saved random weights: the timing does not depend on the weights).
Baseline: torchmetrics FrechetInceptionDistance + KernelInceptionDistance + InceptionScore, each with its own
copy of the extractor, each updated with the images (FID and KID see real and fake, IS fake only: 5 passes).
Measured: pipeline's one pass (real pool once, fake pool+logits once) + FID, KID, IS, P/R, D/C; also with the
real side served by the reference cache (warm), which is the metrics stage's steady state.

Usage: python bench/metrics_one_pass.py [--n 128]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from pipeline import metrics as M
from pipeline.data.shapes import ShapesDataset
from pipeline.features.base import resize_images, to_pixels
from pipeline.features.inception import FIDInceptionV3, InceptionExtractor


class _Wrapped(nn.Module):
    """torchmetrics custom feature extractor: uint8 NCHW -> pool or logits of the same network."""

    def __init__(self, net: FIDInceptionV3, output: int):
        super().__init__()
        self.net, self.output = net, output

    def forward(self, x):
        x = resize_images(to_pixels(x, scale=255.0), 299, "bilinear_tf1", False, (0.0, 255.0))
        return self.net((x - 128.0) / 128.0)[self.output]


def images(split: str, n: int) -> torch.Tensor:
    arr, _ = ShapesDataset(split, n).arrays()
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    real, fake = images("test", args.n), images("val", args.n)
    with tempfile.TemporaryDirectory() as tmp:
        wpath = Path(tmp) / "inception_random.pth"
        torch.save(FIDInceptionV3().state_dict(), wpath)
        ex = InceptionExtractor(wpath, resize="bilinear_tf1", batch_size=args.batch)

        def ours(real_pool=None):
            tic = time.perf_counter()
            r = ex(real)["pool"] if real_pool is None else real_pool
            f = ex(fake)
            stats = M.FeatureStats().update(r).reference()
            out = {
                "fid": M.frechet_distance(M.FeatureStats().update(f["pool"]), stats),
                "kid": M.kernel_distance(r, f["pool"], subsets=10, subset_size=min(args.n, 1000))[0],
                "is": M.inception_score(f["logits"])[0],
                "pr": M.precision_recall(r, f["pool"]),
                "dc": M.density_coverage(r, f["pool"]),
            }
            return time.perf_counter() - tic, out, r

        def baseline():
            from torchmetrics.image.fid import FrechetInceptionDistance
            from torchmetrics.image.inception import InceptionScore
            from torchmetrics.image.kid import KernelInceptionDistance

            tic = time.perf_counter()
            fid = FrechetInceptionDistance(feature=_Wrapped(ex.net, 0))
            kid = KernelInceptionDistance(feature=_Wrapped(ex.net, 0), subsets=10, subset_size=min(args.n, 1000))
            isc = InceptionScore(feature=_Wrapped(ex.net, 1))
            for lo in range(0, args.n, args.batch):
                for metric in (fid, kid):
                    metric.update(real[lo : lo + args.batch], real=True)
                    metric.update(fake[lo : lo + args.batch], real=False)
                isc.update(fake[lo : lo + args.batch])
            out = {"fid": float(fid.compute()), "kid": float(kid.compute()[0]), "is": float(isc.compute()[0])}
            return time.perf_counter() - tic, out

        t_base, base = baseline()
        t_cold, mine, real_pool = ours()
        t_warm, _, _ = ours(real_pool)
    print(f"N = {args.n} real + {args.n} fake, FID Inception-v3 (random weights), {torch.get_num_threads()} threads")
    print(f"separate torchmetrics FID + KID + IS (baseline): {t_base:.1f} s   FID {base['fid']:.6g}")
    print(
        f"one pass + FID/KID/IS/PR/DC, cold reference:     {t_cold:.1f} s   FID {mine['fid']:.6g}  -> {t_base / t_cold:.2f}x faster"
    )
    print(f"one pass + FID/KID/IS/PR/DC, cached reference:   {t_warm:.1f} s   -> {t_base / t_warm:.2f}x faster")
    print(f"FID relative difference vs torchmetrics: {abs(mine['fid'] - base['fid']) / abs(base['fid']):.2e}")


if __name__ == "__main__":
    main()
