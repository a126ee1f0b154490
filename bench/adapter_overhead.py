"""Generation through the project's adapter vs the family's own ``pipe.__call__`` on the same seeds (CPU).

Baseline: diffusers' pipeline ``__call__`` with a list of per-sample CPU generators, the same prompts, steps,
guidance and size. Measured: ``pipeline.models.generation.generate`` (the one generation path of every mode) through
``pipeline.models.adapter.ModelAdapter``. Each side is timed ``--repeats`` times (minimum reported, after one
warm-up), alternating, in one process; the images are checked equal (max |Δ| in uint8).

Models: the built-in ``shapes_sd`` (UNet, 32×32 px), a small random-weight SD3-architecture MMDiT (4 joint
blocks, 16×16 latents, patch 2, two CLIP + T5 encoders) built from configs, and the tiny pipeline of every family
added in 2026 (``tests/tiny``: SD3.5, Flux.2, Qwen-Image, Z-Image, Sana, Chroma, Lumina 2, HiDream, CogView4,
HunyuanImage, and AuraFlow on the native path), at their test size with the ``__call__`` keywords their oracle uses.

    python bench/adapter_overhead.py                     # goal: adapter / pipeline <= 1.05 (native path <= 1.02)
    python bench/adapter_overhead.py --only qwenimage    # some of them
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

PROMPTS = [
    "a red circle on the left",
    "a blue square on the right and a green triangle on the left",
    "a yellow triangle on the right",
    "a green circle on the left and a red square on the right",
]


def small_sd3(path: Path) -> Path:
    """SD3 architecture at a small size: 4 joint blocks of width 128 on 16×16×16 latents (patch 2: 8×8 tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from tiny import _clip_text_config, _clip_tokenizer, _t5_encoder, _t5_tokenizer, _vae
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok = _clip_tokenizer(path)
    text = CLIPTextModelWithProjection(_clip_text_config(tok, hidden_size=32, num_hidden_layers=2))
    text_2 = CLIPTextModelWithProjection(_clip_text_config(tok, hidden_size=32, num_hidden_layers=2))
    tok_3 = _t5_tokenizer()
    text_3 = _t5_encoder(tok_3, d_model=64)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        caption_projection_dim=128,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    vae = _vae(
        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609
    )
    StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        text_encoder_2=text_2,
        tokenizer_2=tok,
        text_encoder_3=text_3,
        tokenizer_3=tok_3,
    ).save_pretrained(path)
    return path


def bench(
    name: str, path: Path, steps: int, guidance: float, repeats: int, extra_call: dict, size: int | None = None
) -> float:
    from diffusers import DiffusionPipeline

    from pipeline.models.adapter import ModelAdapter
    from pipeline.models.generation import generate, generators, to_uint8

    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    model = ModelAdapter(pipe)
    n, seed = len(PROMPTS), 0
    hw = {"height": size, "width": size} if size else {}

    def ours():
        return torch.cat(
            [
                b.images
                for b in generate(
                    model, pipe.scheduler, n, n, steps, guidance, seed, prompts=PROMPTS, progress=False, **hw
                )
            ]
        )

    def theirs():
        if per_image:  # the pipeline cannot batch prompts: its own call, one image at a time
            return torch.cat([call(PROMPTS[i : i + 1], generators(seed, [i])) for i in range(n)])
        return call(PROMPTS, generators(seed, range(n)), **negatives)

    def call(prompts, gens, **negative):
        out = pipe(
            prompt=prompts,  # by name: FLUX.2's first parameter is a reference image
            generator=gens,
            num_inference_steps=steps,
            output_type="np",
            **hw,
            **{**(extra_call or {"guidance_scale": guidance}), **negative},
        )
        return to_uint8(torch.from_numpy(out.images).permute(0, 3, 1, 2).clamp(0, 1))

    times = {"adapter": [], "pipeline": []}
    per_image, negatives = False, {}
    try:
        a, b = ours(), theirs()  # warm-up, and the equality check
    except AssertionError:  # Z-Image 0.42 batches prompts only with a negative prompt per prompt ("" = its default)
        negatives = {"negative_prompt": [""] * n}
        print(f"{name:>12}: batched with negative_prompt=[''] * {n} (its batched call asserts one per prompt)")
        a, b = ours(), theirs()
    except RuntimeError as e:  # HunyuanImage 0.42's encode_prompt cannot batch prompts
        print(f"{name:>12}: the pipeline's batched call fails ({str(e)[:80]}): its baseline is one image at a time")
        per_image = True
        a, b = ours(), theirs()
    for _ in range(repeats):
        for label, fn in (("pipeline", theirs), ("adapter", ours)):
            tic = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - tic)
    ratio = min(times["adapter"]) / min(times["pipeline"])
    print(
        f"{name:>12}{' (native)' if model.native else ''}: {n} images x {steps} steps: pipeline __call__ min {min(times['pipeline']):.3f} s, "
        f"adapter min {min(times['adapter']):.3f} s -> {ratio:.3f}x  (max |diff| {int((a.int() - b.int()).abs().max())}/255)"
    )
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", nargs="*", help="benchmark only these (shapes_sd, sd3-small, tests/tiny family names)")
    args = ap.parse_args()
    from tiny import NEW_FAMILY_NAMES, tiny_spec

    wanted = set(args.only or ["shapes_sd", "sd3-small", *NEW_FAMILY_NAMES])
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from pipeline import zoo

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, min of {args.repeats} runs each")
    if "shapes_sd" in wanted:
        bench("shapes_sd", Path(zoo.locate("shapes_sd")), args.steps, 5.0, args.repeats, {})
    with tempfile.TemporaryDirectory() as tmp:
        if "sd3-small" in wanted:
            bench("sd3-small", small_sd3(Path(tmp) / "sd3"), args.steps, 5.0, args.repeats, {})
        for name in NEW_FAMILY_NAMES:
            if name in wanted:
                spec = tiny_spec(name)
                path = spec.build(Path(tmp) / name)
                bench(name, path, args.steps, 5.0, args.repeats, spec.call(5.0), spec.size)


if __name__ == "__main__":
    main()
