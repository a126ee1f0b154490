"""The one room that knows how to drive a loaded diffusers pipeline, whatever its family.

Stages never touch ``pipe.unet`` / ``pipe.transformer`` / ``pipe.vae``: they ask a :class:`ModelAdapter` for
prompt (or class) conditioning, one guided denoiser call, VAE encode/decode, the latent shape of a size and
per-sample initial noise. Each family is driven exactly as its own diffusers pipeline's ``__call__`` does
(diffusers 0.42; the oracle test compares images against ``pipe(...)`` called one image at a time):

=========  ========================================================================================================
sd         StableDiffusionPipeline (1.x ε, 2.x v): CLIP ``encode_prompt``; CFG halves [uncond "", cond]
sdxl       StableDiffusionXLPipeline: two CLIP encoders + pooled embeddings + time ids (original = target = size,
           crop (0, 0)); ``force_zeros_for_empty_prompt`` as the model config says; VAE ``latents_mean/std``
pixart     PixArt-α/Σ: T5 ``encode_prompt`` (negative ""), attention masks, learned-σ output (first half of the
           channels), resolution/aspect conditioning when the transformer has it (sample_size 128).
           Generated at the requested size = ``use_resolution_binning=False`` (identical at the native size)
sd3        StableDiffusion3Pipeline: two CLIP + optional T5 (a checkpoint saved without T5 loads with None), pooled
           projections; VAE ``shift_factor``
flux       FluxPipeline: CLIP pooled + T5, 2×2-packed latents with image/text position ids; ``guidance_scale`` is the
           *distilled* guidance fed to the guidance embedding (no CFG; Flux-schnell has none); static or
           resolution-dependent (``mu``) shift
dit        DiTPipeline: class labels, CFG halves [cond, null] with the null class = ``num_embeds_ada_norm`` (1000 for
           the released DiT, which the pipeline hard-codes); learned σ
ddpm       DDPMPipeline / DDIMPipeline: pixel-space UNet2DModel, images in [-1, 1]
ldm        LDMPipeline: unconditional UNet2DModel on VQ-VAE latents (``vqvae``, ``scaling_factor``)
=========  ========================================================================================================

Conventions: CFG is ``u + g (c − u)`` (Ho & Salimans 2022, as diffusers) and is used when ``g > 1`` (UNets with a
guidance embedding — LCM — take ``g`` as ``timestep_cond`` instead, as the SD pipelines do). Initial noise is
``randn_tensor`` with one generator per sample (the pipelines' own draw), times the solver's ``init_noise_sigma``.
A decoded image is ``D(z)/2 + 0.5`` (not yet clamped: the caller checks for NaN first). The VAE is run in float32
when the model is float16 and its config sets ``force_upcast`` (SDXL's VAE overflows in fp16).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from pipeline.errors import UserError
from pipeline.models.family import Family, family_of

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


@dataclass(frozen=True)
class AttentionLayout:
    """Where a family's text→image attention is, and which text tokens its per-word maps come from.

    ``recorder``: ``cross`` (UNet / PixArt ``attn2``), ``sd3`` or ``flux`` (joint attention). ``layers``: the
    ``attn_processors`` keys to record. ``grid``: the image-token grid (UNet: the latent grid, which its layers
    halve; transformers: latent / patch). ``segment``: (start, stop) of the text tokens the maps are read from,
    within the attention's text sequence; ``tokenizer`` and ``max_length`` tokenize a prompt into that segment's
    positions. ``renormalise``: maps renormalised over the segment's non-padding tokens (joint attention)."""

    recorder: str
    layers: tuple[str, ...]
    grid: tuple[int, int]
    tokenizer: Any
    max_length: int
    segment: tuple[int, int]
    renormalise: bool = False
    segment_name: str = "CLIP"


def _call_default(fn, name: str, fallback: Any) -> Any:
    """The default of ``name`` in ``fn``'s signature (the pipeline's own choice, e.g. max_sequence_length)."""
    p = inspect.signature(fn).parameters.get(name)
    return fallback if p is None or p.default is inspect.Parameter.empty else p.default


