"""Generation through the project vs the family's own ``pipe.__call__`` on FLUX.2-klein and Qwen-Image at their real
width (random weights, bf16, one GPU): throughput and peak memory at 1024², 4 images × 8 steps with CFG.

Baseline: diffusers 0.42's ``pipe(prompt=..., generator=[per-sample CPU generators], num_inference_steps=8,
height=1024, width=1024, output_type="np", **call)`` with the keywords that mean the project's guidance for the
family (``tests/tiny``'s ``TINY[...].call``): Flux2KleinPipeline (base, not distilled) ``guidance_scale=4.0``, real
CFG against the empty prompt in two transformer calls; QwenImagePipeline ``true_cfg_scale=4.0, negative_prompt=""``.
Measured: ``pipeline.models.generation.generate(ModelAdapter(pipe), pipe.scheduler, 4, 4, 8, 4.0, seed,
prompts=..., height=1024, width=1024)`` — the one generation path of every mode — on the same pipeline object,
prompts, seeds and steps. One warm-up each (2 steps: the same shapes and kernels), then ``--repeats`` interleaved
runs of each side (the order alternates), ``torch.cuda.synchronize()`` around every timing, minimum reported.
Peak memory: ``torch.cuda.reset_peak_memory_stats`` before each run, ``max_memory_allocated`` after it (the
largest over the timed runs; printed absolute — the weights included — and above the weights). Images: max |Δ| in
uint8 of the first timed run of each side.

Goals: throughput ratio = pipe time / project time >= 0.95; peak memory ratio = project / pipe <= 1.05.

Architectures (built from configs on the GPU in bf16, nothing downloaded; vocabularies are the small offline
tokenizers of ``tests/tiny/flux2.py`` / ``tests/tiny/qwenimage.py``, so the embedding and LM-head matrices are small;
every other matrix is full size):

- FLUX.2-klein-4B (base): Flux2Transformer2DModel 5 double + 20 single blocks, 24 heads × 128 (width 3072),
  mlp_ratio 3, in_channels 128 (32 VAE channels 2×2-patchified), joint_attention_dim 3·2560 = 7680 (the stacked
  hidden states 9, 18, 27 of the text encoder), axes_dims_rope (32, 32, 32, 32), rope_theta 2000, no guidance
  embedding; text encoder Qwen3-4B: hidden 2560, 36 layers, intermediate 9728, 32 heads / 8 KV heads, head_dim
  128, rope_theta 1e6, tied embeddings; AutoencoderKLFlux2 at its 0.42 class defaults (128/256/512/512 channels,
  2 layers per block, 32 latent channels, quant convs); scheduler as tests/tiny/flux2.py (FlowMatch Euler, dynamic
  shift, FLUX.2's empirical μ). Sources: the diffusers 0.42 class defaults and several public ports
  (5 + 20 blocks, width 3072 = 24 × 128, Qwen3-4B 2560 × 36, 9728, 32/8 heads, head_dim 128, 40960 positions).
  Less sure: that the published VAE config equals the class defaults (use_quant_conv etc.: not read from the hub
  file; its cost is small next to the transformer either way) and klein's rope settings (assumed = the class
  defaults, which FLUX.2-dev uses).
- Qwen-Image: QwenImageTransformer2DModel 60 layers, 24 heads × 128, joint_attention_dim 3584, in_channels 64,
  out_channels 16, patch 2, axes_dims_rope (16, 56, 56) — exactly the 0.42 class defaults; text encoder
  Qwen2.5-VL-7B: hidden 3584, 28 layers, intermediate 18944, 28 heads / 4 KV heads, mrope_section (16, 24, 24),
  rope_theta 1e6, with its 32-block vision tower (1280 wide, intermediate 3420, 16 heads, out 3584: unused for
  text-to-image, but its weights are in memory as in the real pipeline); AutoencoderKLQwenImage class defaults
  (z_dim 16, base_dim 96, dim_mult 1/2/4/4, latents_mean/std); scheduler as tests/tiny/qwenimage.py (Qwen-Image's:
  exponential time shift, μ over 256..8192 tokens, shift_terminal 0.02). Sources: the class defaults and public
  printouts of Qwen2.5-VL-7B's module tree (k/v_proj 3584 → 512 = 4 × 128, MLP 18944, 28 layers).

Cost (rough, the transformer only; N = tokens per sample, D = 3072): 1024² → 128² latents → 64² = 4096 image
tokens. FLUX.2-klein: every token crosses 25 blocks of 4D² + 3D·(3D) ≈ 123 M MACs; text padded to 512 tokens →
N = 4608: 2·3.07e9·4608 + attention 4·N²·D·25 ≈ 3.5e13 FLOPs per sample and call; CFG ⇒ 2 calls per step,
4 samples × 8 steps ⇒ 64 ⇒ ≈ 2.2e15 FLOPs per generation (~5–6 s at 400 TFLOP/s). Qwen-Image (~20 B parameters,
60 blocks of 12D² ≈ 113 M MACs per token, ~30 text tokens): 2·6.8e9·4126 + 4·N²·D·60 ≈ 6.9e13 per sample and call
⇒ ≈ 4.4e15 FLOPs per generation (~11 s at 400 TFLOP/s). Each model runs 2 warm-ups of 2 steps and 2·repeats
generations, plus text encoding and a 4-image 1024² VAE decode per run; with building the networks (random init on
the GPU: seconds) the full run is estimated at ~2.5 min on an H100 at 400 TFLOP/s, ~3.8 min at 200 (printed at
the start; after the first model the total is projected from its measured speed; the elapsed time at the end).
Memory: Qwen-Image ≈ 20.4 B (transformer) + 7.2 B (text encoder with the vision tower, small vocabulary) parameters
≈ 52 GiB of bf16 weights, plus activations and the VAE decode — fits an H100 80 GB; FLUX.2-klein 3.9 B + 3.6 B
≈ 14 GiB. The first model is freed before the second is built. ``--layers-fraction`` scales the transformers' depth if needed.

``--tiny``: a CPU dry run (fp32) of the same measuring code on the tiny pipelines of ``tests/tiny/flux2.py``
(``flux2_klein``) and ``tests/tiny/qwenimage.py`` at their test size (32 px); it also builds the full-size
pipelines above on the meta device (no memory), so that their configs are checked and their parameter counts
printed.

    python bench/gpu_families.py                    # on one H100 80 GB / H200: both models (goal: <= 5 min)
    python bench/gpu_families.py --only qwen        # one of them (klein | qwen)
    python bench/gpu_families.py --layers-fraction 0.5 --repeats 1   # shallower transformers, fewer runs
    python bench/gpu_families.py --tiny             # CPU dry run (< 90 s)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: every component is built from a config

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PROMPTS = [
    "a red circle on the left",
    "a blue square on the right and a green triangle on the left",
    "a yellow triangle on the right",
    "a green circle on the left and a red square on the right",
]
GUIDANCE = 4.0  # FLUX.2-klein base's default guidance_scale; Qwen-Image's default true_cfg_scale
WARMUP_STEPS = 2
ASSUMED_TFLOPS = 400.0  # bf16 throughput the runtime estimate assumes (H100 SXM dense peak ~990)
MODELS = {"klein": "flux2_klein", "qwen": "qwenimage"}  # --only name -> tests/tiny family (and its __call__ keywords)

# The transformers' architectures (see the module docstring for the sources)
KLEIN_TRANSFORMER = dict(
    patch_size=1,
    in_channels=128,
    num_layers=5,
    num_single_layers=20,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3 * 2560,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    guidance_embeds=False,
)
QWEN_TRANSFORMER = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
TEXT_TOKENS = {"klein": 512, "qwen": 30}  # klein pads to max_sequence_length; Qwen-Image's prompt (template dropped)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Parameters are created in ``dtype`` (a 20 B model initialised in fp32 would not fit an 80 GB GPU)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _depth(n: int, fraction: float) -> int:
    return max(1, round(n * fraction))


def klein_pipeline(device: torch.device, dtype: torch.dtype, fraction: float = 1.0):
    """Flux2KleinPipeline with FLUX.2-klein-4B's architecture (base: real CFG), random weights made on ``device``."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from tiny.flux2 import _QWEN_TEMPLATE, _scheduler
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # tests/tiny/flux2.py's byte-level Qwen2 tokenizer with a Qwen3 chat template (the pipeline pads to 512 tokens)
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tok = Qwen2Tokenizer(vocab={**vocab, "<|endoftext|>": len(vocab)}, merges=[])
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = _QWEN_TEMPLATE
    scheduler = _scheduler()
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        text = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=len(tok),
                hidden_size=2560,
                intermediate_size=9728,
                num_hidden_layers=36,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=128,
                max_position_embeddings=40960,
                rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                tie_word_embeddings=True,
                pad_token_id=tok.pad_token_id,
            )
        ).eval()
        config = dict(KLEIN_TRANSFORMER)
        config.update(num_layers=_depth(5, fraction), num_single_layers=_depth(20, fraction))
        transformer = Flux2Transformer2DModel(**config)
        vae = AutoencoderKLFlux2()  # the 0.42 class defaults (FLUX.2's VAE)
    return Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tok, transformer=transformer, is_distilled=False
    )


