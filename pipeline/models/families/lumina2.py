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
static-shift schedulers ignore μ and are driven exactly.

Attention: the joint layers (``layers.N.attn``, ``Lumina2AttnProcessor2_0``; the caption-only and image-only
refiners are not joint) attend over one sequence per sample, [caption's own tokens; image], right-padded to the
batch's longest under a boolean mask — so the image starts at a different position in each sample. The caption is
``system_prompt + " <Prompt Start> " + prompt`` (``<bos>`` first, at most ``max_sequence_length`` tokens): the segment
is those slots; only the prompt's tokens map to words; the maps renormalise over all the caption's tokens (system
prompt included: the model attends to them). The recorder lays each sample out as [caption padded to the segment's S
slots (masked); image] — a permutation of the keys plus masked ones, so the probabilities are the model's.

ConceptAttention (:func:`lumina2_concept_step`): the joint layers are single-stream (one set of per-token weights
and one modulation for text and image), so the concepts are exactly extra caption tokens the image never sees,
at caption position 0, after the caption embedder and the context refiner run on each as a one-token caption.
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from pipeline.errors import UserError
from pipeline.models.attention import AttentionLayout, ConceptStream, attention_processors, register_recorder
from pipeline.models.families.base import Family, FamilyDriver, batched, call_default, register
from pipeline.models.flow_shift import uses_dynamic_shift
from pipeline.models.tokens import prompt_tokens

__all__ = ["Lumina2", "Lumina2JointRecorder", "lumina2_concept_step"]

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
    family = Family(
        "lumina2", "transformer", "text", "latent", flow=True, modes=("metrics", "schedule", "attention", "latent")
    )
    cfg_calls = "two_calls"  # CFG: a conditional call, then an unconditional one (attention capture)
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

    # ------------------------------------------------------------------ attention
    def attention_layout(self, height, width) -> AttentionLayout:
        """The joint layers' attention; the segment: the system-prompted caption's slots (module docstring)."""
        _, h, w = self.latent_shape(height, width)
        p = int(self.denoiser.config.patch_size)
        layers = tuple(
            k for k in attention_processors(self.denoiser) if re.fullmatch(r"layers\.\d+\.attn\.processor", k)
        )
        max_len = int(call_default(self.pipe.__call__, "max_sequence_length", 256))
        tok = self.pipe.tokenizer
        prefix = (self.pipe.system_prompt + " <Prompt Start> ").replace("{", "{{").replace("}", "}}")
        tokenize = functools.partial(prompt_tokens, tok, max_length=max_len, template=prefix + "{}", trail=0)
        blocks = tuple(k.removesuffix(".attn.processor") for k in layers)
        concepts = ConceptStream(blocks, lumina2_concept_step)
        return AttentionLayout(
            "lumina2", layers, (h // p, w // p), tok, max_len, (0, max_len), True, "Gemma2", tokenize, concepts
        )

    def concept_tokens(self, words: list[str]) -> torch.Tensor:
        """Each concept word encoded alone by the pipeline's own ``encode_prompt`` (system prompt included); the mean
        over the word's tokens; then what the transformer does to a caption before its joint layers: the
        ``caption_embedder`` and the ``context_refiner`` layers, run on each concept as a one-token caption of its
        own (its self-attention sees that token only; rotary position 0, the caption's first)."""
        h, w = self.native_size()
        kw = self.encode(words, False, 1.0, h, w)
        tr = self.denoiser
        mean = self._concept_segment_mean(words, kw["encoder_hidden_states"], self.attention_layout(h, w))
        c = tr.time_caption_embed.caption_embedder(mean.to(tr.dtype))[:, None]  # (C, 1, D): one-token captions
        mask = torch.ones(c.shape[:2], dtype=kw["encoder_attention_mask"].dtype, device=c.device)
        p = int(tr.config.patch_size)
        latent = torch.zeros((len(words), tr.config.in_channels, p, p), dtype=c.dtype, device=c.device)
        cap_freqs = tr.rope_embedder(latent, mask)[1]  # the model's own rotary for a one-token caption
        for layer in tr.context_refiner:
            c = layer(c, mask, cap_freqs)
        return c[:, 0]


def lumina2_concept_step(block, c, key, value, kwargs):
    """Lumina 2's joint ``Lumina2TransformerBlock`` (diffusers 0.42) applied to concept tokens ``c`` as extra caption
    tokens the image never sees. The block is single-stream — one set of weights and one modulation
    (``norm1``: ``LuminaRMSNormZero`` of ``temb``) for text and image, all per token except the attention — so this
    is exactly the path a caption token takes, its attention restricted to [image keys; concept keys]: ``to_q/k/v``
    (grouped-query heads repeated), the RMS q/k norms, rotary at text position 0 (the first caption slot's rotation
    from the block's own ``image_rotary_emb``, an identity), ``to_out``, ``norm2``, tanh gate, the feed-forward."""
    from diffusers.models.embeddings import apply_rotary_emb

    attn = block.attn
    norm_c, gate_msa, scale_mlp, gate_mlp = block.norm1(c, kwargs["temb"])
    b, n_c, d = c.shape[0], c.shape[1], key.shape[-1]
    dtype = norm_c.dtype
    cq = attn.to_q(norm_c).view(b, n_c, attn.heads, d)
    ck, cv = (p(norm_c) for p in (attn.to_k, attn.to_v))
    kv_heads = ck.shape[-1] // d
    ck, cv = ck.view(b, n_c, kv_heads, d), cv.view(b, n_c, kv_heads, d)
    if attn.norm_q is not None:
        cq = attn.norm_q(cq)
    if attn.norm_k is not None:
        ck = attn.norm_k(ck)
    rope = kwargs["image_rotary_emb"][:, :1].expand(b, n_c, -1)  # caption slot 0: position (0, 0, 0)
    cq, ck = apply_rotary_emb(cq, rope, use_real=False).to(dtype), apply_rotary_emb(ck, rope, use_real=False).to(dtype)
    n_rep = attn.heads // kv_heads
    if n_rep >= 1:
        ck = ck.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
        cv = cv.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
    cq, ck, cv = (t.transpose(1, 2) for t in (cq, ck, cv))
    out = F.scaled_dot_product_attention(cq, torch.cat([key, ck], 2), torch.cat([value, cv], 2), scale=attn.scale)
    out = out.transpose(1, 2).reshape(b, n_c, attn.heads * d).type_as(cq)
    c = c + gate_msa.unsqueeze(1).tanh() * block.norm2(attn.to_out[1](attn.to_out[0](out)))
    mlp = block.feed_forward(block.ffn_norm1(c) * (1 + scale_mlp.unsqueeze(1)))
    return c + gate_mlp.unsqueeze(1).tanh() * block.ffn_norm2(mlp), out


@register_recorder("lumina2")
class Lumina2JointRecorder:
    """Lumina 2's ``Lumina2AttnProcessor2_0`` (diffusers 0.42), step for step, recording the joint softmax's image
    rows. The model's sequence per sample is [caption (its mask's count less the image tokens); image
    (``cap.n_image_tokens``)], padded under its boolean mask; the recorded Q/K gather each sample's caption into the
    segment's S slots (the rest masked) and its image after them: text = (0, S), image = (S, S + image tokens). A
    ``base_sequence_length`` (proportional attention, never passed by the 0.42 blocks) scales the recorded query so
    that ``q·k / √d`` is the model's logit."""

    def __init__(self, cap, name: str):
        self.cap, self.name = cap, name

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states,
        attention_mask=None,
        image_rotary_emb=None,
        base_sequence_length=None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        batch_size, sequence_length, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = query.shape[-1] // attn.heads
        dtype = query.dtype
        kv_heads = key.shape[-1] // head_dim
        query = query.view(batch_size, -1, attn.heads, head_dim)
        key, value = key.view(batch_size, -1, kv_heads, head_dim), value.view(batch_size, -1, kv_heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=False)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=False)
        query, key = query.to(dtype), key.to(dtype)
        scale = attn.scale
        if base_sequence_length is not None:  # proportional attention
            scale = math.sqrt(math.log(sequence_length, base_sequence_length)) * attn.scale
        n_rep = attn.heads // kv_heads  # grouped-query attention: keys and values repeated per query head
        if n_rep >= 1:
            key = key.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
            value = value.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
        if attention_mask is not None:
            attention_mask = attention_mask.bool().view(batch_size, 1, 1, -1)
        self._record(query * (scale * math.sqrt(head_dim)) if scale != attn.scale else query, key, attention_mask)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scale)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).type_as(query)
        if self.cap.wants_output and self.cap.recording:  # the concept stream's image rows
            self._record_output(key, value, out, attention_mask)
        return attn.to_out[1](attn.to_out[0](out))

    def _image_rows(self, t: torch.Tensor, mask) -> torch.Tensor:
        """(b, L, ...) -> (b, image tokens, ...): each sample's image tokens, after its caption."""
        b, L = t.shape[:2]
        n_image = self.cap.n_image_tokens
        caption = (
            torch.full((b,), L - n_image, device=t.device) if mask is None else mask.reshape(b, -1).sum(1) - n_image
        )
        rows = caption[:, None] + torch.arange(n_image, device=t.device)
        return torch.gather(t, 1, rows.view(b, n_image, *[1] * (t.ndim - 2)).expand(-1, -1, *t.shape[2:]))

    def _record_output(self, key, value, out, mask) -> None:
        """The image rows' keys and values (b, heads, image tokens, d) and attention output, for the concepts."""
        key, value = (self._image_rows(t.transpose(1, 2), mask).transpose(1, 2) for t in (key, value))
        self.cap._record_image_output(self.name, key, value, self._image_rows(out, mask))

    def _record(self, query, key, mask) -> None:
        """[caption in the call's longest-caption slots (each sample's own length, the rest masked); image] per
        sample, (b, heads, slots + image tokens, d), without a host sync."""
        b, L, heads, d = key.shape
        n_image = self.cap.n_image_tokens
        slots = L - n_image  # the call's longest caption; the capture zero-fills the segment's slots past it
        if slots > self.cap.layout.segment[1]:
            raise ValueError(f"{self.name}: {slots} caption slots, more than the segment's {self.cap.layout.segment}")
        if mask is None:
            caption = torch.full((b,), L - n_image, device=key.device)
        else:
            caption = mask.reshape(b, -1).sum(1) - n_image
        rows = (caption[:, None] + torch.arange(n_image, device=key.device))[:, :, None, None].expand(-1, -1, heads, d)
        text_q, text_k = query[:, :slots], key[:, :slots]
        query = torch.cat([text_q, torch.gather(query, 1, rows)], dim=1).transpose(1, 2)
        key = torch.cat([text_k, torch.gather(key, 1, rows)], dim=1).transpose(1, 2)
        text_mask = torch.arange(slots, device=key.device)[None, :] < caption[:, None]
        key_mask = torch.cat([text_mask, text_mask.new_ones((b, n_image))], dim=1)
        self.cap._record_joint(
            self.name, query, key, image=(slots, slots + n_image), text=(0, slots), key_mask=key_mask
        )
