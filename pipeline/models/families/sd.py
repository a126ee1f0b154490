"""Stable Diffusion 1.x (ε) and 2.x (v): ``StableDiffusionPipeline``.

CLIP ``encode_prompt``; CFG halves [uncond "", cond]; UNets with a guidance embedding (LCM) take the guidance scale
as ``timestep_cond`` instead of CFG, as the SD pipelines do. Attention: the UNet's ``attn2`` at every resolution,
over the CLIP tokens (start token included).
"""

from __future__ import annotations

import torch

from pipeline.models.attention import AttentionLayout, cross_attention_layers
from pipeline.models.families.base import Family, FamilyDriver, register

__all__ = ["StableDiffusion"]


@register("StableDiffusionPipeline")
class StableDiffusion(FamilyDriver):
    family = Family("sd", "unet", "text", "latent")

    def uses_cfg(self, guidance: float) -> bool:
        if getattr(self.denoiser.config, "time_cond_proj_dim", None) is not None:
            return False  # the guidance scale is embedded (timestep_cond), not applied as CFG
        return super().uses_cfg(guidance)

    def encode(self, prompts, cfg, guidance, height, width) -> dict:
        pe, npe = self.pipe.encode_prompt(prompts, self.model.device, 1, cfg, negative_prompt=None)
        kwargs = {"encoder_hidden_states": torch.cat([npe, pe]) if cfg else pe}
        kwargs.update(self.timestep_cond(guidance, len(prompts)))
        return kwargs

    def timestep_cond(self, guidance: float, n: int) -> dict:
        """LCM-style UNets embed the guidance scale (the SD pipelines' ``get_guidance_scale_embedding``)."""
        dim = getattr(self.denoiser.config, "time_cond_proj_dim", None)
        if dim is None:
            return {}
        g = torch.tensor(guidance - 1).repeat(n)
        emb = self.pipe.get_guidance_scale_embedding(g, embedding_dim=dim)
        return {"timestep_cond": emb.to(self.model.device, self.model.dtype)}

    def text_context(self, prompts):
        return self.encode(list(prompts), False, 1.0, *self.native_size())["encoder_hidden_states"]

    def forward(self, x, t, kwargs):
        return self.denoiser(x, t, return_dict=False, **kwargs)[0]

    def attention_layout(self, height, width) -> AttentionLayout:
        """UNet attn2 at every resolution; CLIP tokens with a start token."""
        _, h, w = self.latent_shape(height, width)
        tok = self.pipe.tokenizer
        n = int(tok.model_max_length)
        return AttentionLayout("cross", tuple(cross_attention_layers(self.denoiser)), (h, w), tok, n, (0, n))
