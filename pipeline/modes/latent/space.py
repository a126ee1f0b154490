"""The latent space of any family, seen through the model adapter: images ↔ z, unit noise, conditions without CFG,
and the deterministic image ↔ noise path of the family (DDIM for ε/v models, the flow ODE for SD3/Flux).

"z" is the VAE latent of a latent pipeline (unpacked (C, h, w), also for Flux) and the pixels x ∈ [-1, 1] of a
pixel pipeline (DDPMPipeline). Reference images are resized to the model's resolution (bilinear, antialiased).
Nothing here calls ``pipe.unet`` / ``pipe.transformer``: every model call is ``ModelAdapter.denoise``.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from pipeline.models.adapter import Conditioning
from pipeline.models.generation import generators, sample
from pipeline.modes.latent import inversion as I

__all__ = ["LatentSpace"]

log = logging.getLogger(__name__)


@dataclass
class LatentSpace:
    model: Any  # pipeline.models.adapter.ModelAdapter
    sampler: Any  # the configured solver (PPL generations; flow models: the σ grid of inversion)
    hw: tuple[int, int]  # pixel resolution
    steps: int
    batch_size: int
    guidance: float
    eta: float
    ddim_config: dict  # ε/v models: the DDIM inversion/regeneration pair's scheduler config

    @property
    def latent(self) -> bool:
        return self.model.vae is not None

    @property
    def flow(self) -> bool:
        return self.model.family.flow

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.model.latent_shape(*self.hw))

    @property
    def device(self):
        return self.model.device

    @property
    def dtype(self):
        return self.model.dtype

    # ---- pixels <-> z
    def load(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float [-1, 1] at the model's resolution, on its device."""
        x = images.float() / 127.5 - 1
        if tuple(x.shape[-2:]) != self.hw:
            x = F.interpolate(x, size=self.hw, mode="bilinear", antialias=True, align_corners=False)
        return x.to(self.device, self.dtype)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x) if self.latent else x

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (unpacked) -> pixels in [-1, 1] (clamped, float32)."""
        x = (self.model.decode(self.model.pack(z), *self.hw) - 0.5) * 2 if self.latent else z
        return x.float().clamp(-1, 1)

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """Unit-variance z-shaped noise, one CPU generator per seed (device independent), float32."""
        return torch.stack(
            [torch.randn(self.shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
        ).to(self.device)

    # ---- conditions
    def plain(self, prompts: Sequence[str] | None = None, n: int | None = None) -> Conditioning:
        """A condition without CFG (inversion with guidance drifts): the prompts for text models, else the null
        condition (class-conditional models: the null class; unconditional: nothing)."""
        if self.model.text and prompts is not None:
            g = self.model.plain_guidance(self.guidance)  # a distilled-guidance family keeps its own
            return self.model.condition(len(prompts), g, *self.hw, prompts=list(prompts))
        return self.model.null_condition(len(prompts) if prompts is not None else int(n), *self.hw, self.guidance)

    def guided(
        self, n: int, prompts: Sequence[str] | None = None, class_ids: Sequence[int] | None = None
    ) -> Conditioning:
        """The run's generation condition (CFG as configured) for ``n`` samples."""
        if self.model.class_conditional and class_ids is None:
            class_ids = [i % self.model.num_classes for i in range(n)]
        return self.model.condition(n, self.guidance, *self.hw, prompts=prompts, class_ids=class_ids)

    def fn(self, cond: Conditioning):
        """(x in the denoiser's layout, t) -> raw model output (ε, v, x₀ or flow velocity)."""
        return lambda x, t: self.model.denoise(x, t, cond, sampler=None)

    # ---- the deterministic path image <-> noise
    def sigmas(self) -> torch.Tensor:
        """The configured flow solver's σ grid at this size (descending, ending at 0)."""
        sched = type(self.sampler).from_config(self.sampler.config)
        self.model.set_timesteps(sched, self.steps, *self.hw)
        return sched.sigmas.detach().cpu()

    @torch.no_grad()
    def invert(self, z: torch.Tensor, cond: Conditioning, progress=None) -> torch.Tensor:
        """Clean z -> its noise along the family's deterministic path (packed for Flux)."""
        x = self.model.pack(z)
        if self.flow:
            return I.flow_invert(self.fn(cond), self.sigmas(), x, progress)
        return I.ddim_invert(self.fn(cond), self.ddim_config, x, self.steps, progress)

    @torch.no_grad()
    def regenerate(self, x_T: torch.Tensor, cond: Conditioning, progress=None) -> torch.Tensor:
        """The mirror of :meth:`invert`: noise (packed for Flux) -> clean z (unpacked)."""
        if self.flow:
            x = I.flow_sample(self.fn(cond), self.sigmas(), x_T, progress)
        else:
            x = I.ddim_sample(self.fn(cond), self.ddim_config, x_T, self.steps, progress)
        return self.model.unpack(x, *self.hw)

    @torch.no_grad()
    def reconstruct(
        self, z: torch.Tensor, level: int, steps: int, noise: torch.Tensor, cond: Conditioning, num_train_timesteps: int
    ) -> torch.Tensor:
        """DDPM-OOD: z noised to training timestep ``level`` (flow: σ = level / T) and brought back in ``steps``."""
        x, e = self.model.pack(z), self.model.pack(noise.to(z.dtype))
        if self.flow:
            out = I.flow_reconstruct(self.fn(cond), x, level / num_train_timesteps, steps, e)
        else:
            c = self.ddim_config
            clip = float(c.get("clip_sample_range", 1.0)) if (not self.latent and c.get("clip_sample")) else None
            ac = _alphas_cumprod(c)
            out = I.diffusion_reconstruct(
                self.fn(cond), ac, x, level, steps, e, c.get("prediction_type", "epsilon"), clip
            )
        return self.model.unpack(out, *self.hw)

    # ---- generation through the one generation path
    @torch.no_grad()
    def generate(self, z: torch.Tensor, cond: Conditioning, seeds: Sequence[int]) -> torch.Tensor:
        """Unit noise z -> images in [0, 1] (float32, CPU) with the configured sampler; sample ``k``'s stochastic
        solver steps draw from the CPU generator ``seeds[k] + 7``."""
        gens = generators(7, seeds)
        out = sample(
            self.model, self.sampler, cond, gens, self.steps, *self.hw, eta=self.eta, latents=z.to(self.model.dtype)
        )
        return out.float().clamp(0, 1).cpu()


def ddim_config(sampler_config: dict) -> dict:
    """The sampler's config for the DDIM inversion pair (``timestep_spacing`` as DDIMInverseScheduler takes it)."""
    sc = dict(sampler_config)
    if sc.get("timestep_spacing") not in ("leading", "trailing"):
        log.info(
            "DDIM inversion: timestep_spacing %r not supported by DDIMInverseScheduler; using 'leading'",
            sc.get("timestep_spacing"),
        )
        sc["timestep_spacing"] = "leading"
    return sc


def _alphas_cumprod(config: dict) -> torch.Tensor:
    from diffusers import DDIMScheduler

    params = inspect.signature(DDIMScheduler.__init__).parameters
    return DDIMScheduler.from_config(
        {k: v for k, v in config.items() if k in params or k.startswith("_")}
    ).alphas_cumprod
