"""Generation throughput through the project vs the raw-UNet bound, on an SD 1.5-architecture pipeline with random
weights (components built from the published configs: nothing downloaded), fp16 on CUDA.

Baseline ("raw-UNet bound"): the UNet alone, ``steps`` forward calls at the CFG batch 2B on random inputs — what
generation cannot beat. Measured: ``pipeline.models.generation.generate`` (the one generation path: text encoding, the
solver loop through the adapter, VAE decode, uint8 conversion) at batch B. Printed separately: UNet, text-encoding
and VAE-decode time per batch. Goal: throughput ratio >= 0.88.

Attention section (``--attention``): generation inside the attention capture (``pipeline.modes.attention.capture``
around ``pipeline.models.generation.sample``, as the attention stage drives it: snapshot at step ``steps // 2``,
``denoiser_call_steps``, the CFG flag; then ``aggregate()`` and ``snapshots()`` read back to the CPU) vs plain
generation through the same path with the stock SDPA processors — same adapter, prompts, seeds, steps, guidance,
batch; warm-up, then interleaved plain/capture pairs, minimum of each. Both sides include prompt encoding. Also the
peak extra GPU memory of the capture: ``torch.cuda.max_memory_allocated`` of a capture run minus that of a plain
run (n/a on the CPU), and the bytes the capture's running sums hold. Two models: the SD 1.5 pipeline above (8
prompts, 25 steps, 512²: 16 cross-attention layers at 64², 32², 16², 8² tokens) and an SDXL-architecture pipeline
with random weights (UNet, VAE and the CLIP-L + OpenCLIP-bigG text encoders from the published SDXL-base configs;
4 prompts, 10 steps, Euler, 512²: 70 cross-attention layers at 32² and 16² tokens). Goal: capture / plain <= 1.3.

Latent section (``--latent``): on the SDXL-architecture pipeline in fp16 at 512² (random weights), the latent mode's
parts ``vae``, ``interpolation`` and ``inversion`` through ``pipeline.modes.latent.space.LatentSpace`` with small counts
(2 images, 10 steps): VAE round trip (``force_upcast``), a slerp midpoint generated in float32 (the PPL path) and a
DDIM inversion round trip; prints whether every output is finite (no NaN), the PSNRs, timings and peak memory.

    python bench/gpu_throughput.py                 # on a GPU machine: batches 8 and 16, 25 steps, fp16
    python bench/gpu_throughput.py --attention     # ... and the attention capture section (< 5 min on an H200)
    python bench/gpu_throughput.py --tiny          # CPU dry run of the script with tiny components
    python bench/gpu_throughput.py --tiny --attention
    python bench/gpu_throughput.py --batches --attention --latent   # attention + latent sections only
    python bench/gpu_throughput.py --batches --cost   # the cost section only (--tiny --cost: its CPU dry run)

Cost section (``--cost``, issue 29): 64 images of the SD 1.5 architecture (fp16, 512², batch 16, 25 steps, guidance
7.5) through ``generate(cost=True)`` with the run's meters (``pipeline.core.cost``): the ``cost/*`` scalars a metrics
run logs — energy per image from NVML's total-energy counter (``pip install nvidia-ml-py``), CUDA allocated/reserved
peaks, FLOPs — printed next to ``nvidia-smi``'s own reading (memory used while the weights are held; power draw
sampled during generation, × wall time as its energy estimate).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def sd15_pipeline(tmp: Path, tiny: bool, device: torch.device = torch.device("cpu")):
    """StableDiffusionPipeline with SD 1.5's UNet / VAE / CLIP-L architecture (random weights); ``tiny`` shrinks it.
    The networks are initialised on ``device`` (a GPU initialises the random weights in a fraction of the time)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pipeline.data.shapes import vocabulary
    from pipeline.zoo.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer([*vocabulary(), "photo", "cat", "dog"], tmp / "tok", model_max_length=77)
    with torch.device(device):
        unet, vae, text = _sd15_networks(tok, tiny)
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sd15_networks(tok, tiny: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if tiny:
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
        vae = AutoencoderKL(
            block_out_channels=(16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
        )
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tok),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=77,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
            )
        )
    else:  # the published SD 1.5 configs (runwayml/stable-diffusion-v1-5 unet/vae/text_encoder config.json)
        unet = UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=512,
        )
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
            )
        )
    return unet, vae, text


