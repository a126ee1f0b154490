"""CogView4: ``CogView4Pipeline`` (rectified flow), driven as diffusers 0.42 ``CogView4Pipeline.__call__`` does.

GLM text encoder (``encode_prompt``: the penultimate hidden state, ``padding="longest"`` then left-padded to a
multiple of 16 tokens, *no* attention mask), so a prompt's embedding depends on what it is padded with: each prompt
is encoded alone, as the pipeline encodes one image's prompt, and the transformer takes rows of equal text length
together. ``sampler.guidance_scale`` is the pipeline's ``guidance_scale``: CFG ``u + g (c − u)`` from two transformer
calls (cond, then uncond on the empty negative prompt "") when > 1. Size micro-conditioning ``original_size`` =
``target_size`` = the generated size, ``crop_coords`` (0, 0) (the pipeline's defaults). Latents drawn in float32
(``prepare_latents``), cast to the transformer's dtype for each call; the VAE decodes ``latents / scaling_factor`` in
its own dtype (the pipeline does not upcast it).

Timesteps: ``timesteps = int(linspace(T, 1, N))``, ``sigmas = timesteps / T`` and ``mu = sqrt(seq / base_seq_len) ·
max_shift + base_shift`` (its own ``calculate_shift``: base 256, 0.25, 0.75 by default) passed together to
FlowMatchEuler, which shifts the σ's (``time_shift_type: linear``) but keeps the timesteps: the transformer is
evaluated at the *unshifted* timestep. Another flow solver (``flow_dpmpp_2m`` / ``flow_unipc``) visits the same σ's
and is given those unshifted timesteps too.

Attention (:class:`CogView4JointRecorder`, ``CogView4AttnProcessor``): joint attention over [text; image] in every
block, no mask (the left padding is attended). A prompt's text is ``[gMASK]<sop>`` + its tokens, left-padded to a
multiple of 16, so its length and its tokens' positions depend on the prompt: the recorder hands the capture a
canonical text sequence of ``max_sequence_length`` keys — the real tokens first (as the layout counts them), then
the padding the model attends, then placeholder keys the ``key_mask`` shuts out — a permutation plus masked keys,
so the softmax over the model's own keys is unchanged. It needs every sample's rows in one call without CFG halves:
prompts of different padded lengths (the driver's separate calls) are refused; CFG's two calls: the capture records the
conditional one.

Refused up front (not declared): latent mode — its flow ODE (inversion, reconstruction) queries the model at
timestep 1000·σ, while CogView4 is conditioned on the unshifted timestep T·u of σ = shift(u), so the mode's paths
would not ask the model what its own pipeline asks it.

ConceptAttention (:func:`cogview4_concept_step`): every block keeps the text's own modulation and post-attention
norm; its projections and feed-forward are per-token weights shared with the image, which the concepts go through
as text tokens do (no rotary: CogView4 rotates image rows only).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from pipeline.errors import UserError
from pipeline.models.attention import AttentionLayout, ConceptStream, attention_processors, register_recorder
from pipeline.models.families.base import Family, FamilyDriver, batched, call_default, register
from pipeline.models.flow_shift import uses_dynamic_shift

__all__ = ["CogView4", "CogView4JointRecorder", "cogview4_concept_step"]


def _unshifted_timesteps(num_train_timesteps: int, steps: int) -> np.ndarray:
    """The pipeline's ``np.linspace(T, 1.0, N).astype(np.int64).astype(np.float32)``."""
    return np.linspace(num_train_timesteps, 1.0, steps).astype(np.int64).astype(np.float32)


