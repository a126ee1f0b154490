"""Qwen-Image: ``QwenImagePipeline`` (rectified flow), driven as diffusers 0.42 ``QwenImagePipeline.__call__``.

Text: Qwen2.5-VL's last hidden states of the prompt in the pipeline's chat template, the template's first
``prompt_template_encode_start_idx`` tokens dropped, with a per-prompt mask (``encode_prompt``). Latents: a Wan-style
5-D VAE (one frame; scale 2^len(temperal_downsample)), packed 2×2 into tokens, normalised with the VAE's
``latents_mean``/``latents_std``; σ's ``linspace(1, 1/N, N)`` with μ from the token count; the transformer gets
``t / 1000`` and ``img_shapes``.

``sampler.guidance_scale`` is the pipeline's ``true_cfg_scale``: above 1, classifier-free guidance against the
project's "no prompt", the empty negative prompt ``""`` (``pipe(prompt, true_cfg_scale=g, negative_prompt="")``),
as two separate transformer calls each with its own prompt's mask and length, combined as
``comb = u + g (c − u)`` rescaled per token to the conditional prediction's norm, ``comb · ‖c‖ / ‖comb‖``.
The pipeline's own ``guidance_scale`` is only for guidance-distilled transformers (``guidance_embeds``); the 0.42
``QwenImageTransformer2DModel`` builds no guidance embedding for that flag and its forward cannot take the guidance
the pipeline passes, so such a transformer is refused up front (no such checkpoint exists).

Conditioning tensors are padded with zeros to ``max_sequence_length`` (the ``__call__`` default, 512), mask 0, so
that every prompt's condition has one shape (the latent mode's directions subtract conditions of different
prompts); each call trims them back to the batch's longest prompt, mask dropped when all ones — exactly the
tensors ``encode_prompt`` gives for that batch. Attention maps are the next issue (mode not declared).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.models.families.base import Family, FamilyDriver, batched, call_default, register
from pipeline.models.flow_shift import shift_mu, uses_dynamic_shift

__all__ = ["QwenImage"]

DEFAULT_SAMPLE_SIZE = 128  # QwenImagePipeline.default_sample_size (latent pixels before packing)
TEMPORAL_DOWNSAMPLE = (False, True, True)  # AutoencoderKLQwenImage's default temperal_downsample


@register("QwenImagePipeline")
class QwenImage(FamilyDriver):
    family = Family("qwenimage", "transformer", "text", "latent", flow=True, modes=("metrics", "schedule", "latent"))

    def __init__(self, model):
        super().__init__(model)
        if getattr(self.denoiser.config, "guidance_embeds", False):
            raise UserError(
                f"{type(self.pipe).__name__}: the transformer is guidance-distilled (guidance_embeds: true), but the "
                "diffusers 0.42 QwenImageTransformer2DModel has no guidance embedding to feed its guidance_scale to "
                "(its forward fails on it); only true_cfg_scale models are driven (sampler.guidance_scale)"
            )

    # ------------------------------------------------------------------ geometry
    @classmethod
    def vae_scale_of(cls, vae_config):
        """QwenImagePipeline's ``2 ** len(vae.temperal_downsample)`` (8 without a VAE config)."""
        if not vae_config:
            return 8
        return 2 ** len(vae_config.get("temperal_downsample", TEMPORAL_DOWNSAMPLE))

    @classmethod
    def flow_geometry(cls, vae_scale, component):
        """Native: 128·scale (``default_sample_size``); tokens: 2×2-packed latents."""
        return DEFAULT_SAMPLE_SIZE * vae_scale, 2 * vae_scale

    @classmethod
    def flow_timestep_kwargs(cls, config, num_inference_steps, image_seq_len):
        """QwenImagePipeline's: ``sigmas = linspace(1, 1/N, N)`` and ``mu`` from the token count (always passed; a
        static-shift scheduler ignores it)."""
        n = int(num_inference_steps)
        out: dict = {"sigmas": np.linspace(1.0, 1 / n, n)}
        if image_seq_len is not None:
            out["mu"] = shift_mu(config, image_seq_len, cls.shift_defaults)
        elif uses_dynamic_shift(config):
            cls.flow_mu(config, None)  # raises: μ needs the token count
        return out

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels) // 4  # the transformer sees 2×2-packed latents

    def native_size(self):
        s = int(getattr(self.pipe, "default_sample_size", DEFAULT_SAMPLE_SIZE)) * self.model.vae_scale
        return s, s

    def size_multiple(self) -> int:
        return self.model.vae_scale * 2

    def latent_shape(self, height, width):
        """(C, h, w): the pipeline's (C, 1, h, w) draw without its one-frame axis (same numbers, same order)."""
        s = self.model.vae_scale
        return self.latent_channels, 2 * (height // (s * 2)), 2 * (width // (s * 2))

    def token_step(self) -> int:
        return self.model.vae_scale * 2

    def pack(self, z):
        return self.pipe._pack_latents(z, *z.shape)

    def unpack(self, latents, height, width):
        return self.pipe._unpack_latents(latents, height, width, self.model.vae_scale)[:, :, 0]

    def initial_latents(self, x, init_noise_sigma):
        return self.pack(x)  # QwenImagePipeline does not scale by init_noise_sigma

    # ------------------------------------------------------------------ conditioning
    def encode(self, prompts, cfg, guidance, height, width) -> dict:
        """``encode_prompt`` of the prompts (and, with CFG, of ``""`` per sample, first: ``[uncond; cond]`` rows),
        each padded to ``max_sequence_length`` with mask 0 (see the module docstring)."""
        max_len = int(call_default(self.pipe.__call__, "max_sequence_length", 512))
        n = len(prompts)
        halves = [self._encoded(prompts, 1, max_len)]
        if cfg:
            halves.insert(0, self._encoded([""], n, max_len))  # the pipeline's negative prompt, repeated per image
        _, h, w = self.latent_shape(height, width)
        return {
            "encoder_hidden_states": torch.cat([e for e, _ in halves]),
            "encoder_hidden_states_mask": torch.cat([m for _, m in halves]),
            "img_shape": (1, h // 2, w // 2),  # QwenImagePipeline's img_shapes entry of one image
        }

    def _encoded(self, prompts, per_prompt: int, max_len: int):
        pe, mask = self.pipe.encode_prompt(
            prompt=prompts, device=self.model.device, num_images_per_prompt=per_prompt, max_sequence_length=max_len
        )
        if mask is None:  # encode_prompt drops an all-ones mask
            mask = torch.ones(pe.shape[:2], dtype=torch.long, device=pe.device)
        pad = max_len - pe.shape[1]
        return F.pad(pe, (0, 0, 0, pad)), F.pad(mask, (0, pad))

    # ------------------------------------------------------------------ the denoiser
    def denoise(self, x, t, cond, sampler):
        """As the pipeline: the conditional call, then (CFG) the unconditional one, then :meth:`combine`."""
        t = torch.as_tensor(t, device=x.device)
        if not cond.cfg:
            return self.forward(x, t, cond.kwargs, "cond")
        n = x.shape[0]
        pos = {k: v[n:] if isinstance(v, torch.Tensor) else v for k, v in cond.kwargs.items()}
        neg = {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in cond.kwargs.items()}
        cond_out = self.forward(x, t, pos, "cond")
        uncond_out = self.forward(x, t, neg, "uncond")
        return self.combine(cond_out, uncond_out, cond.guidance)

    def combine(self, cond_out, uncond_out, guidance):
        """``comb = u + g (c − u)``, rescaled per token to the conditional prediction's norm (as the pipeline)."""
        comb = uncond_out + guidance * (cond_out - uncond_out)
        cond_norm = torch.norm(cond_out, dim=-1, keepdim=True)
        noise_norm = torch.norm(comb, dim=-1, keepdim=True)
        return comb * (cond_norm / noise_norm)

    def forward(self, x, t, kwargs, context: str = "cond"):
        """One transformer call; the text trimmed to the batch's longest prompt (``encode_prompt``'s padding), the
        mask dropped when all ones, as the pipeline passes them. ``context``: the transformer's cache context."""
        mask = kwargs["encoder_hidden_states_mask"]
        length = int(mask.sum(dim=1).max())  # encode_prompt puts each prompt's tokens first: its length = its sum
        pe, mask = kwargs["encoder_hidden_states"][:, :length], mask[:, :length]
        with self.denoiser.cache_context(context):
            return self.denoiser(
                hidden_states=x,
                timestep=batched(t, x).to(x.dtype) / 1000,
                guidance=None,
                encoder_hidden_states_mask=None if mask.all() else mask,
                encoder_hidden_states=pe,
                img_shapes=[[kwargs["img_shape"]]] * x.shape[0],
                attention_kwargs={},
                return_dict=False,
            )[0]

    def prediction(self, out):
        return out  # no learned σ

    # ------------------------------------------------------------------ VAE
    def _factors(self, z):
        """The pipeline's ``latents_mean`` and ``1 / latents_std`` in ``z``'s dtype, shaped for (N, C, 1, h, w)."""
        c = self.model.vae.config
        mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1).to(z.device, z.dtype)
        return mean, inv_std

    def latent_factors(self):
        """No scaling/shift factor: per-channel ``latents_mean``/``latents_std`` (z = (x − mean) / std)."""
        c = self.model.vae.config
        return 1.0, 0.0, torch.tensor(c.latents_mean).view(1, -1, 1, 1), torch.tensor(c.latents_std).view(1, -1, 1, 1)

    def decode_latents(self, z):
        """As the pipeline: ``z / (1 / std) + mean`` on the one-frame 5-D latents, frame 0 of the decode."""
        with self.model.vae_dtype() as dtype:
            z = z.unsqueeze(2).to(dtype)
            mean, inv_std = self._factors(z)
            return self.model.vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]

    def encode_images(self, images):
        """The inverse, as the Qwen-Image img2img/edit pipelines encode: ``(mode − mean) · (1 / std)``."""
        with self.model.vae_dtype() as dtype:
            enc = self.model.vae.encode(images.to(self.model.device, dtype).unsqueeze(2))
            z = enc.latent_dist.mode()
            mean, inv_std = self._factors(z)
            return ((z - mean) * inv_std)[:, :, 0]
