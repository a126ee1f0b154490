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
pipeline does without ``ip_adapter_image``. Modes: metrics, schedule, latent, attention.

Attention (:class:`ChromaJointRecorder`): Flux's joint attention over [text; image] (``FluxAttnProcessor``) in the
double- and single-stream blocks, text = T5 (``max_sequence_length``, right-padded). The mask the pipeline builds is
*float* 0/1 and diffusers 0.42 hands it to ``scaled_dot_product_attention`` as such, which *adds* it to the logits: an
image query's logits get +1 on the kept keys (prompt, first padding token, image) and +0 on the rest of the padding
— a bias, not a mask; the rest of the padding keeps some mass. The recorder reproduces exactly that softmax.
Under CFG only the conditional call (the first) is recorded. Output-space concept maps (ConceptAttention,
:func:`chroma_concept_step`): the concept tokens ride the text stream of the double-stream blocks; the single-stream
blocks are left out.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from pipeline.models.attention import AttentionLayout, ConceptStream, register_recorder
from pipeline.models.families.base import Family, batched, call_default, register
from pipeline.models.families.flux import Flux, FluxJointRecorder, flux_concept_step
from pipeline.models.flow_shift import shift_mu, uses_dynamic_shift

__all__ = ["Chroma", "ChromaJointRecorder", "chroma_concept_step"]

_PER_SAMPLE = ("encoder_hidden_states", "text_mask")  # the conditioning tensors with one row per sample


@register("ChromaPipeline")
class Chroma(Flux):
    """Flux's geometry (packing, ids, native size, VAE factors); Chroma's own text encoding, mask, CFG, σ's."""

    family = Family(
        "chroma", "transformer", "text", "latent", flow=True, modes=("metrics", "schedule", "latent", "attention")
    )
    cfg_calls = "two_calls"  # CFG: a conditional call, then an unconditional one (attention capture)

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

    def attention_layout(self, height, width) -> AttentionLayout:
        """Flux's layers and grid (joint attention [text; image]); text = T5, ``max_sequence_length`` tokens."""
        _, h, w = self.latent_shape(height, width)
        layers = tuple(
            k
            for k in self.denoiser.attn_processors
            if re.fullmatch(r"(single_)?transformer_blocks\.\d+\.attn\.processor", k)
        )
        t5 = int(call_default(self.pipe.__call__, "max_sequence_length", 512))
        double = tuple(k.removesuffix(".attn.processor") for k in layers if k.startswith("transformer_blocks."))
        concepts = ConceptStream(double, chroma_concept_step)
        return AttentionLayout(
            "chroma", layers, (h // 2, w // 2), self.pipe.tokenizer, t5, (0, t5), True, "T5", None, concepts
        )

    # concept_tokens: Flux's — each word encoded alone by this driver's encode (T5 with its attention mask, as
    # ChromaPipeline.encode_prompt), the mean over its T5 tokens, the transformer's context_embedder (the only thing
    # ChromaTransformer2DModel applies to the text before its first block)


def chroma_concept_step(block, c, key, value, kwargs):
    """Chroma's double-stream ``ChromaTransformerBlock`` (diffusers 0.42) text-stream path applied to concept tokens.

    The block is Flux's ``FluxTransformerBlock`` (``FluxAttention`` + ``FluxAttnProcessor``, ``norm2_context``,
    GELU ``ff_context``) whose modulation comes from the transformer's ``distilled_guidance_layer`` (the
    approximator) instead of ``temb``: the block gets ``temb`` (n, 12, dim), rows 0–5 for the image stream and
    rows 6–11 for the text stream, which ``ChromaAdaLayerNormZeroPruned`` splits into shift/scale/gate of attention
    and MLP in Flux's order — so the text path is :func:`~pipeline.models.families.flux.flux_concept_step` with
    ``temb[:, 6:]``. Rotary: text position 0 (Chroma's ``txt_ids`` are zeros, as Flux's: no rotation).

    Mask: the pipeline's float text mask makes the block add ``m_q·m_k`` to the logits (a bias, module docstring).
    The concepts are real tokens (mask 1) attending to image keys (mask 1) and concept keys (mask 1): every logit of
    a concept row gets the same +1, which the softmax ignores — exactly the block's own forward with the concepts as
    its text stream and an all-ones mask, so no mask is applied here. Single-stream blocks (shared weights, one
    sequence) are not used for concepts."""
    return flux_concept_step(block, c, key, value, {"temb": kwargs["temb"][:, 6:]})


@register_recorder("chroma")
class ChromaJointRecorder(FluxJointRecorder):
    """Chroma's ``FluxAttnProcessor`` (diffusers 0.42) with the attention mask ``ChromaTransformerBlock`` /
    ``ChromaSingleTransformerBlock`` pass it, step for step: [text; image] (double-stream blocks project the text
    stream apart), the stock attention on the stock Q, K, V and mask.

    The maps get the same logits: a boolean mask is handed over as ``key_mask``; the pipeline's float mask, added to
    the logits by SDPA, is a per-key bias for the image rows (their own mask entry is 1, so row i gets ``m_i·m_k`` =
    ``m_k``), folded into one extra dimension: ``q' = [q·√((d+1)/d), 1]``, ``k' = [k, b·√(d+1)]`` give
    ``q'·k'/√(d+1) = q·k/√d + b`` (float32)."""

    def _record(self, q: torch.Tensor, k: torch.Tensor, image: tuple[int, int], mask: torch.Tensor | None) -> None:
        """(n, heads, L, d) Q, K; ``mask``: the block's (n, 1, L, L) mask (or None), read at an image query row."""
        if not self.cap.recording:  # the unconditional call of a two-call CFG step
            return
        text = (0, image[0])
        if mask is None:
            self.cap._record_joint(self.name, q, k, image=image, text=text)
            return
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-1] != q.shape[2]:
            raise ValueError(f"{self.name}: expected Chroma's (n, 1, L, L) attention mask, got {tuple(mask.shape)}")
        row = mask[:, 0, image[0], :]  # (n, L): what every image query row adds / keeps
        if row.dtype == torch.bool:
            self.cap._record_joint(self.name, q, k, image=image, text=text, key_mask=row)
            return
        d = q.shape[-1]
        q = torch.cat([q.float() * math.sqrt((d + 1) / d), q.new_ones((*q.shape[:-1], 1), dtype=torch.float32)], -1)
        bias = row.float()[:, None, :, None].expand(-1, k.shape[1], -1, -1) * math.sqrt(d + 1)
        self.cap._record_joint(self.name, q, torch.cat([k.float(), bias], -1), image=image, text=text)
