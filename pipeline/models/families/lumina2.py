"""Lumina 2: ``Lumina2Pipeline`` (rectified flow), driven as diffusers 0.42 ``Lumina2Pipeline.__call__`` does.

Text: ``encode_prompt`` — the second-to-last hidden states of a Gemma2 encoder on
``system_prompt + " <Prompt Start> " + prompt`` (the pipeline's own system prompt), padded to
``max_sequence_length`` (the ``__call__`` default, 256) with the tokenizer's mask; the negative prompt is encoded
without the system prompt. Latents: (C, 2·⌊H/16⌋, 2·⌊W/16⌋) — the pipeline hard-codes ``vae_scale_factor = 8``
whatever the VAE — drawn in the text encoder's dtype, not scaled by ``init_noise_sigma``; the transformer gets
the timestep ``1 − t / num_train_timesteps`` (Lumina's t = 0 is noise) and predicts the negated velocity (the
solver steps with ``−out``). σ's ``np.linspace(1, 1/N, N)``. Decode ``z / scaling_factor + shift_factor`` in the
VAE's dtype (no upcast, as the pipeline).

``sampler.guidance_scale`` is the pipeline's ``guidance_scale`` g: CFG for g > 1 (``do_classifier_free_guidance``)
against the project's "no prompt" ``""`` (also the pipeline's default negative prompt), as two transformer calls
(conditional, then unconditional), ``comb = u + g (c − u)`` followed by the pipeline's default
``cfg_normalization=True``: ``comb · ‖c‖ / ‖comb‖`` with the norms over the last axis of the (N, C, h, w)
prediction (the latent width, as the pipeline computes it). The default ``cfg_trunc_ratio=1.0`` truncates no step
(``(i + 1) / N > 1`` never holds); the project has no setting for other values.

Refused: a scheduler with a resolution-dependent shift (``use_dynamic_shifting``). The 0.42 pipeline computes its
μ from ``latents.shape[1]`` — the latent *channel* count, not the image token count — and the project derives μ
from the token geometry (also from configs alone, in schedule mode), so that schedule cannot be reproduced;
static-shift schedulers ignore μ and are driven exactly. Attention maps are the next issue (mode not declared).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from pipeline.errors import UserError
from pipeline.models.families.base import Family, FamilyDriver, batched, call_default, register
from pipeline.models.flow_shift import uses_dynamic_shift

__all__ = ["Lumina2"]

VAE_SCALE = 8  # Lumina2Pipeline.vae_scale_factor: a constant, not read from the VAE
DEFAULT_SAMPLE_SIZE = 128  # Lumina2Pipeline's default_sample_size without a transformer config


def _refuse_dynamic_shift(config) -> None:
    if uses_dynamic_shift(config):
        raise UserError(
            "Lumina2Pipeline: the scheduler uses a resolution-dependent shift (use_dynamic_shifting: true), but "
            "diffusers 0.42's Lumina2Pipeline computes its mu from latents.shape[1] (the latent channel count, not "
            "the image token count), which this project cannot reproduce; use a static-shift scheduler config"
        )


@register("Lumina2Pipeline")
class Lumina2(FamilyDriver):
    family = Family("lumina2", "transformer", "text", "latent", flow=True, modes=("metrics", "schedule", "latent"))
    vae_upcast = False  # the pipeline decodes (and its img2img sibling encodes) in the VAE's own dtype

    def __init__(self, model):
        super().__init__(model)
        _refuse_dynamic_shift(self.pipe.scheduler.config)  # up front, before any work

    # ------------------------------------------------------------------ geometry
    @classmethod
    def vae_scale_of(cls, vae_config):
        return VAE_SCALE

    @classmethod
    def flow_geometry(cls, vae_scale, component):
        """Native: transformer sample_size · 8 (``default_image_size``); tokens: 2×2 latent patches (16 px)."""
        transformer = component("transformer") or {}
        return int(transformer.get("sample_size") or DEFAULT_SAMPLE_SIZE) * VAE_SCALE, 2 * VAE_SCALE

    @classmethod
    def flow_timestep_kwargs(cls, config, num_inference_steps, image_seq_len):
        """Lumina2Pipeline's ``sigmas = np.linspace(1, 1/N, N)``; its μ (from the channel count) only matters to a
        dynamic-shift scheduler, which is refused."""
        _refuse_dynamic_shift(config)
        n = int(num_inference_steps)
        return {"sigmas": np.linspace(1.0, 1 / n, n)}

    def size_multiple(self) -> int:
        return VAE_SCALE * 2  # check_inputs: divisible by vae_scale_factor * 2

    def latent_shape(self, height, width):
        return self.latent_channels, 2 * (height // (VAE_SCALE * 2)), 2 * (width // (VAE_SCALE * 2))

    def token_step(self) -> int:
        return VAE_SCALE * 2

    def initial_noise(self, generators, height, width, init_noise_sigma):
        # prepare_latents: randn_tensor in prompt_embeds' dtype (the text encoder's), not scaled by init_noise_sigma
        shape = (len(generators), *self.latent_shape(height, width))
        dtype = self.pipe.text_encoder.dtype
        return randn_tensor(shape, generator=list(generators), device=self.model.device, dtype=dtype)

    # ------------------------------------------------------------------ conditioning
    def encode(self, prompts, cfg, guidance, height, width) -> dict:
        """``encode_prompt`` (system prompt prepended; the ``""`` negative per sample with CFG, first:
        ``[uncond; cond]`` rows), all padded to ``max_sequence_length`` with their masks."""
        max_len = int(call_default(self.pipe.__call__, "max_sequence_length", 256))
        pe, mask, npe, nmask = self.pipe.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=cfg,
            negative_prompt=None,
            device=self.model.device,
            max_sequence_length=max_len,
        )
        if cfg:
            pe, mask = torch.cat([npe, pe]), torch.cat([nmask, mask])
        return {"encoder_hidden_states": pe, "encoder_attention_mask": mask}

    # ------------------------------------------------------------------ the denoiser
    def denoise(self, x, t, cond, sampler):
        """As the pipeline: the conditional call, then (CFG) the unconditional one, :meth:`combine`, negated."""
        t = torch.as_tensor(t, device=x.device)
        if not cond.cfg:
            return -self.forward(x, t, cond.kwargs)
        n = x.shape[0]
        cond_out = self.forward(x, t, {k: v[n:] for k, v in cond.kwargs.items()})
        uncond_out = self.forward(x, t, {k: v[:n] for k, v in cond.kwargs.items()})
        return -self.combine(cond_out, uncond_out, cond.guidance)

    def combine(self, cond_out, uncond_out, guidance):
        """``comb = u + g (c − u)``, then the pipeline's default cfg_normalization: ``comb · ‖c‖ / ‖comb‖`` over the
        last axis."""
        comb = uncond_out + guidance * (cond_out - uncond_out)
        cond_norm = torch.norm(cond_out, dim=-1, keepdim=True)
        noise_norm = torch.norm(comb, dim=-1, keepdim=True)
        return comb * (cond_norm / noise_norm)

    def forward(self, x, t, kwargs):
        """One transformer call at timestep ``1 − t / T`` (T: the pipeline scheduler's num_train_timesteps); the
        raw (negated-velocity) output."""
        T = self.pipe.scheduler.config.num_train_timesteps
        return self.denoiser(
            hidden_states=x, timestep=1 - batched(t, x) / T, attention_kwargs=None, return_dict=False, **kwargs
        )[0]

    def prediction(self, out):
        return out  # no learned σ

    # ------------------------------------------------------------------ VAE
    def latent_factors(self):
        c = self.model.vae.config
        return float(c.scaling_factor), float(getattr(c, "shift_factor", None) or 0.0), None, None