def qwen_pipeline(device: torch.device, dtype: torch.dtype, fraction: float = 1.0):
    """QwenImagePipeline with Qwen-Image's architecture (Qwen2.5-VL-7B text encoder), random weights on ``device``."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from tiny.qwenimage import _check_template, _qwen_tokenizer
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = _qwen_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(  # as tests/tiny/qwenimage.py (Qwen/Qwen-Image's scheduler config)
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
        },
    )
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        transformer = QwenImageTransformer2DModel(**{**QWEN_TRANSFORMER, "num_layers": _depth(60, fraction)})
        vae = AutoencoderKLQwenImage()  # the 0.42 class defaults: z_dim 16, base_dim 96 (Qwen-Image's VAE)
        text = Qwen2_5_VLForConditionalGeneration(config).eval()
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tok, transformer=transformer)
    _check_template(tok, pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx)
    return pipe


BUILDERS = {"klein": klein_pipeline, "qwen": qwen_pipeline}


def tiny_pipeline(name: str, tmp: Path):
    """The family's tiny test pipeline (tests/tiny), saved and loaded as a checkpoint would be."""
    from diffusers import DiffusionPipeline
    from tiny import tiny_spec

    return DiffusionPipeline.from_pretrained(tiny_spec(MODELS[name]).build(tmp / name), use_safetensors=True)