def sdxl_pipeline(tmp: Path, tiny: bool, device: torch.device = torch.device("cpu")):
    """StableDiffusionXLPipeline with SDXL-base's UNet / VAE / CLIP-L + OpenCLIP-bigG architecture (random weights,
    initialised on ``device``); ``tiny`` shrinks it (two 32-wide text encoders, a 2-level UNet, a 2-level VAE)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pipeline.data.shapes import vocabulary
    from pipeline.zoo.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer([*vocabulary(), "photo", "cat", "dog"], tmp / "tok_xl", model_max_length=77)
    with torch.device(device):
        if tiny:  # as tests/tiny/__init__.py's tiny_sdxl: 2 transformer layers at the lower level, text dims 32 + 32
            clip = dict(
                vocab_size=len(tok),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=32,
            )
            clip.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
            text, text_2 = CLIPTextModel(CLIPTextConfig(**clip)), CLIPTextModelWithProjection(CLIPTextConfig(**clip))
            unet = UNet2DConditionModel(
                sample_size=8,
                block_out_channels=(32, 64),
                layers_per_block=1,
                norm_num_groups=8,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(2, 4),
                transformer_layers_per_block=(1, 2),
                use_linear_projection=True,
                cross_attention_dim=64,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32,
            )
            vae = AutoencoderKL(
                block_out_channels=(16, 16),
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2,
                force_upcast=True,
            )
        else:  # the published configs (stabilityai/stable-diffusion-xl-base-1.0 unet/vae/text_encoder(_2) config.json)
            text = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=49408,
                    hidden_size=768,
                    intermediate_size=3072,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    max_position_embeddings=77,
                    hidden_act="quick_gelu",
                    projection_dim=768,
                )
            )
            text_2 = CLIPTextModelWithProjection(
                CLIPTextConfig(
                    vocab_size=49408,
                    hidden_size=1280,
                    intermediate_size=5120,
                    num_hidden_layers=32,
                    num_attention_heads=20,
                    max_position_embeddings=77,
                    hidden_act="gelu",
                    projection_dim=1280,
                )
            )
            unet = UNet2DConditionModel(
                sample_size=128,
                block_out_channels=(320, 640, 1280),
                layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(5, 10, 20),
                transformer_layers_per_block=(1, 2, 10),
                use_linear_projection=True,
                cross_attention_dim=2048,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            )
            vae = AutoencoderKL(
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                sample_size=1024,
                scaling_factor=0.13025,
                force_upcast=True,
            )
    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched
    )


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


ATTENTION_PROMPTS = [
    "a photo of a red circle on the left",
    "a blue square on the right and a cat on the left",
    "a photo of a dog",
    "a green triangle on the left and a yellow cross on the right",
]


def _cuda_peak(device: torch.device, since: int) -> int | None:
    """Bytes allocated at the peak since the last reset, above ``since`` (None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) - since if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def attention_overhead(
    label: str,
    pipe,
    n: int,
    steps: int,
    size: tuple[int, int] | None,
    device: torch.device,
    repeats: int,
    guidance: float = 7.5,
) -> None:
    """Generation inside the attention capture vs plain generation (see the module docstring), one line per model."""
    from pipeline.models.adapter import ModelAdapter
    from pipeline.models.generation import denoiser_call_steps, generators, sample
    from pipeline.modes.attention.capture import capture

    model = ModelAdapter(pipe)
    h, w = size or model.native_size()
    layout = model.attention_layout(h, w)
    prompts = [ATTENTION_PROMPTS[i % len(ATTENTION_PROMPTS)] for i in range(n)]
    valid = [layout.tokens(p).num_tokens for p in prompts] if layout.renormalise else None
    sampler = pipe.scheduler
    call_steps = {k: denoiser_call_steps(model, sampler, k, h, w) for k in {2, steps}}

    def run(with_capture: bool, k: int = steps) -> tuple[float, int | None, int]:
        """(seconds, peak bytes above the start, bytes the capture holds) of one batch."""
        start = _reset_peak(device)
        tic = time.perf_counter()
        cond = model.condition(n, guidance, h, w, prompts=prompts)
        held = 0
        if with_capture:
            with capture(model, h, w, {k // 2}, call_steps[k], cfg=cond.cfg, valid_tokens=valid) as cap:
                sample(model, sampler, cond, generators(0, range(n)), k, h, w)
            _ = cap.aggregate(), cap.snapshots()  # what the attention stage reads back (CPU)
            held = cap.nbytes
        else:
            sample(model, sampler, cond, generators(0, range(n)), k, h, w)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - tic, _cuda_peak(device, start), held

    def one_call(with_capture: bool) -> int | None:
        """Peak bytes of one guided denoiser call above what was allocated before it (None on the CPU)."""
        sched = type(sampler).from_config(sampler.config)
        model.set_timesteps(sched, steps, h, w)
        cond = model.condition(n, guidance, h, w, prompts=prompts)
        x = model.initial_noise(generators(0, range(n)), h, w)
        t = sched.timesteps[len(sched.timesteps) // 2]
        start = _reset_peak(device)
        if with_capture:
            with capture(model, h, w, (), [0], cfg=cond.cfg, valid_tokens=valid):
                model.denoise(x, t, cond, sched)
        else:
            model.denoise(x, t, cond, sched)
        return _cuda_peak(device, start)

    run(False, 2)  # warm-up (kernels, allocator, cuDNN/cuBLAS heuristics)
    run(True, 2)
    runs: dict[bool, list] = {False: [], True: []}
    for _ in range(repeats):
        for with_capture in (False, True):
            runs[with_capture].append(run(with_capture))
    plain, capt = min(r[0] for r in runs[False]), min(r[0] for r in runs[True])
    print(
        f"attention {label}: {len(layout.layers)} cross-attention layers, {n} prompts x {steps} steps, {h}x{w}"
        f"{', CFG' if model.uses_cfg(guidance) else ''}: plain {plain:.3f} s, capture {capt:.3f} s -> "
        f"{capt / plain:.3f}x (goal <= 1.3x)"
    )
    held = runs[True][0][2]
    call_plain, call_capt = one_call(False), one_call(True)
    if device.type == "cuda":
        gen_plain, gen_capt = max(r[1] for r in runs[False]), max(r[1] for r in runs[True])
        mib = 2**20
        print(
            f"          peak extra GPU memory of the capture: generation {(gen_capt - gen_plain) / mib:+.0f} MiB "
            f"(peak above the weights {gen_plain / mib:.0f} -> {gen_capt / mib:.0f} MiB; the VAE decode may set "
            f"both); one denoiser call {(call_capt - call_plain) / mib:+.0f} MiB ({call_plain / mib:.0f} -> "
            f"{call_capt / mib:.0f} MiB); the capture's sums hold {held / mib:.1f} MiB"
        )
    else:
        print(
            f"          peak extra GPU memory of the capture: n/a (CPU); the capture's sums hold {held / 2**20:.2f} MiB"
        )


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny components on the CPU (a dry run of the script)")
    ap.add_argument("--batches", type=int, nargs="*", default=[8, 16], help="none: skip the throughput section")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--attention",
        action="store_true",
        help="also time the attention capture vs plain generation (SD 1.5 and SDXL architectures)",
    )
    ap.add_argument("--latent", action="store_true", help="also run the latent check on the SDXL architecture")
    ap.add_argument("--cost", action="store_true", help="also the cost/* figures of 64 images, next to nvidia-smi's")
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.tiny:
        torch.set_num_threads(1)  # a dry run: tiny ops gain nothing from threads, which spin on a shared machine
    from pipeline.models.adapter import ModelAdapter
    from pipeline.models.generation import generate

    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        pipe = sd15_pipeline(Path(tmp), args.tiny, device).to(device, dtype)
        pipe.set_progress_bar_config(disable=True)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(
            f"{name}, {dtype}, SD 1.5 architecture{' (tiny)' if args.tiny else ''}, built in "
            f"{time.perf_counter() - tic:.1f} s; {args.steps} steps, guidance 7.5, min of {args.repeats}"
        )
        model = ModelAdapter(pipe)
        h, w = model.native_size()
        c, lh, lw = model.latent_shape(h, w)
        for b in args.batches:
            prompts = ["a photo of a red circle on the left"] * b
            cond = model.condition(b, 7.5, h, w, prompts=prompts)
            x = torch.randn(2 * b, c, lh, lw, device=device, dtype=dtype)
            t = torch.tensor(500, device=device)
            emb = cond.kwargs["encoder_hidden_states"]
            unet = timed(
                lambda: [pipe.unet(x, t, encoder_hidden_states=emb) for _ in range(args.steps)], device, args.repeats
            )
            text = timed(lambda: model.condition(b, 7.5, h, w, prompts=prompts), device, args.repeats)
            z = torch.randn(b, c, lh, lw, device=device, dtype=dtype)
            vae = timed(lambda: model.decode(z, h, w), device, args.repeats)
            gen = timed(
                lambda: list(
                    generate(model, pipe.scheduler, b, b, args.steps, 7.5, 0, prompts=prompts, progress=False)
                ),
                device,
                args.repeats,
            )
            print(
                f"batch {b:>3}: UNet {unet:.3f} s ({b / unet:.2f} img/s bound) | text {text * 1e3:.1f} ms | "
                f"VAE decode {vae * 1e3:.1f} ms | generate {gen:.3f} s ({b / gen:.2f} img/s) -> "
                f"{unet / gen:.3f} of the raw-UNet bound (goal >= 0.88)"
            )
            if device.type == "cuda":
                print(f"          peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
        if args.cost:
            cost_check(pipe, model, device, 8 if args.tiny else 64, 4 if args.tiny else 16, args.steps)
        if not (args.attention or args.latent):
            return
        if args.attention:
            attention_overhead("SD 1.5", pipe, 8, 25, None if args.tiny else (512, 512), device, args.repeats)
        pipe = model = None  # free the SD 1.5 weights before the next part
        if device.type == "cuda":
            torch.cuda.empty_cache()
        tic = time.perf_counter()
        pipe = sdxl_pipeline(Path(tmp), args.tiny, device).to(device, dtype)
        pipe.set_progress_bar_config(disable=True)
        print(
            f"SDXL architecture{' (tiny)' if args.tiny else ''}, built in {time.perf_counter() - tic:.1f} s; "
            f"Euler, guidance 7.5, min of {args.repeats}"
        )
        if args.attention:
            attention_overhead("SDXL", pipe, 4, 10, None if args.tiny else (512, 512), device, args.repeats)
        if args.latent:
            latent_check(pipe, device, args.tiny)


def _smi(query: str) -> list[str] | None:
    """``nvidia-smi --query-gpu=<query>`` of GPU 0 as strings, None without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True,
        text=True,
    )
    return [v.strip() for v in out.stdout.strip().split(",")] if out.returncode == 0 else None


def cost_check(pipe, model, device: torch.device, n: int, batch: int, steps: int) -> None:
    """The cost meters of a metrics run on ``n`` generated images, and nvidia-smi's reading beside them."""
    from pipeline.core import cost as C
    from pipeline.models.generation import generate, nfe

    energy = C.EnergyCounter(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    h, w = model.native_size()
    prompts = [f"a photo of a {c} cat" for c in ("red", "green", "blue", "yellow")]
    power: list[float] = []
    done = threading.Event()

    def sample_power() -> None:  # nvidia-smi's power draw every 0.2 s while generating
        while not done.wait(0.2):
            got = _smi("power.draw")
            if got:
                power.append(float(got[0]))

    sampler = threading.Thread(target=sample_power, daemon=True)
    sampler.start()
    batches, joules, start = [], energy.read(), time.perf_counter()
    tic = start
    for b in generate(model, pipe.scheduler, n, batch, steps, 7.5, 0, prompts=prompts, progress=False, cost=True):
        now, reading = time.perf_counter(), energy.read()
        meters = {"timings": b.timings, "peak_rss_mb": C.peak_rss_mb()}
        peaks = C.cuda_peaks_mb(device)
        if peaks is not None:
            meters["cuda_max_allocated_mb"], meters["cuda_max_reserved_mb"] = peaks
        if reading is not None and joules is not None:
            meters["energy_joules"] = reading - joules
        else:
            meters["energy_skipped"] = energy.reason or "not readable"
        batches.append((len(b.indices) + b.num_invalid, now - tic, 0.0, meters))
        tic, joules = now, reading
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    smi_memory = _smi("name,memory.used,memory.total")
    out, why = C.run_cost(batches, nfe(model, pipe.scheduler, steps, h, w))
    print(f"cost of {n} images (batch {batch}, {steps} steps, {h}x{w}), energy source {energy.source or 'none'}:")
    for key, value in sorted(out.items()):
        print(f"  {key} = {value:.6g}")
    for key, reason in sorted(why.items()):
        print(f"  {key}: skipped ({reason})")
    if smi_memory:
        print(f"  nvidia-smi: {smi_memory[0]}, memory used {smi_memory[1]} / {smi_memory[2]} MiB (process + context)")
    if power:
        mean = sum(power) / len(power)
        print(
            f"  nvidia-smi: power draw mean {mean:.1f} W over {len(power)} samples -> {mean * wall / n:.2f} J per image "
            f"(vs cost/energy_joules_per_image above)"
        )
    elif device.type == "cuda":
        print("  nvidia-smi: not available")


def latent_check(pipe, device: torch.device, tiny: bool) -> None:
    """vae, interpolation (float32 PPL path) and inversion on one pipeline, small counts: finite outputs?"""
    import torch.nn.functional as F

    from pipeline.metrics.image import psnr
    from pipeline.models.adapter import ModelAdapter
    from pipeline.modes.latent.interpolation import slerp
    from pipeline.modes.latent.space import LatentSpace, ddim_config

    model = ModelAdapter(pipe)
    size = model.native_size() if tiny else (512, 512)
    space = LatentSpace(model, pipe.scheduler, size, 10, 2, 5.0, 0.0, ddim_config(pipe.scheduler.config))
    g = torch.Generator().manual_seed(0)
    images = (F.interpolate(torch.rand(2, 3, 8, 8, generator=g), size=size, mode="bilinear") * 255).to(torch.uint8)
    base = _reset_peak(device)
    tic = time.perf_counter()
    x = space.load(images)
    rec = space.decode(space.encode(x))
    vae_s = time.perf_counter() - tic
    prompts = ["a photo of a red circle on the left", "a photo of a blue square on the right"]
    tic = time.perf_counter()
    with model.float32():
        mid = space.generate(
            slerp(space.noise([0, 1]), space.noise([2, 3]), 0.5), space.guided(2, prompts=prompts), [0, 1]
        )
    ppl_s = time.perf_counter() - tic
    tic = time.perf_counter()
    cond = space.plain(prompts)
    inv = space.decode(space.regenerate(space.invert(space.encode(x), cond), cond))
    inv_s = time.perf_counter() - tic
    finite = {
        name: bool(torch.isfinite(t).all()) for name, t in (("vae", rec), ("interpolation", mid), ("inversion", inv))
    }
    peak = _cuda_peak(device, base)
    print(
        f"latent SDXL {size[0]}x{size[1]} in {model.dtype}: finite {finite} (VAE force_upcast="
        f"{getattr(model.vae.config, 'force_upcast', None)}); VAE round trip PSNR "
        f"{psnr((x.float() / 2 + 0.5).cpu(), (rec / 2 + 0.5).cpu()).mean():.1f} dB ({vae_s:.1f} s), float32 slerp "
        f"midpoint ({ppl_s:.1f} s), DDIM inversion PSNR {psnr((x.float() / 2 + 0.5).cpu(), (inv / 2 + 0.5).cpu()).mean():.1f}"
        f" dB ({inv_s:.1f} s); peak extra memory " + ("n/a (CPU)" if peak is None else f"{peak / 2**30:.2f} GiB")
    )


if __name__ == "__main__":
    main()
