"""Flux: ``FluxPipeline`` (rectified flow).

CLIP pooled + T5, 2×2-packed latents with image/text position ids; ``guidance_scale`` is the *distilled* guidance
fed to the guidance embedding (no CFG; Flux-schnell has none), also for a condition "without guidance"; static or
resolution-dependent (``mu``) shift. Attention: joint attention over [text; image] in double- and single-stream
blocks; text = T5 only.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from pipeline.models.attention import AttentionLayout, ConceptStream, register_recorder
from pipeline.models.families.base import Family, FamilyDriver, batched, call_default, register
from pipeline.models.flow_shift import shift_mu, uses_dynamic_shift

__all__ = ["Flux", "FluxJointRecorder"]

DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size (latent pixels before packing)


@register("FluxPipeline")
class Flux(FamilyDriver):
    family = Family("flux", "transformer", "text", "latent", flow=True)

    @classmethod
    def flow_geometry(cls, vae_scale, component):
        """Native: 128·scale (FluxPipeline's default_sample_size); tokens: 2×2-packed latents."""
        return DEFAULT_SAMPLE_SIZE * vae_scale, 2 * vae_scale

    @classmethod
    def flow_timestep_kwargs(cls, config, num_inference_steps, image_seq_len):
        """FluxPipeline's: ``sigmas = linspace(1, 1/N, N)`` (``num_inference_steps`` instead when the config has
        ``use_flow_sigmas``) and ``mu`` (a static-shift scheduler ignores it)."""
        n = int(num_inference_steps)
        out: dict = (
            {"num_inference_steps": n}
            if config.get("use_flow_sigmas", False)
            else {"sigmas": np.linspace(1.0, 1 / n, n)}
        )
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
        s = self.model.vae_scale
        return self.latent_channels, 2 * (height // (s * 2)), 2 * (width // (s * 2))

    def token_step(self) -> int:
        return self.model.vae_scale * 2

    def pack(self, z):
        return self.pipe._pack_latents(z, *z.shape)

    def unpack(self, latents, height, width):
        return self.pipe._unpack_latents(latents, height, width, self.model.vae_scale)

    def initial_latents(self, x, init_noise_sigma):
        return self.pack(x)  # FluxPipeline does not scale by init_noise_sigma

    def uses_cfg(self, guidance: float) -> bool:
        return False  # distilled guidance embedding, not CFG

    def plain_guidance(self, guidance: float) -> float:
        return guidance

    def encode(self, prompts, cfg, guidance, height, width) -> dict:
        pipe, device = self.pipe, self.model.device
        max_len = int(call_default(pipe.__call__, "max_sequence_length", 512))
        pe, ppe, text_ids = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1, max_sequence_length=max_len
        )
        _, h, w = self.latent_shape(height, width)
        img_ids = pipe._prepare_latent_image_ids(len(prompts), h // 2, w // 2, device, pe.dtype)
        g = None
        if getattr(self.denoiser.config, "guidance_embeds", False):
            g = torch.full([1], guidance, device=device, dtype=torch.float32).expand(len(prompts))
        return {
            "encoder_hidden_states": pe,
            "pooled_projections": ppe,
            "txt_ids": text_ids,
            "img_ids": img_ids,
            "guidance": g,
        }

    def forward(self, x, t, kwargs):
        tb = batched(t, x)
        return self.denoiser(hidden_states=x, timestep=tb.to(x.dtype) / 1000, return_dict=False, **kwargs)[0]

    def prediction(self, out):
        return out  # no learned σ

    def latent_factors(self):
        scale, _, _, _ = super().latent_factors()
        return scale, float(getattr(self.model.vae.config, "shift_factor", None) or 0.0), None, None

    def attention_layout(self, height, width) -> AttentionLayout:
        """Joint attention [text; image] in double- and single-stream blocks; text = T5 only."""
        _, h, w = self.latent_shape(height, width)
        layers = tuple(
            k
            for k in self.denoiser.attn_processors
            if re.fullmatch(r"(single_)?transformer_blocks\.\d+\.attn\.processor", k)
        )
        t5 = int(call_default(self.pipe.__call__, "max_sequence_length", 512))
        double = tuple(k.removesuffix(".attn.processor") for k in layers if k.startswith("transformer_blocks."))
        concepts = ConceptStream(double, flux_concept_step)
        return AttentionLayout(
            "flux", layers, (h // 2, w // 2), self.pipe.tokenizer_2, t5, (0, t5), True, "T5", None, concepts
        )

    def concept_tokens(self, words: list[str]) -> torch.Tensor:
        """Each concept word encoded alone by the pipeline's own ``encode_prompt`` (T5); its tokens averaged; the
        transformer's ``context_embedder`` applied. Concept tokens sit at text position 0 (Flux.1's ``txt_ids``
        are zeros: no rotation)."""
        h, w = self.native_size()
        embeds = self.encode(words, False, 1.0, h, w)["encoder_hidden_states"]
        mean = self._concept_segment_mean(words, embeds, self.attention_layout(h, w))
        return self.denoiser.context_embedder(mean.to(self.denoiser.dtype))


def flux_concept_step(block, c, key, value, kwargs):
    """Flux's double-stream ``FluxTransformerBlock`` (diffusers 0.42) text-stream path applied to concept tokens:
    AdaLN-Zero by ``temb``, the added projections and q/k RMS norms (no rotation: text position 0), attention over
    [image; concepts], ``to_add_out``, gate, context MLP (fp16 clipped as the block does). Single-stream blocks share
    one set of weights for text and image and are not used for concepts (ConceptAttention uses the MM-attention
    blocks)."""
    temb, attn = kwargs["temb"], block.attn
    norm_c, g_msa, shift, scale, g_mlp = block.norm1_context(c, emb=temb)
    cq, ck, cv = (
        proj(norm_c).unflatten(-1, (-1, attn.head_dim)) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
    )
    cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
    cq, ck, cv = (t.transpose(1, 2) for t in (cq, ck, cv))
    out = torch.nn.functional.scaled_dot_product_attention(cq, torch.cat([key, ck], 2), torch.cat([value, cv], 2))
    out = out.transpose(1, 2).flatten(2).to(cq.dtype)
    c = c + g_msa.unsqueeze(1) * attn.to_add_out(out)
    c = c + g_mlp.unsqueeze(1) * block.ff_context(block.norm2_context(c) * (1 + scale[:, None]) + shift[:, None])
    if c.dtype == torch.float16:
        c = c.clip(-65504, 65504)
    return c, out


@register_recorder("flux")
class FluxJointRecorder:
    """Flux's ``FluxAttnProcessor`` (diffusers 0.42), step for step, recording the joint softmax's image rows.
    Double-stream blocks get the text stream separately; single-stream blocks get [text; image] in one sequence."""

    def __init__(self, cap, name: str):
        self.cap, self.name = cap, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        # diffusers' Flux transformer module is slow to import: only when a Flux layer runs
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        n_image = hidden_states.shape[1] if encoder_hidden_states is not None else self.cap.n_image_tokens
        if attn.added_kv_proj_dim is not None:
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            query, key, value = (
                torch.cat([eq, query], dim=1),
                torch.cat([ek, key], dim=1),
                torch.cat([ev, value], dim=1),
            )
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        L = query.shape[1]
        self._record(query.transpose(1, 2), key.transpose(1, 2), (L - n_image, L), attention_mask)
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None and self.cap.wants_output and self.cap.recording:  # image rows after text
            t = L - n_image
            self.cap._record_image_output(
                self.name, key[:, t:].transpose(1, 2), value[:, t:].transpose(1, 2), hidden_states[:, t:]
            )
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states

    def _record(self, q: torch.Tensor, k: torch.Tensor, image: tuple[int, int], mask: torch.Tensor | None) -> None:
        """(n, heads, L, d) Q and K, [text; image]: Flux's text-to-image call has no attention mask (a family
        copying this processor with one overrides this: Chroma)."""
        self.cap._record_joint(self.name, q, k, image=image, text=(0, image[0]))