class ModelAdapter:
    """How to drive one loaded pipeline. Build with ``ModelAdapter(pipe, mode=...)``: an unsupported pipeline
    class is a :class:`UserError` naming the class, the mode and the supported families."""

    def __init__(self, pipe, mode: str | None = None):
        self.pipe = pipe
        self.family: Family = family_of(pipe, mode)
        self.denoiser = getattr(pipe, self.family.denoiser, None)
        if self.denoiser is None:
            raise UserError(f"model.path: {type(pipe).__name__} has no {self.family.denoiser!r} component")
        self.vae = getattr(pipe, self.family.vae_attr, None) if self.family.space == "latent" else None
        if self.family.space == "latent" and self.vae is None:
            raise UserError(f"model.path: {type(pipe).__name__} has no {self.family.vae_attr!r} component")
        if self.family.conditioning == "text" and getattr(pipe, "text_encoder", None) is None \
                and getattr(pipe, "text_encoder_2", None) is None:
            raise UserError(f"model.path: {type(pipe).__name__} has no text encoder")

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
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def tokenizer(self):
        """The tokenizer whose tokens the cross-attention sees first (CLIP for SD/SDXL/SD3, T5 for PixArt)."""
        return getattr(self.pipe, "tokenizer", None)

    @property
    def num_classes(self) -> int | None:
        if not self.class_conditional:
            return None
        return int(self.denoiser.config.num_embeds_ada_norm)

    def prediction_type(self, scheduler_config: dict | None = None) -> str:
        """``flow`` for rectified-flow models, else the scheduler config's ``prediction_type`` (ε by default)."""
        if self.family.flow:
            return "flow"
        config = scheduler_config if scheduler_config is not None else dict(self.pipe.scheduler.config)
        return str(config.get("prediction_type") or "epsilon")

    @property
    def vae_scale(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        c = int(self.denoiser.config.in_channels)
        return c // 4 if self.family.name == "flux" else c  # Flux's transformer sees 2×2-packed latents

    def native_size(self) -> tuple[int, int]:
        """(height, width) in pixels the model was trained at (its pipeline's default)."""
        if self.family.name == "flux":
            s = int(getattr(self.pipe, "default_sample_size", 128)) * self.vae_scale
            return s, s
        size = self.denoiser.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(h) * self.vae_scale, int(w) * self.vae_scale

    def resolve_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The size to generate at: ``sampler.height/width`` or the native size, checked against what the family
        can draw (fixed-size families only their native size)."""
        nh, nw = self.native_size()
        h, w = int(height or nh), int(width or nw)
        if self.family.name in ("dit", "ddpm", "ldm") and (h, w) != (nh, nw):
            raise UserError(f"sampler.height/width={h}x{w}: {type(self.pipe).__name__} draws only its native size "
                            f"{nh}x{nw}; unset sampler.height and sampler.width")
        multiple = self.vae_scale * (2 if self.family.name == "flux" else 1)
        patch = getattr(self.denoiser.config, "patch_size", None) or 1
        if self.family.name in ("pixart", "sd3"):
            multiple *= int(patch)
        if h % multiple or w % multiple:
            raise UserError(f"sampler.height/width={h}x{w}: {type(self.pipe).__name__} needs multiples of {multiple}")
        return h, w

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of one unpacked latent (pixels for pixel-space models)."""
        s = self.vae_scale
        if self.family.name == "flux":
            return self.latent_channels, 2 * (height // (s * 2)), 2 * (width // (s * 2))
        return self.latent_channels, height // s, width // s

    def attention_layout(self, height: int, width: int) -> AttentionLayout:
        """The family's text→image attention at this size (diffusers 0.42 module names). Refused (UserError naming
        the pipeline class) for models without text conditioning."""
        pipe, name, procs = self.pipe, self.family.name, list(self.denoiser.attn_processors)
        _, h, w = self.latent_shape(height, width)
        if name in ("sd", "sdxl"):  # UNet attn2 at every resolution; CLIP tokens with a start token
            tok = pipe.tokenizer
            n = int(tok.model_max_length)
            return AttentionLayout("cross", tuple(k for k in procs if k.endswith("attn2.processor")), (h, w), tok, n,
                                   (0, n))
        if name == "pixart":  # transformer attn2 on the patch grid; T5 tokens (no start token), padding masked
            p = int(self.denoiser.config.patch_size)
            n = int(_call_default(pipe.__call__, "max_sequence_length", 120))
            return AttentionLayout("cross", tuple(k for k in procs if k.endswith("attn2.processor")), (h // p, w // p),
                                   pipe.tokenizer, n, (0, n), segment_name="T5")
        if name == "sd3":  # joint attention [image; text]; text = [CLIP-L|G (77); T5 (max_sequence_length)]
            p = int(self.denoiser.config.patch_size)
            layers = tuple(k for k in procs if re.fullmatch(r"transformer_blocks\.\d+\.attn\.processor", k))
            clip = int(pipe.tokenizer_max_length)
            t5 = int(_call_default(pipe.__call__, "max_sequence_length", 256))
            if getattr(pipe, "text_encoder_3", None) is not None:
                return AttentionLayout("sd3", layers, (h // p, w // p), pipe.tokenizer_3, t5, (clip, clip + t5), True, "T5")
            return AttentionLayout("sd3", layers, (h // p, w // p), pipe.tokenizer, clip, (0, clip), True, "CLIP-L")
        if name == "flux":  # joint attention [text; image] in double- and single-stream blocks; text = T5 only
            layers = tuple(k for k in procs if re.fullmatch(r"(single_)?transformer_blocks\.\d+\.attn\.processor", k))
            t5 = int(_call_default(pipe.__call__, "max_sequence_length", 512))
            return AttentionLayout("flux", layers, (h // 2, w // 2), pipe.tokenizer_2, t5, (0, t5), True, "T5")
        kind = "class-conditional" if self.class_conditional else "unconditional"
        raise UserError(f"mode=[attention] needs a text-conditioned model: {type(pipe).__name__} ({name}) is {kind}, "
                        "so there are no prompt tokens to map")

    # ------------------------------------------------------------------ noise
    def initial_noise(self, generators: Sequence[torch.Generator], height: int, width: int,
                      init_noise_sigma: float = 1.0) -> torch.Tensor:
        """The pipelines' own first draw: ``randn_tensor`` with one generator per sample (so an image never depends
        on its batch), in the model dtype, times the solver's ``init_noise_sigma``; Flux's packed 2×2."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (len(generators), *self.latent_shape(height, width))
        x = randn_tensor(shape, generator=list(generators), device=self.device, dtype=self.dtype)
        if self.family.name == "flux":
            return self.pipe._pack_latents(x, *shape)
        return x * init_noise_sigma

    def add_noise(self, sched, latents: torch.Tensor, gens: Sequence[torch.Generator], t: torch.Tensor) -> torch.Tensor:
        """Clean (unpacked) latents noised to solver timestep ``t`` in the solver's own convention — flow models
        ``(1 − σ)·x₀ + σ·ε`` (``scale_noise``), the others ``add_noise`` (DDPM: √ᾱ·x₀ + √(1−ᾱ)·ε; Euler-type: x₀ + σ·ε)
        — with per-sample noise; Flux's packed 2×2. ``t`` must be one of ``sched.timesteps``."""
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(latents.shape, generator=list(gens), device=self.device, dtype=self.dtype)
        latents = latents.to(self.device, self.dtype)
        t = torch.as_tensor(t, device=self.device).reshape(1)
        if self.family.flow:
            x = sched.scale_noise(latents, t, noise)
        else:
            x = sched.add_noise(latents, noise, t.expand(latents.shape[0]))
        if self.family.name == "flux":
            return self.pipe._pack_latents(x, *x.shape)
        return x

    def pack(self, z: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) latents -> what the denoiser takes (Flux: 2×2-packed sequences); identity for the others."""
        if self.family.name == "flux":
            return self.pipe._pack_latents(z, *z.shape)
        return z

    def unpack(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed sequence latents -> (N, C, h, w) (Flux); identity for the others."""
        if self.family.name == "flux":
            return self.pipe._unpack_latents(latents, height, width, self.vae_scale)
        return latents

    # ------------------------------------------------------------------ conditioning
    def uses_cfg(self, guidance: float) -> bool:
        if self.family.name == "flux" or self.family.conditioning == "none":
            return False  # Flux: distilled guidance embedding, not CFG
        if self.family.denoiser == "unet" and getattr(self.denoiser.config, "time_cond_proj_dim", None) is not None:
            return False
        return guidance > 1

    @torch.no_grad()
    def condition(self, n: int, guidance: float, height: int, width: int, prompts: Sequence[str] | None = None,
                  class_ids: Sequence[int] | None = None) -> Conditioning:
        """Conditioning for ``n`` samples: prompts (text families), class ids (DiT) or nothing (unconditional)."""
        cfg = self.uses_cfg(guidance)
        if self.text:
            if not prompts or len(prompts) != n:
                raise ValueError(f"Expected {n} prompts for a text-to-image model, got {len(prompts or [])}")
            kwargs = getattr(self, f"_encode_{self.family.name}")(list(prompts), cfg, guidance, height, width)
            return Conditioning(kwargs, cfg, guidance, n, prompts=list(prompts))
        if self.class_conditional:
            if class_ids is None or len(class_ids) != n:
                raise ValueError(f"Expected {n} class ids for a class-conditional model, got {len(class_ids or [])}")
            bad = [c for c in class_ids if not 0 <= int(c) < self.num_classes]
            if bad:
                raise UserError(f"mode.metrics.class_ids: {bad[:5]} outside 0..{self.num_classes - 1}")
            labels = torch.tensor([int(c) for c in class_ids], device=self.device)
            if cfg:  # DiT's order: [cond, null]
                labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
            return Conditioning({"class_labels": labels}, cfg, guidance, n, class_ids=[int(c) for c in class_ids])
        return Conditioning({}, False, guidance, n)

    @torch.no_grad()
    def null_condition(self, n: int, height: int, width: int, guidance: float = 1.0) -> Conditioning:
        """The model's "no condition" without CFG: the empty prompt (text), the null class (class-conditional —
        DiT's ``num_embeds_ada_norm``), nothing (unconditional). Flux keeps ``guidance`` (its distilled embedding)."""
        if self.text:
            return self.condition(n, guidance if self.family.name == "flux" else 1.0, height, width, prompts=[""] * n)
        if self.class_conditional:
            labels = torch.full((n,), self.num_classes, device=self.device)
            return Conditioning({"class_labels": labels}, False, 1.0, n)
        return Conditioning({}, False, 1.0, n)

    @contextlib.contextmanager
    def float32(self):
        """Every module of the pipeline in float32 while the block runs (the weights as loaded, upcast), then back:
        for measurements that differences in the model dtype would drown (perceptual path length)."""
        import torch.nn as nn
        from diffusers.utils import logging as diffusers_logging

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
        if self.family.name != "sd":
            raise UserError(f"{type(self.pipe).__name__}: prompt embeddings as one context tensor are only defined "
                            "for StableDiffusionPipeline")
        return self._encode_sd(list(prompts), False, 1.0, *self.native_size())["encoder_hidden_states"]

    def _encode_sd(self, prompts, cfg, guidance, height, width) -> dict:
        pe, npe = self.pipe.encode_prompt(prompts, self.device, 1, cfg, negative_prompt=None)
        kwargs = {"encoder_hidden_states": torch.cat([npe, pe]) if cfg else pe}
        kwargs.update(self._timestep_cond(guidance, len(prompts)))
        return kwargs

    def _timestep_cond(self, guidance: float, n: int) -> dict:
        """LCM-style UNets embed the guidance scale (the SD pipelines' ``get_guidance_scale_embedding``)."""
        dim = getattr(self.denoiser.config, "time_cond_proj_dim", None)
        if dim is None:
            return {}
        g = torch.tensor(guidance - 1).repeat(n)
        return {"timestep_cond": self.pipe.get_guidance_scale_embedding(g, embedding_dim=dim).to(self.device, self.dtype)}

    def _encode_sdxl(self, prompts, cfg, guidance, height, width) -> dict:
        pipe = self.pipe
        pe, npe, ppe, nppe = pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                                do_classifier_free_guidance=cfg, negative_prompt=None)
        proj = int(ppe.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=pe.dtype,
                                          text_encoder_projection_dim=proj)
        if cfg:
            pe, ppe, time_ids = torch.cat([npe, pe]), torch.cat([nppe, ppe]), torch.cat([time_ids, time_ids])
        time_ids = time_ids.to(self.device).repeat(len(prompts), 1)
        kwargs = {"encoder_hidden_states": pe, "added_cond_kwargs": {"text_embeds": ppe, "time_ids": time_ids}}
        kwargs.update(self._timestep_cond(guidance, len(prompts)))
        return kwargs

    def _encode_pixart(self, prompts, cfg, guidance, height, width) -> dict:
        from diffusers.utils import is_bs4_available, is_ftfy_available

        pipe = self.pipe
        clean = bool(_call_default(pipe.__call__, "clean_caption", False)) and is_bs4_available() and is_ftfy_available()
        max_len = int(_call_default(pipe.__call__, "max_sequence_length", 120))
        pe, pam, npe, npam = pipe.encode_prompt(prompts, cfg, negative_prompt="", num_images_per_prompt=1,
                                                device=self.device, clean_caption=clean, max_sequence_length=max_len)
        if cfg:
            pe, pam = torch.cat([npe, pe]), torch.cat([npam, pam])
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(self.denoiser.config, "sample_size", None) == 128:  # PixArt-α 1024: size micro-conditioning
            b = len(pe)
            res = torch.tensor([height, width]).repeat(b, 1).to(dtype=pe.dtype, device=self.device)
            ar = torch.tensor([float(height / width)]).repeat(b, 1).to(dtype=pe.dtype, device=self.device)
            added = {"resolution": res, "aspect_ratio": ar}
        return {"encoder_hidden_states": pe, "encoder_attention_mask": pam, "added_cond_kwargs": added}

    def _encode_sd3(self, prompts, cfg, guidance, height, width) -> dict:
        max_len = int(_call_default(self.pipe.__call__, "max_sequence_length", 256))
        pe, npe, ppe, nppe = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
                                                     num_images_per_prompt=1, do_classifier_free_guidance=cfg,
                                                     negative_prompt=None, max_sequence_length=max_len)
        if cfg:
            pe, ppe = torch.cat([npe, pe]), torch.cat([nppe, ppe])
        return {"encoder_hidden_states": pe, "pooled_projections": ppe}

    def _encode_flux(self, prompts, cfg, guidance, height, width) -> dict:
        pipe = self.pipe
        max_len = int(_call_default(pipe.__call__, "max_sequence_length", 512))
        pe, ppe, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                               num_images_per_prompt=1, max_sequence_length=max_len)
        _, h, w = self.latent_shape(height, width)
        img_ids = pipe._prepare_latent_image_ids(len(prompts), h // 2, w // 2, self.device, pe.dtype)
        g = None
        if getattr(self.denoiser.config, "guidance_embeds", False):
            g = torch.full([1], guidance, device=self.device, dtype=torch.float32).expand(len(prompts))
        return {"encoder_hidden_states": pe, "pooled_projections": ppe, "txt_ids": text_ids, "img_ids": img_ids,
                "guidance": g}

    # ------------------------------------------------------------------ the denoiser
    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, sampler) -> torch.Tensor:
        """One guided denoiser call at solver timestep ``t``: the prediction ``sampler.step`` expects (ε, v, x₀ or
        flow velocity, in the scheduler's ``prediction_type``), learned-σ channels dropped."""
        x_in = torch.cat([x, x]) if cond.cfg else x
        if hasattr(sampler, "scale_model_input"):
            x_in = sampler.scale_model_input(x_in, t)
        out = self._forward(x_in, t, cond)
        if cond.cfg:
            a, b = out.chunk(2)
            cond_out, uncond_out = (a, b) if self.class_conditional else (b, a)  # DiT: [cond, null]
            out = uncond_out + cond.guidance * (cond_out - uncond_out)
        c = self.latent_channels
        if self.family.name != "flux" and out.ndim == 4 and out.shape[1] == 2 * c:  # learned σ (PixArt, DiT)
            out = out[:, :c]
        return out

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        net, name, kw = self.denoiser, self.family.name, cond.kwargs
        t = torch.as_tensor(t, device=x.device)
        if name in ("sd", "sdxl"):
            return net(x, t, return_dict=False, **kw)[0]
        if name in ("ddpm", "ldm"):
            return net(x, t).sample
        tb = (t[None] if t.ndim == 0 else t).expand(x.shape[0])
        if name == "pixart":
            return net(x, timestep=tb, return_dict=False, **kw)[0]
        if name == "sd3":
            return net(hidden_states=x, timestep=tb, return_dict=False, **kw)[0]
        if name == "flux":
            return net(hidden_states=x, timestep=tb.to(x.dtype) / 1000, return_dict=False, **kw)[0]
        if name == "dit":
            return net(x, timestep=tb, **kw).sample
        raise AssertionError(f"no denoiser call for family {name!r}")

    # ------------------------------------------------------------------ timesteps
    def image_seq_len(self, height: int, width: int) -> int:
        """Number of image tokens (flow models' resolution-dependent shift)."""
        _, h, w = self.latent_shape(height, width)
        patch = 2 if self.family.name == "flux" else int(getattr(self.denoiser.config, "patch_size", None) or 1)
        return (h // patch) * (w // patch)

    def set_timesteps(self, sampler, steps: int, height: int, width: int) -> None:
        """``sampler.set_timesteps`` exactly as the family's pipeline calls it (flow: sigmas / ``mu``)."""
        if self.family.flow:
            from pipeline.models.schedulers import set_flow_timesteps

            set_flow_timesteps(sampler, steps, self.device, self.image_seq_len(height, width), self.family.name)
        else:
            sampler.set_timesteps(steps, device=self.device)

    # ------------------------------------------------------------------ VAE
    @contextlib.contextmanager
    def _vae_dtype(self):
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
        cfg = self.vae.config
        scale = float(getattr(cfg, "scaling_factor", None) or 1.0)
        shift = float(getattr(cfg, "shift_factor", None) or 0.0) if self.family.name in ("sd3", "flux") else 0.0
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if self.family.name == "sdxl" and mean is not None and std is not None:
            c = len(mean)
            return scale, shift, torch.tensor(mean).view(1, c, 1, 1), torch.tensor(std).view(1, c, 1, 1)
        return scale, shift, None, None

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Final latents (packed for Flux) -> float images ``D(z)/2 + 0.5``, NCHW, not clamped."""
        if self.vae is None:
            return latents.float() / 2 + 0.5
        z = self.unpack(latents, height, width)
        scale, shift, mean, std = self.latent_factors()
        with self._vae_dtype() as dtype:
            z = z.to(dtype)
            if mean is not None:
                z = z * std.to(z) / scale + mean.to(z)
            else:
                z = z / scale + shift
            x = self.vae.decode(z, return_dict=False)[0]
        return x.float() / 2 + 0.5

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [-1, 1] (N, 3, H, W) -> latents as the denoiser sees them (unpacked): the inverse of
        :meth:`decode`, with the posterior's mode (deterministic). Pixel models: the images themselves."""
        if self.vae is None:
            return images.to(self.device, self.dtype)
        scale, shift, mean, std = self.latent_factors()
        with self._vae_dtype() as dtype:
            enc = self.vae.encode(images.to(self.device, dtype))
            z = enc.latent_dist.mode() if hasattr(enc, "latent_dist") else enc.latents  # KL or VQ
            z = (z - mean.to(z)) * scale / std.to(z) if mean is not None else (z - shift) * scale
        return z.to(self.dtype)
