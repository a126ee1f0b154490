"""Chroma: ``ChromaPipeline`` (rectified flow), driven as diffusers 0.42 ``ChromaPipeline.__call__`` does.

A Flux-architecture model with T5 only (no CLIP, no pooled text, no guidance embedding): the same 2×2-packed latents,
position ids, VAE scaling/shift and ``timestep / 1000`` as :class:`~pipeline.models.families.flux.Flux`, but

* the T5 embeddings are computed *with* the tokenizer's attention mask, and the transformer gets a text mask that
  keeps the prompt tokens plus the first padding token, extended by ones over the image tokens
  (``_prepare_attention_mask``; its float 0/1 values are what the pipeline passes). The mask travels in the
  conditioning as a bool ``text_mask`` (not a float: the latent mode edits floating conditioning tensors only) and is
  turned back into the pipeline's float mask in :meth:`Chroma.forward`;
* ``sampler.guidance_scale`` is the pipeline's ``guidance_scale``: real classifier-free guidance
  ``u + g (c − u)`` when > 1, with the negative prompt the pipeline uses for ``negative_prompt=None`` — the empty
  prompt "" (the project's uncond convention) — and the conditional and unconditional predictions from two separate
  transformer calls (conditional first), each with its own mask, as the pipeline makes them; none at ≤ 1;
* ``set_timesteps`` always gets ``sigmas = linspace(1, 1/N, N)`` and ``mu`` from ``calculate_shift`` (Flux's
  fallbacks 256/4096/0.5/1.15); a static-shift scheduler ignores ``mu``.

IP-Adapter inputs (``image_encoder``/``feature_extractor``) are not used: a text-to-image run passes none, as the
pipeline does without ``ip_adapter_image``. Modes: metrics, schedule, latent; attention is not implemented yet and is
refused up front.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.models.families.base import Family, batched, call_default, register
from pipeline.models.families.flux import Flux
from pipeline.models.flow_shift import shift_mu, uses_dynamic_shift

__all__ = ["Chroma"]

_PER_SAMPLE = ("encoder_hidden_states", "text_mask")  # the conditioning tensors with one row per sample


@register("ChromaPipeline")
class Chroma(Flux):
    """Flux's geometry (packing, ids, native size, VAE factors); Chroma's own text encoding, mask, CFG, σ's."""

    family = Family("chroma", "transformer", "text", "latent", flow=True, modes=("metrics", "schedule", "latent"))

    @classmethod
    def flow_timestep_kwargs(cls, config, num_inference_steps, image_seq_len):
        """ChromaPipeline's: ``sigmas = linspace(1, 1/N, N)`` always (no ``use_flow_sigmas`` switch, unlike Flux)
        and ``mu`` at the packed token count."""
        n = int(num_inference_steps)
        out: dict = {"sigmas": np.linspace(1.0, 1 / n, n)}
        if image_seq_len is not None:
            out["mu"] = shift_mu(config, image_seq_len, cls.shift_defaults)
        elif uses_dynamic_shift(config):
            cls.flow_mu(config, None)  # raises: μ needs the token count
        return out

    def uses_cfg(self, guidance: float) -> bool:
        return guidance > 1  # ChromaPipeline.do_classifier_free_guidance

    def plain_guidance(self, guidance: float) -> float:
        return 1.0  # no distilled guidance embedding

    def encode(self, prompts, cfg, guidance, height, width) -> dict:
        pipe, device = self.pipe, self.model.device
        max_len = int(call_default(pipe.__call__, "max_sequence_length", 512))
        pe, text_ids, mask, npe, _, nmask = pipe.encode_prompt(
            prompt=prompts,
            negative_prompt=None,  # the pipeline's default: "" per prompt
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            max_sequence_length=max_len,
        )
        if cfg:  # [uncond, cond] rows, as every family's CFG conditioning (the latent mode edits the second half)
            pe, mask = torch.cat([npe, pe]), torch.cat([nmask, mask])
        _, h, w = self.latent_shape(height, width)
        # the pipeline makes the image ids in the latents' dtype = prompt_embeds.dtype
        img_ids = pipe._prepare_latent_image_ids(len(prompts), h // 2, w // 2, device, pe.dtype)
        # negative_text_ids equal text_ids: both are zeros over the same max_sequence_length
        return {"encoder_hidden_states": pe, "text_mask": mask.bool(), "txt_ids": text_ids, "img_ids": img_ids}

    def denoise(self, x, t, cond, sampler):
        """Two transformer calls under CFG, conditional then unconditional, as ``ChromaPipeline.__call__``."""
        if sampler is not None and hasattr(sampler, "scale_model_input"):
            x = sampler.scale_model_input(x, t)
        t = torch.as_tensor(t, device=x.device)
        if not cond.cfg:
            return self.forward(x, t, cond.kwargs)
        n = x.shape[0]
        uncond, cond_kw = (
            {k: (v[rows] if k in _PER_SAMPLE else v) for k, v in cond.kwargs.items()}
            for rows in (slice(None, n), slice(n, None))
        )
        cond_out = self.forward(x, t, cond_kw)
        uncond_out = self.forward(x, t, uncond)
        return self.combine(cond_out, uncond_out, cond.guidance)

    def forward(self, x, t, kwargs):
        kw = dict(kwargs)
        text_mask = kw.pop("text_mask")
        # the pipeline's mask: the text mask in prompt_embeds' dtype, concatenated with ones over the image tokens
        kw["attention_mask"] = self.pipe._prepare_attention_mask(
            x.shape[0], x.shape[1], x.dtype, text_mask.to(kw["encoder_hidden_states"].dtype)
        )
        tb = batched(t, x)
        return self.denoiser(hidden_states=x, timestep=tb.to(x.dtype) / 1000, return_dict=False, **kw)[0]

    def attention_layout(self, height, width):
        raise UserError(
            f"mode=[attention]: {type(self.pipe).__name__} (chroma) is not supported yet: its masked joint "
            "attention has no recorder"
        )
