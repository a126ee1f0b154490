"""Stable Diffusion 3: ``StableDiffusion3Pipeline`` (rectified flow).

Two CLIP + optional T5 (a checkpoint saved without T5 loads with None), pooled projections; VAE ``shift_factor``.
Attention: joint attention over [image; text] with text = [CLIP-L|G (77); T5 (max_sequence_length)]; the maps come
from the T5 segment when T5 is loaded, else from CLIP-L.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from pipeline.models.attention import AttentionLayout, ConceptStream, register_recorder
from pipeline.models.families.base import Family, FamilyDriver, batched, call_default, register

__all__ = ["StableDiffusion3", "SD3JointRecorder"]


@register("StableDiffusion3Pipeline")
class StableDiffusion3(FamilyDriver):
    family = Family("sd3", "transformer", "text", "latent", flow=True)
    shift_defaults = (256, 4096, 0.5, 1.16)  # StableDiffusion3Pipeline's calculate_shift fallbacks

    @classmethod
    def flow_geometry(cls, vae_scale, component):
        """Native: transformer sample_size·scale; tokens: latent patches (h / scale / patch)·(w / scale / patch)."""
        transformer = component("transformer") or {}
        native = int(transformer.get("sample_size") or 128) * vae_scale
        return native, vae_scale * int(transformer.get("patch_size") or 2)

    def size_multiple(self) -> int:
        return self.model.vae_scale * int(getattr(self.denoiser.config, "patch_size", None) or 1)

    def encode(self, prompts, cfg, guidance, height, width) -> dict:
        max_len = int(call_default(self.pipe.__call__, "max_sequence_length", 256))
        pe, npe, ppe, nppe = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.model.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=None,
            max_sequence_length=max_len,
        )
        if cfg:
            pe, ppe = torch.cat([npe, pe]), torch.cat([nppe, ppe])
        return {"encoder_hidden_states": pe, "pooled_projections": ppe}

    def forward(self, x, t, kwargs):
        return self.denoiser(hidden_states=x, timestep=batched(t, x), return_dict=False, **kwargs)[0]

    def latent_factors(self):
        scale, _, _, _ = super().latent_factors()
        return scale, float(getattr(self.model.vae.config, "shift_factor", None) or 0.0), None, None

    def attention_layout(self, height, width) -> AttentionLayout:
        """Joint attention [image; text]; text = [CLIP-L|G (77); T5 (max_sequence_length)]."""
        pipe = self.pipe
        _, h, w = self.latent_shape(height, width)
        p = int(self.denoiser.config.patch_size)
        layers = tuple(
            k for k in self.denoiser.attn_processors if re.fullmatch(r"transformer_blocks\.\d+\.attn\.processor", k)
        )
        clip = int(pipe.tokenizer_max_length)
        t5 = int(call_default(pipe.__call__, "max_sequence_length", 256))
        blocks = tuple(k.removesuffix(".attn.processor") for k in layers)
        concepts = ConceptStream(blocks, sd3_concept_step)
        if getattr(pipe, "text_encoder_3", None) is not None:
            return AttentionLayout(
                "sd3", layers, (h // p, w // p), pipe.tokenizer_3, t5, (clip, clip + t5), True, "T5", None, concepts
            )
        return AttentionLayout(
            "sd3", layers, (h // p, w // p), pipe.tokenizer, clip, (0, clip), True, "CLIP-L", None, concepts
        )

    def concept_tokens(self, words: list[str]) -> torch.Tensor:
        """Each concept word encoded alone by the pipeline's own ``encode_prompt``; its tokens in the maps' segment
        (T5, else CLIP-L) averaged; the transformer's ``context_embedder`` applied (the text stream's input)."""
        h, w = self.native_size()
        embeds = self.encode(words, False, 1.0, h, w)["encoder_hidden_states"]
        mean = self._concept_segment_mean(words, embeds, self.attention_layout(h, w))
        return self.denoiser.context_embedder(mean.to(self.denoiser.dtype))


def sd3_concept_step(block, c, key, value, kwargs):
    """SD3's ``JointTransformerBlock`` (diffusers 0.42) text-stream path applied to concept tokens ``c``: AdaLN-Zero
    modulation by ``temb`` (``AdaLayerNormContinuous`` in the last, context-pre-only block), the added q/k/v
    projections and norms, attention over [image; concepts], ``to_add_out``, gate, then the context MLP."""
    temb, attn = kwargs["temb"], block.attn
    if block.context_pre_only:
        norm_c = block.norm1_context(c, temb)
    else:
        norm_c, g_msa, shift, scale, g_mlp = block.norm1_context(c, emb=temb)
    b, n_c, _ = norm_c.shape
    d = key.shape[-1]
    cq, ck, cv = (
        proj(norm_c).view(b, n_c, attn.heads, d).transpose(1, 2)
        for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
    )
    if attn.norm_added_q is not None:
        cq = attn.norm_added_q(cq)
    if attn.norm_added_k is not None:
        ck = attn.norm_added_k(ck)
    out = F.scaled_dot_product_attention(cq, torch.cat([key, ck], 2), torch.cat([value, cv], 2))
    out = out.transpose(1, 2).reshape(b, n_c, attn.heads * d).to(cq.dtype)
    if block.context_pre_only:
        return c, out
    c = c + g_msa.unsqueeze(1) * attn.to_add_out(out)
    c = c + g_mlp.unsqueeze(1) * block.ff_context(block.norm2_context(c) * (1 + scale[:, None]) + shift[:, None])
    return c, out


@register_recorder("sd3")
class SD3JointRecorder:
    """SD3's ``JointAttnProcessor2_0`` (diffusers 0.42), step for step, recording the joint softmax's image rows."""

    def __init__(self, cap, name: str):
        self.cap, self.name = cap, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        b = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(b, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:  # the text stream, appended after the image tokens
            cq, ck, cv = (
                p(encoder_hidden_states).view(b, -1, attn.heads, head_dim).transpose(1, 2)
                for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            query, key, value = (
                torch.cat([query, cq], dim=2),
                torch.cat([key, ck], dim=2),
                torch.cat([value, cv], dim=2),
            )
            n = residual.shape[1]
            self.cap._record_joint(self.name, query, key, image=(0, n), text=(n, query.shape[2]))
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None and self.cap.wants_output:
            n = residual.shape[1]
            self.cap._record_image_output(self.name, key[:, :, :n], value[:, :, :n], hidden_states[:, :n])
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return (hidden_states, encoder_hidden_states) if encoder_hidden_states is not None else hidden_states