@register("CogView4Pipeline")
class CogView4(FamilyDriver):
    family = Family("cogview4", "transformer", "text", "latent", flow=True, modes=("metrics", "schedule", "attention"))
    cfg_calls = "two_calls"  # CFG: a conditional call, then an unconditional one (attention capture)
    vae_upcast = False  # the pipeline decodes in the VAE's own dtype, latents / scaling_factor (no shift)

    @classmethod
    def flow_geometry(cls, vae_scale, component):
        """Native: transformer sample_size·scale (the pipeline's default size); tokens: latent patches."""
        transformer = component("transformer") or {}
        native = int(transformer.get("sample_size") or 128) * vae_scale
        return native, vae_scale * int(transformer.get("patch_size") or 2)

    @classmethod
    def flow_mu(cls, config, image_seq_len):
        """CogView4's ``calculate_shift``: sqrt(seq / base_image_seq_len) · max_shift + base_shift (the pipeline
        always passes it; a static-shift scheduler ignores it, so None there)."""
        if not uses_dynamic_shift(config):
            return None
        if image_seq_len is None:
            raise ValueError("Expected image_seq_len for a resolution-dependent shift (use_dynamic_shifting), got None")
        m = (image_seq_len / config.get("base_image_seq_len", 256)) ** 0.5
        return m * config.get("max_shift", 0.75) + config.get("base_shift", 0.25)

    @classmethod
    def flow_timestep_kwargs(cls, config, num_inference_steps, image_seq_len):
        """The pipeline's ``retrieve_timesteps(scheduler, N, device, timesteps, sigmas, mu=mu)``."""
        T = int(config.get("num_train_timesteps", 1000))
        timesteps = _unshifted_timesteps(T, int(num_inference_steps))
        mu = cls.flow_mu(config, image_seq_len)
        return {"timesteps": timesteps, "sigmas": timesteps / T, **({"mu": mu} if mu is not None else {})}

    def set_timesteps(self, sampler, steps, height, width):
        from diffusers import FlowMatchEulerDiscreteScheduler

        super().set_timesteps(sampler, steps, height, width)
        if isinstance(sampler, FlowMatchEulerDiscreteScheduler):
            return  # took the unshifted timesteps as given
        # any other flow solver was given the σ's with timesteps σ·T: CogView4 evaluates at the unshifted ones
        ts = _unshifted_timesteps(int(sampler.config.num_train_timesteps), steps)
        if len(sampler.timesteps) != len(ts):
            raise UserError(
                f"CogView4Pipeline: {type(sampler).__name__} calls the model {len(sampler.timesteps)} times in "
                f"{steps} steps; CogView4's unshifted timesteps are one per σ (use scheduler=native, flow_euler, "
                "flow_dpmpp_2m or flow_unipc)"
            )
        sampler.timesteps = torch.from_numpy(ts).to(sampler.timesteps.device)

    def size_multiple(self) -> int:
        return math.lcm(16, self.token_step())  # check_inputs: multiples of 16

    def initial_noise(self, generators, height, width, init_noise_sigma):
        # prepare_latents: randn_tensor in float32 whatever the model dtype, not scaled by init_noise_sigma
        shape = (len(generators), *self.latent_shape(height, width))
        return randn_tensor(shape, generator=list(generators), device=self.model.device, dtype=torch.float32)

    def encode(self, prompts, cfg, guidance, height, width) -> dict:
        pipe, device = self.pipe, self.model.device
        max_len = int(call_default(pipe.__call__, "max_sequence_length", 1024))

        def embed(prompt: str) -> torch.Tensor:  # (L, D): one prompt alone, as the pipeline encodes it
            return pipe.encode_prompt(prompt, None, False, 1, device=device, max_sequence_length=max_len)[0][0]

        alone = {p: embed(p) for p in dict.fromkeys(prompts)}
        dtype = next(iter(alone.values())).dtype
        size = torch.tensor([[height, width]], dtype=dtype, device=device)
        return {
            "encoder_hidden_states": [alone[p] for p in prompts],  # one (L_i, D) per sample
            "negative": embed("") if cfg else None,  # the pipeline's default negative prompt
            "original_size": size,
            "target_size": size,
            "crop_coords": torch.tensor([[0, 0]], dtype=dtype, device=device),
        }

    def denoise(self, x, t, cond, sampler):
        """The pipeline's two calls: cond, then (CFG) uncond on the negative prompt, combined."""
        t = torch.as_tensor(t, device=x.device)
        out = self.forward(x, t, cond.kwargs)
        if cond.cfg:
            uncond = self.forward(x, t, {**cond.kwargs, "encoder_hidden_states": [cond.kwargs["negative"]] * len(x)})
            out = self.combine(out, uncond, cond.guidance)
        return out

    def forward(self, x, t, kwargs):
        """Rows of equal text length in one transformer call (no text mask: prompts are never padded together)."""
        texts, tb = kwargs["encoder_hidden_states"], batched(t, x)
        out = None
        for length in dict.fromkeys(e.shape[0] for e in texts):
            rows = [i for i, e in enumerate(texts) if e.shape[0] == length]
            n = len(rows)
            o = self.denoiser(
                hidden_states=x[rows].to(self.model.dtype),
                encoder_hidden_states=torch.stack([texts[i] for i in rows]),
                timestep=tb[rows],
                original_size=kwargs["original_size"].repeat(n, 1),
                target_size=kwargs["target_size"].repeat(n, 1),
                crop_coords=kwargs["crop_coords"].repeat(n, 1),
                return_dict=False,
            )[0]
            if n == len(texts):
                return o
            out = o.new_empty((len(texts), *o.shape[1:])) if out is None else out
            out[rows] = o
        return out

    def prediction(self, out):
        return out  # no learned σ

    def attention_layout(self, height, width) -> AttentionLayout:
        """Joint attention [text; image] in every block (``attn1``); segment: the GLM prompt tokens
        (``[gMASK]<sop>`` + the prompt, ``max_sequence_length`` slots), real tokens first (the recorder's order)."""
        _, h, w = self.latent_shape(height, width)
        p = int(self.denoiser.config.patch_size)
        layers = tuple(k for k in attention_processors(self.denoiser) if k.endswith("attn1.processor"))
        n = int(call_default(self.pipe.__call__, "max_sequence_length", 1024))
        blocks = tuple(k.removesuffix(".attn1.processor") for k in layers)
        concepts = ConceptStream(blocks, cogview4_concept_step, "attn1")
        return AttentionLayout(
            "cogview4", layers, (h // p, w // p), self.pipe.tokenizer, n, (0, n), True, "GLM", None, concepts
        )

    def concept_tokens(self, words: list[str]) -> torch.Tensor:
        """Each concept word encoded alone by the pipeline's own ``encode_prompt`` (as :meth:`encode`: left-padded
        to a multiple of 16); its tokens averaged (positions in the layout's canonical order, real tokens first);
        the transformer's ``patch_embed.text_proj`` applied (the blocks' text input). CogView4 gives text no
        rotary embedding, so the concepts get none either."""
        h, w = self.native_size()
        embeds = self.encode(words, False, 1.0, h, w)["encoder_hidden_states"]
        layout = self.attention_layout(h, w)
        rows = []
        for word, e in zip(words, embeds):  # left padding -> the canonical order: real tokens first
            v = layout.tokens(word).num_tokens
            rows.append(torch.cat([e[e.shape[0] - v :], e[: e.shape[0] - v]]))
        width = max(r.shape[0] for r in rows)
        canonical = torch.stack([F.pad(r, (0, 0, 0, width - r.shape[0])) for r in rows])
        mean = self._concept_segment_mean(words, canonical, layout)
        return self.denoiser.patch_embed.text_proj(mean.to(self.denoiser.dtype))


def cogview4_concept_step(block, c, key, value, kwargs):
    """CogView4's ``CogView4TransformerBlock`` (diffusers 0.42) text-stream path applied to concept tokens ``c``. The
    block keeps the text's own modulation (the ``c_*`` shift/scale/gates of ``norm1.linear(temb)``, ``norm_context``
    and ``norm2_context``) while the attention projections, Q/K LayerNorms, ``to_out`` and the feed-forward are one
    set of per-token weights for text and image — so the concepts go through them exactly as text tokens do. No
    rotary embedding (CogView4 rotates the image rows only); attention of the concept queries over [image keys;
    concept keys] (the model passes no mask)."""
    attn = block.attn1
    emb = block.norm1.linear(kwargs["temb"]).chunk(12, dim=1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb[1::2]  # the c_* chunks
    dtype = c.dtype
    norm_c = block.norm1.norm_context(c).to(dtype=dtype) * (1 + scale_msa.unsqueeze(1)) + shift_msa.unsqueeze(1)
    cq, ck, cv = (p(norm_c).unflatten(2, (attn.heads, -1)).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        cq = attn.norm_q(cq).to(dtype=norm_c.dtype)
    if attn.norm_k is not None:
        ck = attn.norm_k(ck).to(dtype=norm_c.dtype)
    out = F.scaled_dot_product_attention(cq, torch.cat([key, ck], 2), torch.cat([value, cv], 2))
    out = out.transpose(1, 2).flatten(2, 3).type_as(cq)
    c = c + attn.to_out[1](attn.to_out[0](out)) * gate_msa.unsqueeze(1)
    norm_c = block.norm2_context(c) * (1 + scale_mlp.unsqueeze(1)) + shift_mlp.unsqueeze(1)
    return c + block.ff(norm_c) * gate_mlp.unsqueeze(1), out


@register_recorder("cogview4")
class CogView4JointRecorder:
    """``CogView4AttnProcessor`` (diffusers 0.42), step for step: [text; image] projected together, LayerNorm on Q and
    K, RoPE on the image rows, the stock ``scaled_dot_product_attention`` (no mask). The capture gets a canonical
    text order (module docstring): each row's ``valid_tokens`` real tokens (the last ones of its left-padded text)
    first, then its padding, then masked placeholder keys up to the layout's ``max_length``."""

    def __init__(self, cap, name: str):
        self.cap, self.name = cap, name

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError(f"{self.name}: CogView4Pipeline passes no attention mask, got one")
        dtype = encoder_hidden_states.dtype
        text = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query, key, value = (
            t.unflatten(2, (attn.heads, -1)).transpose(1, 2)
            for t in (attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states))
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query).to(dtype=dtype)
        if attn.norm_k is not None:
            key = attn.norm_k(key).to(dtype=dtype)
        if image_rotary_emb is not None:
            query[:, :, text:, :] = apply_rotary_emb(query[:, :, text:, :], image_rotary_emb, use_real_unbind_dim=-2)
            key[:, :, text:, :] = apply_rotary_emb(key[:, :, text:, :], image_rotary_emb, use_real_unbind_dim=-2)
        self._record(query, key, text)
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).flatten(2, 3).type_as(query)
        if self.cap.wants_output and self.cap.recording:  # the concept stream's image rows
            self.cap._record_image_output(self.name, key[:, :, text:], value[:, :, text:], hidden_states[:, text:])
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states, hidden_states = hidden_states.split([text, hidden_states.size(1) - text], dim=1)
        return hidden_states, encoder_hidden_states

    def _record(self, query: torch.Tensor, key: torch.Tensor, text: int) -> None:
        """(n, heads, L, d) -> the canonical [real tokens; padding; masked placeholders | image] order."""
        n, heads, L, d = query.shape
        valid = getattr(self.cap, "valid_tokens", None)
        if not self.cap.recording:  # the unconditional call of a two-call CFG step
            return
        if valid is None or len(valid) != n:
            raise UserError(
                f"mode=[attention]: CogView4Pipeline runs prompts of different padded lengths in separate "
                f"transformer calls ({n} of {len(valid or [])} samples here); the capture needs all of a batch's "
                "rows in one call: use batch_size=1 or prompts of one padded length"
            )
        S = self.cap.layout.max_length
        if text > S or any(v > text for v in valid):
            raise ValueError(f"{self.name}: expected at most {S} text tokens holding {valid} real ones, got {text}")
        # row i: its real tokens are the last valid[i] of the text; rotate them to the front
        shift = torch.tensor([text - v for v in valid], device=query.device)
        idx = (torch.arange(text, device=query.device)[None, :] + shift[:, None]) % text
        idx = idx[:, None, :, None].expand(-1, heads, -1, d)

        def canonical(t):
            pad = t.new_zeros((n, heads, S - text, d))
            return torch.cat([t[:, :, :text].gather(2, idx), pad, t[:, :, text:]], dim=2)

        key_mask = torch.ones((n, S + L - text), dtype=torch.bool, device=query.device)
        key_mask[:, text:S] = False
        self.cap._record_joint(
            self.name, canonical(query), canonical(key), image=(S, S + L - text), text=(0, S), key_mask=key_mask
        )