def transformer_flops(name: str, config, size: int, n: int, steps: int) -> float:
    """Rough FLOPs of the transformer calls of one generation (linear layers + attention; CFG: 2 calls per step)."""
    d = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    tokens = (size // 16) ** 2 + TEXT_TOKENS[name]  # x8 VAE, 2x2 patches: a token per 16x16 px
    if name == "klein":
        layers = int(config["num_layers"]) + int(config["num_single_layers"])
        macs = 4 * d * d + 3 * d * int(d * float(config["mlp_ratio"]))  # attention projections + SwiGLU MLP
    else:
        layers = int(config["num_layers"])
        macs = 12 * d * d  # attention projections + GELU MLP (4x)
    per_call = 2 * macs * tokens * layers + 4 * tokens * tokens * d * layers
    return per_call * n * 2 * steps


def estimate_seconds(name: str, size: int, steps: int, repeats: int, fraction: float) -> float:
    """The runtime estimate of one model's part: build + 2 warm-ups + 2·repeats generations (+ text / VAE / copy)."""
    config = dict(KLEIN_TRANSFORMER if name == "klein" else QWEN_TRANSFORMER)
    for key in ("num_layers", "num_single_layers"):
        if key in config:
            config[key] = _depth(config[key], fraction)
    n, rate = len(PROMPTS), ASSUMED_TFLOPS * 1e12
    per_run_overhead = {"klein": 1.0, "qwen": 2.0}[name]  # text encoding, 4-image VAE decode, host copy (guess)
    gen = transformer_flops(name, config, size, n, steps) / rate + per_run_overhead
    warm = transformer_flops(name, config, size, n, WARMUP_STEPS) / rate + per_run_overhead
    return 20.0 + 2 * warm + 2 * repeats * gen


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, pipe, device: torch.device, size: int, steps: int, repeats: int) -> None:
    """Project vs ``pipe.__call__`` on one pipeline (see the module docstring); prints one block."""
    from tiny import tiny_spec

    from pipeline.models.adapter import ModelAdapter
    from pipeline.models.generation import generate, generators, to_uint8

    pipe.set_progress_bar_config(disable=True)
    model = ModelAdapter(pipe)
    call = tiny_spec(MODELS[name]).call(GUIDANCE)  # the __call__ keywords meaning the project's guidance
    n, seed = len(PROMPTS), 0

    def call_project(k: int) -> torch.Tensor:
        batches = generate(
            model, pipe.scheduler, n, n, k, GUIDANCE, seed, prompts=PROMPTS, height=size, width=size, progress=False
        )
        return torch.cat([b.images for b in batches])

    def call_pipe(k: int) -> torch.Tensor:
        out = pipe(
            prompt=PROMPTS,
            generator=generators(seed, range(n)),
            num_inference_steps=k,
            height=size,
            width=size,
            output_type="np",
            **call,
        )
        return to_uint8(torch.from_numpy(out.images).permute(0, 3, 1, 2).clamp(0, 1))

    def run(fn, k: int) -> tuple[float, torch.Tensor, int | None, int | None]:
        """(seconds, uint8 images, peak bytes allocated, peak bytes above the start) of one generation."""
        _sync(device)
        start = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
        tic = time.perf_counter()
        images = fn(k)
        _sync(device)
        seconds = time.perf_counter() - tic
        if device.type != "cuda":
            return seconds, images, None, None
        peak = torch.cuda.max_memory_allocated(device)
        return seconds, images, peak, peak - start

    sides = {"pipe": call_pipe, "project": call_project}
    tic = time.perf_counter()
    for fn in sides.values():  # warm-up: kernels, allocator, cuDNN/cuBLAS heuristics (same shapes, fewer steps)
        run(fn, min(WARMUP_STEPS, steps))
    warm = time.perf_counter() - tic
    runs: dict[str, list] = {label: [] for label in sides}
    for r in range(repeats):
        for label in sides if r % 2 == 0 else reversed(list(sides)):
            runs[label].append(run(sides[label], steps))
    t_pipe, t_proj = (min(x[0] for x in runs[label]) for label in ("pipe", "project"))
    a, b = runs["pipe"][0][1], runs["project"][0][1]
    diff = f"{int((a.int() - b.int()).abs().max())}/255" if a.shape == b.shape else f"n/a (shapes {a.shape}, {b.shape})"
    print(
        f"  {n} images x {steps} steps, {size}x{size}, guidance {GUIDANCE} ({call}); warm-ups {warm:.1f} s\n"
        f"  time: pipe __call__ {', '.join(f'{x[0]:.2f}' for x in runs['pipe'])} s (min {t_pipe:.2f}), project "
        f"{', '.join(f'{x[0]:.2f}' for x in runs['project'])} s (min {t_proj:.2f}) -> throughput ratio pipe/project "
        f"{t_pipe / t_proj:.3f} (goal >= 0.95); {n / t_proj:.2f} img/s\n"
        f"  images: max |diff| {diff}"
    )
    if device.type == "cuda":
        gib = 2**30
        p_pipe, p_proj = (max(x[2] for x in runs[label]) for label in ("pipe", "project"))
        e_pipe, e_proj = (max(x[3] for x in runs[label]) for label in ("pipe", "project"))
        print(
            f"  peak memory: pipe {p_pipe / gib:.2f} GiB ({e_pipe / gib:.2f} above the weights), project "
            f"{p_proj / gib:.2f} GiB ({e_proj / gib:.2f}) -> ratio project/pipe {p_proj / p_pipe:.3f} (goal <= 1.05; "
            f"above the weights {e_proj / max(e_pipe, 1):.3f})"
        )
    else:
        print("  peak memory: n/a (CPU)")


