"""Stable Diffusion XL: ``StableDiffusionXLPipeline``.

Two CLIP encoders + pooled embeddings + time ids (original = target = size, crop (0, 0));
``force_zeros_for_empty_prompt`` as the model config says; VAE ``latents_mean/std`` when its config has them.
Everything else (LCM guidance embedding, the UNet call, attention) as SD 1.x/2.x.
"""

from __future__ import annotations

import torch

from pipeline.models.families.base import Family, FamilyDriver, register
from pipeline.models.families.sd import StableDiffusion

__all__ = ["StableDiffusionXL"]


@register("StableDiffusionXLPipeline")
class StableDiffusionXL(StableDiffusion):
    family = Family("sdxl", "unet", "text", "latent")
    text_context = FamilyDriver.text_context  # two encoders: no single context tensor

    def encode(self, prompts, cfg, guidance, height, width) -> dict:
        pipe = self.pipe
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=prompts,
            device=self.model.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=None,
        )
        proj = int(ppe.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        time_ids = pipe._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=pe.dtype, text_encoder_projection_dim=proj
        )
        if cfg:
            pe, ppe, time_ids = torch.cat([npe, pe]), torch.cat([nppe, ppe]), torch.cat([time_ids, time_ids])
        time_ids = time_ids.to(self.model.device).repeat(len(prompts), 1)
        kwargs = {"encoder_hidden_states": pe, "added_cond_kwargs": {"text_embeds": ppe, "time_ids": time_ids}}
        kwargs.update(self.timestep_cond(guidance, len(prompts)))
        return kwargs

    def latent_factors(self):
        scale, shift, _, _ = super().latent_factors()
        cfg = self.model.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            c = len(mean)
            return scale, shift, torch.tensor(mean).view(1, c, 1, 1), torch.tensor(std).view(1, c, 1, 1)
        return scale, shift, None, None
