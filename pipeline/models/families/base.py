"""The protocol every family implements, and the registry of families by diffusers pipeline class.

A family is a :class:`Family` (what it is, known from the class name alone: no weights) and a
:class:`FamilyDriver` subclass (how to drive a loaded pipeline of it). The defaults here are what most families
share; a family file overrides only what differs, and registers its class with :func:`register`.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import torch
from diffusers.utils.torch_utils import randn_tensor

from pipeline.errors import UserError
from pipeline.models.attention import AttentionLayout
from pipeline.models.flow_shift import shift_mu, uses_dynamic_shift

__all__ = [
    "Family",
    "FamilyDriver",
    "DRIVERS",
    "FAMILIES",
    "register",
    "driver_named",
    "call_default",
    "image_tokens",
    "batched",
    "ALL_MODES",
    "UNTEXTED_MODES",
]

ALL_MODES = ("metrics", "schedule", "attention", "latent")
UNTEXTED_MODES = ("metrics", "schedule", "latent")  # no prompt tokens: no attention maps


@dataclass(frozen=True)
class Family:
    """What a family is.

    denoiser      the component that predicts: ``unet`` | ``transformer``
    conditioning  ``text`` | ``class`` | ``none``
    space         ``latent`` (a KL/VQ VAE: ``vae`` or ``vqvae``) | ``pixel``
    flow          True for rectified-flow models (velocity prediction, σ ∈ [0, 1], FlowMatch* schedulers);
                  otherwise the scheduler config's ``prediction_type`` (ε, v, x₀) on a DDPM β schedule
    modes         the modes that can drive it exactly (any other is refused up front)
    """

    name: str
    denoiser: Literal["unet", "transformer"]
    conditioning: Literal["text", "class", "none"]
    space: Literal["latent", "pixel"]
    flow: bool = False
    vae_attr: str = "vae"
    modes: tuple[str, ...] = ALL_MODES

    def supports(self, mode: str) -> bool:
        return mode in self.modes


DRIVERS: dict[str, type["FamilyDriver"]] = {}  # pipeline class name -> driver
FAMILIES: dict[str, Family] = {}  # pipeline class name -> family


def register(*pipeline_classes: str):
    """Class decorator: ``cls`` drives pipelines of these diffusers class names."""

    def add(cls: type[FamilyDriver]) -> type[FamilyDriver]:
        for name in pipeline_classes:
            DRIVERS[name], FAMILIES[name] = cls, cls.family
        return cls

    return add


def driver_named(name: str | None) -> type["FamilyDriver"] | None:
    """The driver of the family called ``name`` (None: no such family)."""
    return next((d for d in DRIVERS.values() if d.family.name == name), None)


def call_default(fn, name: str, fallback: Any) -> Any:
    """The default of ``name`` in ``fn``'s signature (the pipeline's own choice, e.g. max_sequence_length)."""
    p = inspect.signature(fn).parameters.get(name)
    return fallback if p is None or p.default is inspect.Parameter.empty else p.default


class FamilyDriver:
    """How to drive one loaded pipeline of a family; ``model`` is the :class:`~pipeline.models.adapter.ModelAdapter`
    (its ``pipe``, ``denoiser``, ``vae``, ``device``, ``dtype``, ``vae_scale``)."""

    family: ClassVar[Family]
    # calculate_shift's fallbacks in the pipeline (base_image_seq_len, max_image_seq_len, base_shift, max_shift)
    shift_defaults: ClassVar[tuple[int, int, float, float]] = (256, 4096, 0.5, 1.15)
    fixed_size: ClassVar[bool] = False  # draws only its native size
    cond_first: ClassVar[bool] = False  # CFG batch order [cond, uncond] (DiT) rather than [uncond, cond]
    # how the CFG halves reach the denoiser, for the attention capture: "batch" (one call, [uncond; cond]),
    # "batch_cond_first" ([cond; uncond]) or "two_calls" (two calls per step, the conditional one first)
    cfg_calls: ClassVar[str] = "batch"
    vae_upcast: ClassVar[bool] = True  # an fp16 VAE with force_upcast runs in float32 (False: the pipeline never does)

    def __init__(self, model):
        self.model = model
        self.pipe, self.denoiser = model.pipe, model.denoiser

    # ------------------------------------------------------------------ geometry
    @classmethod
    def vae_scale_of(cls, vae_config: dict | None) -> int:
        """Pixels per latent pixel from the VAE's config alone: 2^(len(block_out_channels) − 1) (8 without one)."""
        blocks = (vae_config or {}).get("block_out_channels")
        return 2 ** (len(blocks) - 1) if blocks else 8

    def vae_scale(self) -> int:
        """Pixels per latent pixel of the loaded VAE (1 for pixel-space models)."""
        vae = self.model.vae
        return 1 if vae is None else self.vae_scale_of(dict(vae.config))

    @classmethod
    def flow_geometry(cls, vae_scale: int, component: Callable[[str], dict | None]) -> tuple[int, int] | None:
        """(native side, pixels per image token) of a flow family from configs only (``component(name)``: a
        component's config.json, or None), for its resolution-dependent shift; None: not a flow family."""
        return None

    @classmethod
    def flow_mu(cls, config: Any, image_seq_len: int | None) -> float | None:
        """μ the family's pipeline passes for ``image_seq_len`` image tokens; None on a static-shift model."""
        if not uses_dynamic_shift(config):
            return None
        if image_seq_len is None:
            raise ValueError("Expected image_seq_len for a resolution-dependent shift (use_dynamic_shifting), got None")
        return shift_mu(config, image_seq_len, cls.shift_defaults)

    @classmethod
    def flow_timestep_kwargs(cls, config: Any, num_inference_steps: int, image_seq_len: int | None) -> dict:
        """The pipeline's ``retrieve_timesteps`` arguments besides the device for a flow scheduler with ``config``:
        ``num_inference_steps``, plus ``mu`` only with ``use_dynamic_shifting`` (also a bare scheduler's default)."""
        mu = cls.flow_mu(config, image_seq_len)
        return {"num_inference_steps": int(num_inference_steps), **({"mu": mu} if mu is not None else {})}

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    def native_size(self) -> tuple[int, int]:
        """(height, width) in pixels the model was trained at (its pipeline's default)."""
        size, s = self.denoiser.config.sample_size, self.model.vae_scale
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(h) * s, int(w) * s

    def size_multiple(self) -> int:
        """What a generated height and width must be multiples of."""
        return self.model.vae_scale

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of one unpacked latent (pixels for pixel-space models)."""
        s = self.model.vae_scale
        return self.latent_channels, height // s, width // s

    def token_step(self) -> int:
        """Pixels per image token along each side (the flow families' resolution-dependent shift)."""
        return self.model.vae_scale * int(getattr(self.denoiser.config, "patch_size", None) or 1)

    def pack(self, z: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) latents -> what the denoiser takes."""
        return z

    def unpack(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return latents

    def initial_latents(self, x: torch.Tensor, init_noise_sigma: float) -> torch.Tensor:
        """Unit noise of ``latent_shape`` -> the solver's first latents."""
        return x * init_noise_sigma

    def initial_noise(self, generators, height: int, width: int, init_noise_sigma: float) -> torch.Tensor:
        """The pipeline's own first draw: ``randn_tensor`` of (N, *latent_shape) with one generator per sample, in
        the model dtype, then :meth:`initial_latents` (a family whose pipeline draws otherwise overrides this)."""
        shape = (len(generators), *self.latent_shape(height, width))
        x = randn_tensor(shape, generator=list(generators), device=self.model.device, dtype=self.model.dtype)
        return self.initial_latents(x, init_noise_sigma)

    def set_timesteps(self, sampler, steps: int, height: int, width: int) -> None:
        """``sampler.set_timesteps`` exactly as the family's pipeline calls it (flow: sigmas / ``mu`` via
        :meth:`flow_timestep_kwargs`; a flow solver other than FlowMatchEuler gets the same σ's)."""
        self.model.default_timesteps(sampler, steps, height, width)

    # ------------------------------------------------------------------ conditioning
    def uses_cfg(self, guidance: float) -> bool:
        return self.family.conditioning != "none" and guidance > 1

    def plain_guidance(self, guidance: float) -> float:
        """The guidance scale of a condition without CFG (1: none; a distilled-guidance family keeps its own)."""
        return 1.0

    def encode(self, prompts: list[str], cfg: bool, guidance: float, height: int, width: int) -> dict:
        """The denoiser's keyword tensors for ``prompts`` (CFG halves concatenated when ``cfg``)."""
        raise AssertionError(f"no prompt encoder for family {self.family.name!r}")

    def class_kwargs(self, labels: torch.Tensor, cfg: bool) -> dict:
        """The denoiser's keyword tensors for class ``labels`` (the null class = ``num_classes``)."""
        raise AssertionError(f"no class conditioning for family {self.family.name!r}")

    def text_context(self, prompts: list[str]) -> torch.Tensor:
        raise UserError(
            f"{type(self.pipe).__name__}: prompt embeddings as one context tensor are only defined "
            "for StableDiffusionPipeline"
        )

    def class_embedding_shift(self, source: int, target: int, scale: float, cfg: bool):
        """A context manager moving the conditional rows' class embedding by scale·(e(target) − e(source))."""
        raise ValueError(f"{type(self.denoiser).__name__} has no class embedding: no class-embedding direction")

    # ------------------------------------------------------------------ the denoiser
    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond, sampler) -> torch.Tensor:
        """One guided step's prediction: the CFG halves as one batch ``[uncond, cond]`` (``cond_first``: the other
        way), :meth:`combine`, :meth:`prediction`. A family whose pipeline calls the denoiser otherwise (two calls,
        guidance switched off for some steps) overrides this."""
        x_in = torch.cat([x, x]) if cond.cfg else x
        if sampler is not None and hasattr(sampler, "scale_model_input"):
            x_in = sampler.scale_model_input(x_in, t)
        out = self.forward(x_in, torch.as_tensor(t, device=x.device), cond.kwargs)
        if cond.cfg:
            a, b = out.chunk(2)
            cond_out, uncond_out = (a, b) if self.cond_first else (b, a)
            out = self.combine(cond_out, uncond_out, cond.guidance)
        return self.prediction(out)

    def combine(self, cond_out: torch.Tensor, uncond_out: torch.Tensor, guidance: float) -> torch.Tensor:
        """Classifier-free guidance ``u + g (c − u)`` (Ho & Salimans 2022, as diffusers)."""
        return uncond_out + guidance * (cond_out - uncond_out)

    def forward(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """One raw denoiser call on ``x`` at solver timestep ``t`` (0-d or (N,))."""
        raise AssertionError(f"no denoiser call for family {self.family.name!r}")

    def prediction(self, out: torch.Tensor) -> torch.Tensor:
        """The guided output -> the prediction ``sampler.step`` expects (learned-σ channels dropped)."""
        c = self.latent_channels
        return out[:, :c] if out.ndim == 4 and out.shape[1] == 2 * c else out

    def latent_factors(self) -> tuple[float, float, torch.Tensor | None, torch.Tensor | None]:
        """(scaling_factor, shift_factor, latents_mean, latents_std) as the family's pipeline applies them."""
        return float(getattr(self.model.vae.config, "scaling_factor", None) or 1.0), 0.0, None, None

    # ------------------------------------------------------------------ VAE
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Unpacked latents -> images in [-1, 1] as the pipeline decodes them (:meth:`latent_factors`), run in the
        VAE's dtype (float32 when an fp16 VAE asks for ``force_upcast``)."""
        scale, shift, mean, std = self.latent_factors()
        with self._vae_dtype() as dtype:
            z = z.to(dtype)
            z = z * std.to(z) / scale + mean.to(z) if mean is not None else z / scale + shift
            return self.model.vae.decode(z, return_dict=False)[0]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> unpacked latents, the inverse of :meth:`decode_latents`, with the posterior's mode."""
        scale, shift, mean, std = self.latent_factors()
        with self._vae_dtype() as dtype:
            enc = self.model.vae.encode(images.to(self.model.device, dtype))
            z = enc.latent_dist.mode() if hasattr(enc, "latent_dist") else enc.latents  # KL or VQ
            return (z - mean.to(z)) * scale / std.to(z) if mean is not None else (z - shift) * scale

    def _vae_dtype(self):
        """The dtype the VAE runs in while the block runs (:attr:`vae_upcast`)."""
        return self.model.vae_dtype() if self.vae_upcast else contextlib.nullcontext(self.model.vae.dtype)

    def latent_part_refusal(self, part: str) -> str | None:
        """Why this checkpoint cannot run latent-mode ``part`` exactly though the family declares the mode (None:
        it can); the mode refuses such a part before any of its work."""
        return None

    # ------------------------------------------------------------------ attention
    def attention_layout(self, height: int, width: int) -> AttentionLayout:
        kind = "class-conditional" if self.family.conditioning == "class" else "unconditional"
        raise UserError(
            f"mode=[attention] needs a text-conditioned model: {type(self.pipe).__name__} "
            f"({self.family.name}) is {kind}, so there are no prompt tokens to map"
        )

    def concept_tokens(self, words: list[str]) -> torch.Tensor:
        """(C, D): one token per concept word at the first joint block's text-stream input (families whose
        ``attention_layout`` declares a :class:`~pipeline.models.attention.ConceptStream`)."""
        raise UserError(f"{type(self.pipe).__name__} ({self.family.name}) has no concept stream for output-space maps")

    def _concept_segment_mean(self, words: list[str], embeds: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        """Per word: the mean of the encoder output over its tokens in the layout's segment, each word encoded
        alone (``embeds``: (C, L, D_text) from the pipeline's own ``encode_prompt``)."""
        rows = []
        for i, word in enumerate(words):
            tok = layout.tokens(word)
            if not tok.positions:
                raise UserError(f"concept {word!r}: no token of it fits the {layout.segment_name} segment")
            pos = [layout.segment[0] + j for p in tok.positions for j in p]
            rows.append(embeds[i, pos].mean(0))
        return torch.stack(rows)


def image_tokens(height: int, width: int, step: int) -> int:
    """Image tokens of a ``height x width`` image at ``step`` pixels per token along each side."""
    return (height // step) * (width // step)


def batched(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A solver timestep as one value per sample of ``x`` (the transformers take (N,) timesteps)."""
    return (t[None] if t.ndim == 0 else t).expand(x.shape[0])