def _count(pipe) -> str:
    parts = []
    for attr in ("transformer", "text_encoder", "vae"):
        k = sum(p.numel() for p in getattr(pipe, attr).parameters())
        parts.append(f"{attr} {k / 1e9:.2f} B" if k >= 1e8 else f"{attr} {k / 1e6:.2f} M")
    return ", ".join(parts)


def check_full_configs(fraction: float) -> None:
    """Build the full-size pipelines on the meta device: their constructors take the configs (no memory used)."""
    meta = torch.device("meta")
    for build in BUILDERS.values():
        tic = time.perf_counter()
        pipe = build(meta, torch.bfloat16, fraction)
        total = sum(p.numel() for m in (pipe.transformer, pipe.text_encoder, pipe.vae) for p in m.parameters())
        print(
            f"full-size {type(pipe).__name__} (meta device, {time.perf_counter() - tic:.1f} s): {_count(pipe)} -> "
            f"{total * 2 / 2**30:.1f} GiB of bf16 weights"
        )
        del pipe


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run on the tests/tiny pipelines (fp32, 32 px)")
    ap.add_argument("--only", choices=sorted(BUILDERS), help="one model: klein (FLUX.2-klein-4B) or qwen (Qwen-Image)")
    ap.add_argument("--size", type=int, help="image side in px (default 1024; --tiny: the tiny test size, 32)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--layers-fraction", type=float, default=1.0, help="scale the transformers' depth (default: full)")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # every line out at once (a run killed at its time limit keeps them)
    start = time.perf_counter()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or --tiny for the CPU dry run")
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        torch.set_num_threads(1)  # a dry run: tiny ops gain nothing from threads, which spin on a shared machine
    import diffusers
    import transformers

    names = [args.only] if args.only else list(BUILDERS)
    size = args.size or (None if args.tiny else 1024)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run, tiny pipelines)"
    print(
        f"{device_name}; torch {torch.__version__}, diffusers {diffusers.__version__}, transformers "
        f"{transformers.__version__}; {dtype}; {len(PROMPTS)} prompts x {args.steps} steps, min of {args.repeats}"
    )
    est = {
        name: estimate_seconds(name, args.size or 1024, args.steps, args.repeats, args.layers_fraction)
        for name in names
    }
    print(
        "estimated GPU runtime at "
        f"{ASSUMED_TFLOPS:.0f} TFLOP/s (full size, {args.size or 1024} px, layers x{args.layers_fraction}): "
        + ", ".join(f"{name} ~{s:.0f} s" for name, s in est.items())
        + f" -> ~{sum(est.values()) + 20:.0f} s in all (goal <= 300 s on an H100)"
    )
    if args.tiny:
        check_full_configs(args.layers_fraction)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            tic = time.perf_counter()
            if args.tiny:
                from tiny import tiny_spec

                pipe = tiny_pipeline(name, Path(tmp)).to(device)  # saved in fp32
                side = size or tiny_spec(MODELS[name]).size
            else:
                pipe = BUILDERS[name](device, dtype, args.layers_fraction)
                side = size
            print(f"{name}: {type(pipe).__name__} built in {time.perf_counter() - tic:.1f} s ({_count(pipe)})")
            bench(name, pipe, device, side, args.steps, args.repeats)
            del pipe  # free the weights before the next model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            took = time.perf_counter() - tic
            print(f"  {name} done: {took:.1f} s (estimated {est[name]:.0f} s on the GPU)")
            rest = [other for other in names if names.index(other) > names.index(name)]
            if rest and not args.tiny:
                projected = time.perf_counter() - start + took / est[name] * sum(est[other] for other in rest)
                print(f"  projected total at this speed: ~{projected:.0f} s (goal <= 300 s)")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
