"""The one room that knows how to drive a loaded diffusers pipeline, whatever its family.

Stages never touch ``pipe.unet`` / ``pipe.transformer`` / ``pipe.vae``: they ask a :class:`ModelAdapter` for
prompt (or class) conditioning, one guided denoiser call, VAE encode/decode, the latent shape of a size and
per-sample initial noise. Each family is driven exactly as its own diffusers pipeline's ``__call__`` does
(diffusers 0.42; the oracle test compares images against ``pipe(...)`` called one image at a time). What differs
between families lives in one file per family under :mod:`pipeline.models.families` (SD 1.x/2.x, SDXL, PixArt,
SD3, Flux, DiT, DDPM/LDM); the adapter dispatches to the pipeline class's driver and keeps what all share.

Conventions: CFG is ``u + g (c − u)`` (Ho & Salimans 2022, as diffusers) and is used when ``g > 1`` (UNets with a
guidance embedding — LCM — take ``g`` as ``timestep_cond`` instead, as the SD pipelines do; Flux's guidance is
distilled). Initial noise is ``randn_tensor`` with one generator per sample (the pipelines' own draw), times the
solver's ``init_noise_sigma``. A decoded image is ``D(z)/2 + 0.5`` (not yet clamped: the caller checks for NaN
first). The VAE is run in float32 when the model is float16 and its config sets ``force_upcast`` (SDXL's VAE
overflows in fp16).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor

from pipeline.errors import UserError
from pipeline.models.attention import AttentionLayout
from pipeline.models.families.base import FamilyDriver, image_tokens
from pipeline.models.family import Family, driver_of
from pipeline.models.native import NativeCall
from pipeline.models.schedulers import set_diffusion_timesteps, set_flow_timesteps

__all__ = ["ModelAdapter", "Conditioning", "AttentionLayout"]

log = logging.getLogger(__name__)


@dataclass
class Conditioning:
    """Everything the denoiser needs besides (x, t) for one batch: keyword tensors with the CFG halves already
    concatenated, whether CFG applies, and the guidance scale."""

    kwargs: dict[str, Any]
    cfg: bool
    guidance: float
    n: int
    prompts: list[str] | None = None
    class_ids: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ModelAdapter:
    """How to drive one loaded pipeline. Build with ``ModelAdapter(pipe, mode=...)``: an unsupported pipeline
    class is a :class:`UserError` naming the class, the mode and the supported families."""

    def __init__(self, pipe, mode: str | None = None):
        self.pipe = pipe
        driver = driver_of(pipe, mode)
        self.family: Family = driver.family
        self.native = driver is NativeCall  # its own __call__ makes the images (pipeline.models.native)
        if self.native:
            self.denoiser, self.vae = None, getattr(pipe, "vae", None)
            self.driver: FamilyDriver = driver(self)
            return
        self.denoiser = getattr(pipe, self.family.denoiser, None)
        if self.denoiser is None:
            raise UserError(f"model.path: {type(pipe).__name__} has no {self.family.denoiser!r} component")
        self.vae = getattr(pipe, self.family.vae_attr, None) if self.family.space == "latent" else None
        if self.family.space == "latent" and self.vae is None:
            raise UserError(f"model.path: {type(pipe).__name__} has no {self.family.vae_attr!r} component")
        if (
            self.family.conditioning == "text"
            and getattr(pipe, "text_encoder", None) is None
            and getattr(pipe, "text_encoder_2", None) is None
        ):
            raise UserError(f"model.path: {type(pipe).__name__} has no text encoder")
        self.driver: FamilyDriver = driver(self)

    # ------------------------------------------------------------------ what the model is
    @property
    def name(self) -> str:
        return self.family.name

    @property
    def text(self) -> bool:
        return self.family.conditioning == "text"

    @property
    def class_conditional(self) -> bool:
        return self.family.conditioning == "class"

    @property
    def device(self) -> torch.device:
        return self.pipe.device if self.native else self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.dtype if self.native else self.denoiser.dtype

    @property
    def tokenizer(self):
        """The tokenizer whose tokens the cross-attention sees first (CLIP for SD/SDXL/SD3, T5 for PixArt)."""
        return getattr(self.pipe, "tokenizer", None)

    @property
    def num_classes(self) -> int | None:
        if not self.class_conditional:
            return None
        return int(self.denoiser.config.num_embeds_ada_norm)

    def supports(self, mode: str) -> bool:
        """Whether the family declares ``mode`` (any other is refused up front)."""
        return self.family.supports(mode)

    def prediction_type(self, scheduler_config: dict | None = None) -> str:
        """``flow`` for rectified-flow models, else the scheduler config's ``prediction_type`` (ε by default)."""
        if self.family.flow:
            return "flow"
        config = scheduler_config if scheduler_config is not None else dict(self.pipe.scheduler.config)
        return str(config.get("prediction_type") or "epsilon")

    @property
    def vae_scale(self) -> int:
        """Pixels per latent pixel (1 for pixel-space models)."""
        return self.driver.vae_scale()

    @property
    def latent_channels(self) -> int:
        return self.driver.latent_channels

    def native_size(self) -> tuple[int, int]:
        """(height, width) in pixels the model was trained at (its pipeline's default)."""
        return self.driver.native_size()

    def resolve_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The size to generate at: ``sampler.height/width`` or the native size, checked against what the family
        can draw (fixed-size families only their native size)."""
        nh, nw = self.native_size() if self.driver.fixed_size or not (height and width) else (height, width)
        h, w = int(height or nh), int(width or nw)
        if self.driver.fixed_size and (h, w) != (nh, nw):
            raise UserError(
                f"sampler.height/width={h}x{w}: {type(self.pipe).__name__} draws only its native size "
                f"{nh}x{nw}; unset sampler.height and sampler.width"
            )
        multiple = self.driver.size_multiple()
        if h % multiple or w % multiple:
            raise UserError(f"sampler.height/width={h}x{w}: {type(self.pipe).__name__} needs multiples of {multiple}")
        return h, w

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of one unpacked latent (pixels for pixel-space models)."""
        return self.driver.latent_shape(height, width)

    def attention_layout(self, height: int, width: int) -> AttentionLayout:
        """The family's text→image attention at this size (diffusers 0.42 module names). Refused (UserError naming
        the pipeline class) for models without text conditioning."""
        return self.driver.attention_layout(height, width)

    # ------------------------------------------------------------------ noise
    def initial_noise(
        self, generators: Sequence[torch.Generator], height: int, width: int, init_noise_sigma: float = 1.0
    ) -> torch.Tensor:
        """The pipelines' own first draw: ``randn_tensor`` with one generator per sample (so an image never depends
        on its batch), in the model dtype, times the solver's ``init_noise_sigma``; Flux's packed 2×2."""
        return self.driver.initial_noise(generators, height, width, init_noise_sigma)

    def add_noise(self, sched, latents: torch.Tensor, gens: Sequence[torch.Generator], t: torch.Tensor) -> torch.Tensor:
        """Clean (unpacked) latents noised to solver timestep ``t`` in the solver's own convention — flow models
        ``(1 − σ)·x₀ + σ·ε`` (FlowMatch solvers' ``scale_noise``; DPM-Solver++ / UniPC on flow sigmas, e.g. Sana's
        native solver, give the same through ``add_noise``: α_t = 1 − σ, σ_t = σ), the others ``add_noise`` (DDPM:
        √ᾱ·x₀ + √(1−ᾱ)·ε; Euler-type: x₀ + σ·ε) — with per-sample noise; Flux's packed 2×2. ``t`` must be one of
        ``sched.timesteps``."""
        noise = randn_tensor(latents.shape, generator=list(gens), device=self.device, dtype=self.dtype)
        latents = latents.to(self.device, self.dtype)
        t = torch.as_tensor(t, device=self.device).reshape(1)
        if self.family.flow and hasattr(sched, "scale_noise"):
            x = sched.scale_noise(latents, t, noise)
        else:
            x = sched.add_noise(latents, noise, t.expand(latents.shape[0]))
        return self.pack(x)

    def pack(self, z: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) latents -> what the denoiser takes (Flux: 2×2-packed sequences); identity for the others."""
        return self.driver.pack(z)

    def unpack(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed sequence latents -> (N, C, h, w) (Flux); identity for the others."""
        return self.driver.unpack(latents, height, width)

    # ------------------------------------------------------------------ conditioning
    def uses_cfg(self, guidance: float) -> bool:
        """Whether ``guidance`` is applied as classifier-free guidance (a [uncond, cond] batch)."""
        return self.driver.uses_cfg(guidance)

    def plain_guidance(self, guidance: float) -> float:
        """The guidance scale a condition *without* CFG keeps: 1, or the run's for a distilled-guidance family
        (Flux's guidance embedding)."""
        return self.driver.plain_guidance(guidance)

    @torch.no_grad()
    def condition(
        self,
        n: int,
        guidance: float,
        height: int,
        width: int,
        prompts: Sequence[str] | None = None,
        class_ids: Sequence[int] | None = None,
    ) -> Conditioning:
        """Conditioning for ``n`` samples: prompts (text families), class ids (DiT) or nothing (unconditional)."""
        cfg = self.uses_cfg(guidance)
        if self.text:
            if not prompts or len(prompts) != n:
                raise ValueError(f"Expected {n} prompts for a text-to-image model, got {len(prompts or [])}")
            kwargs = self.driver.encode(list(prompts), cfg, guidance, height, width)
            return Conditioning(kwargs, cfg, guidance, n, prompts=list(prompts))
        if self.class_conditional:
            if class_ids is None or len(class_ids) != n:
                raise ValueError(f"Expected {n} class ids for a class-conditional model, got {len(class_ids or [])}")
            bad = [c for c in class_ids if not 0 <= int(c) < self.num_classes]
            if bad:
                raise UserError(f"mode.metrics.class_ids: {bad[:5]} outside 0..{self.num_classes - 1}")
            labels = torch.tensor([int(c) for c in class_ids], device=self.device)
            kwargs = self.driver.class_kwargs(labels, cfg)
            return Conditioning(kwargs, cfg, guidance, n, class_ids=[int(c) for c in class_ids])
        return Conditioning({}, False, guidance, n)

    @torch.no_grad()
    def null_condition(self, n: int, height: int, width: int, guidance: float = 1.0) -> Conditioning:
        """The model's "no condition" without CFG: the empty prompt (text), the null class (class-conditional —
        DiT's ``num_embeds_ada_norm``), nothing (unconditional). Flux keeps ``guidance`` (its distilled embedding)."""
        if self.text:
            return self.condition(n, self.plain_guidance(guidance), height, width, prompts=[""] * n)
        if self.class_conditional:
            labels = torch.full((n,), self.num_classes, device=self.device)
            return Conditioning({"class_labels": labels}, False, 1.0, n)
        return Conditioning({}, False, 1.0, n)

    def class_embedding_shift(self, source: int, target: int, scale: float, cfg: bool):
        """A context manager: while it runs, the class embedding of every conditional row is moved by
        scale·(e(target) − e(source)) (``cfg``: the batch holds CFG halves). A ValueError for a family without a
        class embedding."""
        return self.driver.class_embedding_shift(source, target, scale, cfg)

    @contextlib.contextmanager
    def float32(self):
        """Every module of the pipeline in float32 while the block runs (the weights as loaded, upcast), then back:
        for measurements that differences in the model dtype would drown (perceptual path length)."""
        modules = [m for m in self.pipe.components.values() if isinstance(m, nn.Module)]
        dtypes = [next(m.parameters()).dtype if any(True for _ in m.parameters()) else None for m in modules]
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # its "casting with to()" advice concerns loading, not this upcast
        try:
            for m in modules:
                m.to(torch.float32)
            yield
        finally:
            for m, dt in zip(modules, dtypes):
                if dt is not None:
                    m.to(dt)
            diffusers_logging.set_verbosity(verbosity)

    @torch.no_grad()
    def text_context(self, prompts: Sequence[str]) -> torch.Tensor:
        """The cross-attention context (N, L, D) of prompts without CFG, as the pipeline's ``encode_prompt`` builds
        it (families whose whole text conditioning is that one tensor: SD 1.x/2.x)."""
        return self.driver.text_context(list(prompts))

    # ------------------------------------------------------------------ the denoiser
    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, sampler) -> torch.Tensor:
        """One guided denoiser call at solver timestep ``t``: the prediction ``sampler.step`` expects (ε, v, x₀ or
        flow velocity, in the scheduler's ``prediction_type``), learned-σ channels dropped."""
        return self.driver.denoise(x, t, cond, sampler)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One raw denoiser call (no CFG mixing, learned σ kept)."""
        return self.driver.forward(x, torch.as_tensor(t, device=x.device), cond.kwargs)

    # ------------------------------------------------------------------ timesteps
    def image_seq_len(self, height: int, width: int) -> int:
        """Number of image tokens (flow models' resolution-dependent shift)."""
        return image_tokens(height, width, self.driver.token_step())

    def set_timesteps(self, sampler, steps: int, height: int, width: int) -> None:
        """``sampler.set_timesteps`` exactly as the family's pipeline calls it (flow: sigmas / ``mu``)."""
        self.driver.set_timesteps(sampler, steps, height, width)

    def default_timesteps(self, sampler, steps: int, height: int, width: int) -> None:
        """What most pipelines do: flow models σ's / ``mu`` from the family's ``flow_timestep_kwargs`` (every flow
        solver given the same σ's), the others ``set_timesteps(steps)`` (with ``sampler.sigmas=ays``, the AYS σ's:
        :func:`pipeline.models.schedulers.set_diffusion_timesteps`)."""
        if self.family.flow:
            set_flow_timesteps(sampler, steps, self.device, self.image_seq_len(height, width), self.family.name)
        else:
            set_diffusion_timesteps(sampler, steps, device=self.device)

    # ------------------------------------------------------------------ VAE
    @contextlib.contextmanager
    def vae_dtype(self):
        """float32 for the VAE while it runs when the model is fp16 and the VAE config asks (force_upcast)."""
        vae = self.vae
        upcast = vae is not None and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            yield (torch.float32 if upcast else (vae.dtype if vae is not None else self.dtype))
        finally:
            if upcast:
                vae.to(torch.float16)

    def latent_factors(self) -> tuple[float, float, torch.Tensor | None, torch.Tensor | None]:
        """(scaling_factor, shift_factor, latents_mean, latents_std) as the family's pipeline applies them."""
        return self.driver.latent_factors()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Final latents (packed for Flux) -> float images ``D(z)/2 + 0.5``, NCHW, not clamped."""
        if self.vae is None:
            return latents.float() / 2 + 0.5
        return self.driver.decode_latents(self.unpack(latents, height, width)).float() / 2 + 0.5

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [-1, 1] (N, 3, H, W) -> latents as the denoiser sees them (unpacked): the inverse of
        :meth:`decode`, with the posterior's mode (deterministic). Pixel models: the images themselves."""
        if self.vae is None:
            return images.to(self.device, self.dtype)
        return self.driver.encode_images(images).to(self.dtype)
