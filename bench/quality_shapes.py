"""Quality bars of the built-in shapes zoo (issue 3), measured with the project's own data, judge and models.

    python bench/quality_shapes.py [--root pipeline/zoo/weights] [--n-gen 500] [--guidance 5.0] [--device cpu]
    python bench/quality_shapes.py --model shapes_sd3      # the flow-matching transformer: native solver, 20 steps

With ``--model shapes_sd3`` parts 3 and 4 measure shapes_sd3 (its own FlowMatchEuler solver, 20 steps by default;
the random-weight baseline is the same SD3Transformer2DModel architecture) — parts 1 and 2 are the shared VAE and
judge.

1. VAE reconstruction PSNR on val images (bar: >= 28 dB);
2. judge accuracy on real test images: shape and colour of every object (bar: >= 98 %);
3. prompt adherence of shapes_sd, 25 DDIM steps, on test captions (bars: >= 80 % one-object, >= 60 % two-object);
4. Frechet distance in shapes_net features, test-real vs generated, as a ratio to the same UNet architecture
   with random weights (bar: <= 0.2), and for every checkpoint (bar: later checkpoints score better).

Every FD uses the same caption list and sample count, so the numbers are comparable (FD is biased in N).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline import zoo  # noqa: E402
from pipeline.data.shapes import ShapesDataset  # noqa: E402
from pipeline.zoo.shapes_net import ShapesNet, compare, to_tensor  # noqa: E402
from pipeline.zoo.snapshots import evaluate_adherence  # noqa: E402
from pipeline.zoo.train import psnr  # noqa: E402


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID convention of the project's metrics library (float64, symmetric-eigen square-root trace)."""
    from pipeline.metrics import frechet_distance as fd

    return fd(a, b)


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


@torch.no_grad()
def generate(pipe, captions, steps: int, guidance: float, seed: int = 0, batch_size: int = 100) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1]; the initial noise of caption i is fixed by (seed, i), whatever the model."""
    out = []
    net = _denoiser(pipe)
    for i in range(0, len(captions), batch_size):
        chunk = captions[i : i + batch_size]
        gen = torch.Generator().manual_seed(seed + i)
        shape = (len(chunk), net.config.in_channels, net.config.sample_size, net.config.sample_size)
        latents = torch.randn(shape, generator=gen).to(net.device)
        out.append(
            pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, latents=latents, output_type="pt")
            .images.float()
            .cpu()
        )
    return torch.cat(out)


def load_sd(path, device):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=torch.float32).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_sd3(path, device):
    """shapes_sd3 as shipped, with its own FlowMatchEuler solver."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(
        path, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=None, help="weights folder (default: the package's)")
    ap.add_argument("--n-gen", type=int, default=500, help="test captions / generated images per model")
    ap.add_argument("--n-real", type=int, default=2000, help="real test images for the judge and FD")
    ap.add_argument("--n-val", type=int, default=1000, help="val images for the VAE PSNR")
    ap.add_argument("--model", default="shapes_sd", choices=["shapes_sd", "shapes_sd3"])
    ap.add_argument("--steps", type=int, default=None, help="default: 25 (shapes_sd, DDIM) / 20 (shapes_sd3, native)")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.steps = args.steps or (20 if args.model == "shapes_sd3" else 25)
    load = load_sd3 if args.model == "shapes_sd3" else load_sd
    t0 = time.time()
    judge = ShapesNet.from_pretrained(zoo.locate("shapes_net", args.root), device=args.device)
    sd_path = zoo.locate(args.model, args.root)
    pipe = load(sd_path, args.device)

    # 1. VAE round trip on val images
    xv, _ = ShapesDataset("val", args.n_val).arrays()
    xv = to_tensor(xv) * 2 - 1
    with torch.no_grad():
        vae = pipe.vae
        rec = torch.cat(
            [
                vae.decode(vae.encode(xv[i : i + 250].to(args.device)).latent_dist.mode()).sample.cpu()
                for i in range(0, len(xv), 250)
            ]
        )
    print(f"1. VAE reconstruction PSNR, {args.n_val} val images: {psnr(rec, xv):.2f} dB (bar >= 28)")

    # 2. judge on real test images
    test = ShapesDataset("test", max(args.n_real, args.n_gen))
    samples = list(test)
    real = to_tensor(np.stack([s.image for s in samples[: args.n_real]]))
    verdicts = [compare(j, s.objects) for j, s in zip(judge.judge(real), samples)]
    print(
        f"2. judge accuracy, {args.n_real} real test images: shape+colour of every object "
        f"{np.mean([v['correct'] for v in verdicts]):.4f}, exact (no phantom objects) "
        f"{np.mean([v['exact'] for v in verdicts]):.4f} (bar >= 0.98)"
    )

    # 3. prompt adherence
    captions = [s.caption for s in samples[: args.n_gen]]
    res = evaluate_adherence(pipe, judge, captions, args.steps, args.guidance, seed=0, batch_size=100)
    print(
        f"3. {args.model} adherence, {args.n_gen} test captions, {args.steps} {type(pipe.scheduler).__name__} steps, "
        f"guidance {args.guidance}: "
        f"one-object {res['correct_1obj']:.3f} (bar >= 0.80), two-object {res['correct_2obj']:.3f} (bar >= 0.60); "
        f"colour {res['colour']:.3f}, shape {res['shape']:.3f}"
    )

    # 4. FD in shapes_net features
    with torch.no_grad():

        def feats(x):
            return torch.cat([judge.features(x[i : i + 500]).cpu() for i in range(0, len(x), 500)]).numpy()

        f_real = feats(real)
        torch.manual_seed(0)
        random_pipe = load(sd_path, args.device)
        if args.model == "shapes_sd3":
            from diffusers import SD3Transformer2DModel

            random_pipe.transformer = SD3Transformer2DModel.from_config(pipe.transformer.config).to(args.device)
        else:
            from diffusers import UNet2DConditionModel

            random_pipe.unet = UNet2DConditionModel.from_config(pipe.unet.config).to(args.device)
        fd_random = frechet_distance(f_real, feats(generate(random_pipe, captions, args.steps, args.guidance)))
        fds = []
        for path in zoo.checkpoints(args.model, args.root):
            p = pipe if path == sd_path else load(path, args.device)
            fds.append((path.name, frechet_distance(f_real, feats(generate(p, captions, args.steps, args.guidance)))))
    fd_final = fds[-1][1]
    print(
        f"4. FD (shapes_net features, {args.n_real} real vs {args.n_gen} generated): final {fd_final:.3f}, "
        f"random-weight {type(_denoiser(pipe)).__name__} {fd_random:.3f}, ratio {fd_final / fd_random:.4f} (bar <= 0.2)"
    )
    ordered = all(a[1] > b[1] for a, b in zip(fds, fds[1:]))
    print("   checkpoints: " + ", ".join(f"{n} {v:.3f}" for n, v in fds) + f"; later is better: {ordered}")
    print(f"({time.time() - t0:.0f} s on {args.device})")


if __name__ == "__main__":
    main()
