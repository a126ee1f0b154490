"""Generate images batch by batch from a loaded pipeline with the configured sampler.

Sample ``i`` of a run always uses the generator seeded ``seed + i`` (one generator per image), so images do
not depend on the batch size or on how a run is split into shards. Images leave as uint8 NCHW tensors
(rounded, not truncated: torchmetrics' ``normalize=True`` truncates with ``(x*255).byte()``); images with
NaN/Inf are counted and dropped, never passed on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

__all__ = ["GeneratedBatch", "is_text_conditioned", "generate", "to_uint8"]

log = logging.getLogger(__name__)


@dataclass
class GeneratedBatch:
    images: torch.Tensor  # uint8 (n_valid, 3, H, W)
    prompts: list[str] | None  # prompts of the valid images (None for unconditional pipelines)
    indices: list[int]  # global sample indices of the valid images
    num_invalid: int


def is_text_conditioned(pipe) -> bool:
    return getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float NCHW -> uint8, rounding to nearest."""
    return (images.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def _generators(seed: int, indices: Sequence[int], device: torch.device) -> list[torch.Generator]:
    # CPU generators: the same noise on every device, so CPU and GPU runs start from identical latents
    return [torch.Generator("cpu").manual_seed(seed + i) for i in indices]


@torch.no_grad()
def _sample_unconditional(pipe, sampler, n: int, steps: int, gens: list[torch.Generator], device) -> torch.Tensor:
    """Sampling loop for UNet2DModel pipelines (DDPMPipeline and kin) that also works with Euler-type solvers
    (scale_model_input, init_noise_sigma), which DDPMPipeline's own loop ignores."""
    unet = pipe.unet
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    noise = torch.stack([torch.randn((unet.config.in_channels, h, w), generator=g) for g in gens])
    x = noise.to(device=device, dtype=unet.dtype) * sampler.init_noise_sigma
    sampler.set_timesteps(steps, device=device)
    for t in sampler.timesteps:
        eps = unet(sampler.scale_model_input(x, t), t).sample
        x = sampler.step(eps, t, x, generator=gens[0]).prev_sample
    return x.float() / 2 + 0.5  # [-1, 1] -> [0, 1]; clamped later, after the NaN check


@torch.no_grad()
def _sample_text(pipe, sampler, prompts: list[str], steps: int, guidance: float, gens, device) -> torch.Tensor:
    out = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt")
    return out.images.float()


def generate(
    pipe,
    sampler,
    num_samples: int,
    batch_size: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    prompts: Sequence[str] | None = None,
    start: int = 0,
    progress: bool = True,
    desc: str = "generate",
) -> Iterator[GeneratedBatch]:
    """Yield batches of generated images for samples ``start .. start + num_samples - 1``.

    For text-conditioned pipelines sample ``i`` uses ``prompts[i % len(prompts)]``.
    """
    device = pipe.device
    conditional = is_text_conditioned(pipe)
    if conditional and not prompts:
        raise ValueError("Expected prompts for a text-conditioned pipeline, got none")
    sampler = type(sampler).from_config(sampler.config)  # a private copy: solvers keep state between steps
    pipe.scheduler = sampler
    bar = tqdm(total=num_samples, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for lo in range(start, start + num_samples, batch_size):
            idx = list(range(lo, min(lo + batch_size, start + num_samples)))
            gens = _generators(seed, idx, device)
            if conditional:
                batch_prompts = [prompts[i % len(prompts)] for i in idx]
                images = _sample_text(pipe, sampler, batch_prompts, num_inference_steps, guidance_scale, gens, device)
            else:
                batch_prompts = None
                images = _sample_unconditional(pipe, sampler, len(idx), num_inference_steps, gens, device)
            valid = torch.isfinite(images.reshape(len(idx), -1)).all(dim=1).cpu()
            n_bad = int((~valid).sum())
            if n_bad:
                log.warning("%d generated image(s) with NaN/Inf in samples %d..%d: excluded", n_bad, idx[0], idx[-1])
            keep = [i for i, ok in zip(idx, valid.tolist()) if ok]
            yield GeneratedBatch(
                images=to_uint8(images[valid].clamp(0, 1)).cpu(),
                prompts=[p for p, ok in zip(batch_prompts, valid.tolist()) if ok] if batch_prompts else None,
                indices=keep,
                num_invalid=n_bad,
            )
            bar.update(len(idx))
    finally:
        bar.close()
