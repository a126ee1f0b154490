"""Generation throughput through the project vs the raw-UNet bound, on an SD 1.5-architecture pipeline with random
weights (components built from the published configs: nothing downloaded), fp16 on CUDA.

Baseline ("raw-UNet bound"): the UNet alone, ``steps`` forward calls at the CFG batch 2B on random inputs — what
generation cannot beat. Measured: ``pipeline.generation.generate`` (the one generation path: text encoding, the
solver loop through the adapter, VAE decode, uint8 conversion) at batch B. Printed separately: UNet, text-encoding
and VAE-decode time per batch. Goal: throughput ratio >= 0.88.

    python bench/gpu_throughput.py                 # on a GPU machine: batches 8 and 16, 25 steps, fp16
    python bench/gpu_throughput.py --tiny          # CPU dry run of the script with tiny components
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def sd15_pipeline(tmp: Path, tiny: bool):
    """StableDiffusionPipeline with SD 1.5's UNet / VAE / CLIP-L architecture (random weights); ``tiny`` shrinks it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline.data.shapes import vocabulary
    from pipeline.zoo.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer([*vocabulary(), "photo", "cat", "dog"], tmp / "tok", model_max_length=77)
    if tiny:
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                    attention_head_dim=4, norm_num_groups=8,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        vae = AutoencoderKL(block_out_channels=(16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, max_position_embeddings=77))
    else:  # the published SD 1.5 configs (runwayml/stable-diffusion-v1-5 unet/vae/text_encoder config.json)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                                    block_out_channels=(320, 640, 1280, 1280))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def timed(fn, device, repeats: int) -> float:
    """Minimum wall time of ``fn`` over ``repeats`` runs (synchronised)."""
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - tic)
    return best


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny components on the CPU (a dry run of the script)")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    from pipeline.generation import generate
    from pipeline.models.adapter import ModelAdapter

    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        pipe = sd15_pipeline(Path(tmp), args.tiny).to(device, dtype)
        pipe.set_progress_bar_config(disable=True)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"{name}, {dtype}, SD 1.5 architecture{' (tiny)' if args.tiny else ''}, built in "
              f"{time.perf_counter() - tic:.1f} s; {args.steps} steps, guidance 7.5, min of {args.repeats}")
        model = ModelAdapter(pipe)
        h, w = model.native_size()
        c, lh, lw = model.latent_shape(h, w)
        for b in args.batches:
            prompts = ["a photo of a red circle on the left"] * b
            cond = model.condition(b, 7.5, h, w, prompts=prompts)
            x = torch.randn(2 * b, c, lh, lw, device=device, dtype=dtype)
            t = torch.tensor(500, device=device)
            emb = cond.kwargs["encoder_hidden_states"]
            unet = timed(lambda: [pipe.unet(x, t, encoder_hidden_states=emb) for _ in range(args.steps)], device, args.repeats)
            text = timed(lambda: model.condition(b, 7.5, h, w, prompts=prompts), device, args.repeats)
            z = torch.randn(b, c, lh, lw, device=device, dtype=dtype)
            vae = timed(lambda: model.decode(z, h, w), device, args.repeats)
            gen = timed(lambda: list(generate(model, pipe.scheduler, b, b, args.steps, 7.5, 0, prompts=prompts,
                                              progress=False)), device, args.repeats)
            print(f"batch {b:>3}: UNet {unet:.3f} s ({b / unet:.2f} img/s bound) | text {text * 1e3:.1f} ms | "
                  f"VAE decode {vae * 1e3:.1f} ms | generate {gen:.3f} s ({b / gen:.2f} img/s) -> "
                  f"{unet / gen:.3f} of the raw-UNet bound (goal >= 0.88)")
            if device.type == "cuda":
                print(f"          peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
