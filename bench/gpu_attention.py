"""Attention capture overhead at real width on one GPU: SD3.5-medium and FLUX.2-klein-4B architectures (random
weights, bf16), 1024², 2 prompts × 8 steps, both map kinds.

Baseline: plain generation through the project's one generation path (``pipeline.models.generation.sample`` with the
model's stock processors) on the same adapter, prompts, seeds, steps and guidance (4, CFG). Measured: the same call
inside ``pipeline.modes.attention.capture`` as the attention stage drives it (snapshot at the middle solver step,
``denoiser_call_steps``, CFG convention, valid tokens) with (a) the probability maps only and (b) probabilities plus
ConceptAttention's output-space maps for three concepts, results read back to the CPU. One warm-up per side
(2 steps), then ``--repeats`` interleaved runs, ``torch.cuda.synchronize`` around each, minimum reported. Peak
memory: ``max_memory_allocated`` per run after ``reset_peak_memory_stats``; printed as the extra over plain
generation's peak. Goal: capture / plain <= 1.25 (both kinds); the extra memory is reported, not judged.

Architectures (built from configs on the GPU, nothing downloaded; small offline tokenizers from tests/tiny, so the
embedding matrices are small, every other matrix full size):

- SD3.5-medium: SD3Transformer2DModel 24 joint blocks (MMDiT-X: dual attention in blocks 0–12), 24 heads × 64
  (width 1536), RMS q/k norms, joint_attention_dim 4096, caption_projection_dim 1536, pooled 2048,
  pos_embed_max_size 384, patch 2 (the diffusers 0.42 config of stabilityai/stable-diffusion-3.5-medium as
  published in its model card / public ports); CLIP-L (768 × 12), CLIP-G (1280 × 32), T5-XXL encoder (4096 × 24,
  d_ff 10240, 64 heads); AutoencoderKL 16 latent channels (SD3's factors). Maps from the T5 segment (256 tokens).
- FLUX.2-klein-4B (base): ``bench/gpu_families.py``'s ``klein_pipeline`` (its docstring gives the sources).

Cost: SD3.5-medium 2.24 B transformer parameters (this config, counted by --tiny), 4096 image + 333 text tokens, 2 calls' worth (CFG batch) ×
8 steps × 2 prompts; FLUX.2-klein as in gpu_families.py. Estimated ≤ 3 min on an H100 for both (3 sides × (1 warm-up
+ repeats) generations each).

``--tiny``: a CPU dry run (fp32) of the same measuring code on tests/tiny's ``sd35`` and ``flux2_klein`` at their
test size, and builds SD3.5-medium's full-size config on the meta device (< 60 s).

    python bench/gpu_attention.py            # on one H100 / H200 (goal: <= 5 min)
    python bench/gpu_attention.py --only sd35 --repeats 1
    python bench/gpu_attention.py --tiny     # CPU dry run
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

PROMPTS = ["a red circle on the left and a blue square on the right", "a green triangle on the left"]
CONCEPTS = ["circle", "square", "triangle"]
GUIDANCE = 4.0
MODELS = {"sd35": "sd35", "klein": "flux2_klein"}  # --only name -> tests/tiny family (the --tiny dry run)
SD35_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)


def sd35_pipeline(device: torch.device, dtype: torch.dtype):
    """StableDiffusion3Pipeline with SD3.5-medium's architecture, random weights made on ``device`` in ``dtype``."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from gpu_families import default_dtype
    from tiny import _clip_tokenizer, _t5_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tmp = Path(tempfile.mkdtemp())
    clip_tok, t5_tok = _clip_tokenizer(tmp), _t5_tokenizer(model_max_length=256)

    def clip(hidden, layers, heads, inter):
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(clip_tok),
                hidden_size=hidden,
                intermediate_size=inter,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                max_position_embeddings=77,
                projection_dim=hidden,
                bos_token_id=clip_tok.bos_token_id,
                eos_token_id=clip_tok.eos_token_id,
            )
        )

    clip_tok.model_max_length = 77
    with torch.device(device), default_dtype(dtype):
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**SD35_TRANSFORMER),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=16,
                use_quant_conv=False,
                use_post_quant_conv=False,
                scaling_factor=1.5305,
                shift_factor=0.0609,
            ),
            text_encoder=clip(768, 12, 12, 3072),
            tokenizer=clip_tok,
            text_encoder_2=clip(1280, 32, 20, 5120),
            tokenizer_2=clip_tok,
            text_encoder_3=T5EncoderModel(
                T5Config(
                    vocab_size=len(t5_tok),
                    d_model=4096,
                    d_kv=64,
                    d_ff=10240,
                    num_layers=24,
                    num_heads=64,
                    feed_forward_proj="gated-gelu",
                    dropout_rate=0.0,
                    pad_token_id=t5_tok.pad_token_id,
                )
            ),
            tokenizer_3=t5_tok,
        )
    return pipe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_side(model, h, w, steps, side: str):
    """One generation of 2 prompts: ``plain``, ``probs`` (capture) or ``probs+output`` (capture with concepts)."""
    from pipeline.models.generation import denoiser_call_steps, generators, sample
    from pipeline.modes.attention.capture import capture

    sampler, device = model.pipe.scheduler, model.device
    model.attention_layout(h, w)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    tic = time.perf_counter()
    cond = model.condition(len(PROMPTS), GUIDANCE, h, w, prompts=PROMPTS)
    gens = generators(0, range(len(PROMPTS)))
    if side == "plain":
        sample(model, sampler, cond, gens, steps, h, w)
    else:
        calls = denoiser_call_steps(model, sampler, steps, h, w)
        concepts = CONCEPTS if side == "probs+output" else None
        with capture(model, h, w, {steps // 2}, calls, cfg=cond.cfg, prompts=PROMPTS, concepts=concepts) as cap:
            sample(model, sampler, cond, gens, steps, h, w)
        _ = cap.aggregate(), cap.snapshots()
        if concepts:
            _ = cap.aggregate("output")
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return time.perf_counter() - tic, peak


def bench(name: str, pipe, size: int, steps: int, repeats: int) -> None:
    from pipeline.models.adapter import ModelAdapter

    pipe.set_progress_bar_config(disable=True)
    model = ModelAdapter(pipe)
    h, w = model.resolve_size(size, size)
    layout = model.attention_layout(h, w)
    sides = ["plain", "probs"] + (["probs+output"] if layout.concepts is not None else [])
    with torch.no_grad():
        for side in sides:
            run_side(model, h, w, min(steps, 2), side)  # warm-up
        times, peaks = {s: [] for s in sides}, {s: [] for s in sides}
        for r in range(repeats):
            for side in sides if r % 2 == 0 else sides[::-1]:
                t, m = run_side(model, h, w, steps, side)
                times[side].append(t)
                peaks[side].append(m)
    best = {s: min(v) for s, v in times.items()}
    line = ", ".join(
        f"{s} {best[s]:.2f} s -> {best[s] / best['plain']:.3f}x"
        + (f" (+{(max(peaks[s]) - max(peaks['plain'])) / 2**20:.0f} MiB peak)" if model.device.type == "cuda" else "")
        for s in sides[1:]
    )
    print(
        f"{name}: {h}x{w}, {len(PROMPTS)} prompts x {steps} steps, {len(layout.layers)} recorded layers; "
        f"plain {best['plain']:.2f} s; {line} (goal <= 1.25x)",
        flush=True,
    )
    if "probs+output" not in sides:
        print(f"  {name}: no concept stream declared: output-space maps not measured")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(MODELS), default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run on the tiny test pipelines")
    args = ap.parse_args()
    names = [args.only] if args.only else list(MODELS)
    tic = time.perf_counter()
    if args.tiny:
        from diffusers import DiffusionPipeline
        from tiny import tiny_family, tiny_spec

        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                fam = MODELS[name]
                pipe = DiffusionPipeline.from_pretrained(tiny_family(fam, Path(tmp) / fam), use_safetensors=True)
                bench(name, pipe, tiny_spec(fam).size or 0, args.steps, args.repeats)
        meta = sd35_pipeline(torch.device("meta"), torch.bfloat16)  # the full-size config builds (no memory)
        count = sum(p.numel() for p in meta.transformer.parameters()) / 1e9
        print(f"SD3.5-medium config on the meta device: transformer {count:.2f} B parameters")
        print(f"dry run done in {time.perf_counter() - tic:.0f} s")
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_attention.py needs a CUDA GPU (use --tiny for a CPU dry run)")
    device, dtype = torch.device("cuda"), torch.bfloat16
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, bf16", flush=True)
    for name in names:
        if name == "sd35":
            pipe = sd35_pipeline(device, dtype)
        else:
            from gpu_families import klein_pipeline

            pipe = klein_pipeline(device, dtype)
        bench(name, pipe, args.size, args.steps, args.repeats)
        del pipe
        gc.collect()
        torch.cuda.empty_cache()
    print(f"elapsed {time.perf_counter() - tic:.0f} s")


if __name__ == "__main__":
    main()
