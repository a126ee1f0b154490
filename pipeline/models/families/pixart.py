"""PixArt-α / Σ: ``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``.

T5 ``encode_prompt`` (negative ""), attention masks, learned-σ output (first half of the channels),
resolution/aspect micro-conditioning when the transformer has it (sample_size 128, PixArt-α 1024). Generated at
the requested size = ``use_resolution_binning=False`` (identical at the native size). Attention: the transformer's
``attn2`` on the patch grid, over the T5 tokens (no start token; the mask gives padding zero mass).
"""

from __future__ import annotations

import torch

from pipeline.models.attention import AttentionLayout, cross_attention_layers
from pipeline.models.families.base import Family, FamilyDriver, batched, call_default, register

__all__ = ["PixArt"]


@register("PixArtAlphaPipeline", "PixArtSigmaPipeline")
class PixArt(FamilyDriver):
    family = Family("pixart", "transformer", "text", "latent")

    def size_multiple(self) -> int:
        return self.model.vae_scale * int(getattr(self.denoiser.config, "patch_size", None) or 1)

    def encode(self, prompts, cfg, guidance, height, width) -> dict:
        from diffusers.utils import is_bs4_available, is_ftfy_available  # diffusers: slow to import (config time)

        pipe, device = self.pipe, self.model.device
        clean = bool(call_default(pipe.__call__, "clean_caption", False)) and is_bs4_available() and is_ftfy_available()
        max_len = int(call_default(pipe.__call__, "max_sequence_length", 120))
        pe, pam, npe, npam = pipe.encode_prompt(
            prompts,
            cfg,
            negative_prompt="",
            num_images_per_prompt=1,
            device=device,
            clean_caption=clean,
            max_sequence_length=max_len,
        )
        if cfg:
            pe, pam = torch.cat([npe, pe]), torch.cat([npam, pam])
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(self.denoiser.config, "sample_size", None) == 128:  # PixArt-α 1024: size micro-conditioning
            b = len(pe)
            res = torch.tensor([height, width]).repeat(b, 1).to(dtype=pe.dtype, device=device)
            ar = torch.tensor([float(height / width)]).repeat(b, 1).to(dtype=pe.dtype, device=device)
            added = {"resolution": res, "aspect_ratio": ar}
        return {"encoder_hidden_states": pe, "encoder_attention_mask": pam, "added_cond_kwargs": added}

    def forward(self, x, t, kwargs):
        return self.denoiser(x, timestep=batched(t, x), return_dict=False, **kwargs)[0]

    def attention_layout(self, height, width) -> AttentionLayout:
        """Transformer attn2 on the patch grid; T5 tokens (no start token), padding masked."""
        _, h, w = self.latent_shape(height, width)
        p = int(self.denoiser.config.patch_size)
        n = int(call_default(self.pipe.__call__, "max_sequence_length", 120))
        return AttentionLayout(
            "cross",
            tuple(cross_attention_layers(self.denoiser)),
            (h // p, w // p),
            self.pipe.tokenizer,
            n,
            (0, n),
            segment_name="T5",
        )
