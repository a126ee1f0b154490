"""Z-Image: ``ZImagePipeline`` (rectified flow), driven as diffusers 0.42 ``ZImagePipeline.__call__`` does.

Text: the second-to-last hidden states of a Qwen3 encoder on the prompt in the tokenizer's chat template, only the
prompt's own tokens (``encode_prompt``: one variable-length tensor per prompt). Latents: an AutoencoderKL's
(C, H/s, W/s), drawn in float32 whatever the model dtype (``prepare_latents`` gets ``torch.float32``) and kept in
float32 between steps; the transformer gets them as a list of (C, 1, h, w) in its dtype and patchifies them itself
(2×2 tokens), with the timestep ``(1000 − t) / 1000``, and predicts the negated velocity (the pipeline steps the
solver with ``−out``). σ's ``linspace(1, 1/N, N)`` (float32, as ``get_default_z_image_sigmas``) with ``mu`` from
the token count always passed (a static-shift scheduler — Z-Image-Turbo's shift 3 — ignores it). Decode
``z / scaling_factor + shift_factor`` in the VAE's own dtype (the pipeline never upcasts an fp16 VAE).

``sampler.guidance_scale`` is ``ZImagePipeline``'s own ``guidance_scale`` g, with the pipeline's parametrisation:
CFG is on for g > 0 (not > 1) and is ``pos + g (pos − neg)`` per sample in float32 (= ``u + (1 + g)(c − u)``), the
negative prompt being the project's "no prompt" ``""`` (also the pipeline's default); g = 0 (Z-Image-Turbo's
setting) is one conditional call. The conditional and unconditional halves go through one transformer call
``[pos; neg]``, as the pipeline does. The ``__call__`` defaults ``cfg_normalization=False`` and
``cfg_truncation=1.0`` are reproduced (with σ·1000 timesteps ``(1000 − t)/1000 < 1`` never exceeds 1.0, so no
step is truncated); the project has no setting for other values.

Conditioning tensors: each prompt's embeddings zero-padded to ``max_sequence_length`` (the ``__call__`` default,
512) with a boolean mask of its own tokens, so that every prompt's condition has one shape (the latent mode's
directions subtract conditions of different prompts); each call hands the transformer exactly the masked rows,
i.e. the list ``encode_prompt`` returns.

Attention: the main single-stream layers (``layers.N.attention``, ``ZSingleStreamAttnProcessor``; the image-only
and caption-only refiners are not joint) attend over one sequence per sample, [image patches; image pad tokens up
to a multiple of 32; caption; caption pad tokens up to a multiple of 32], right-padded to the batch's longest with a
mask (the pad tokens inside are real, attended tokens). The caption is the prompt in the tokenizer's chat template
(``<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n`` for Qwen3), all its tokens up to
``max_sequence_length``: the segment is those slots (rounded up to the multiple of 32); only the prompt's tokens map
to words; the maps renormalise over the template's and the prompt's tokens. The recorder hands the call's caption
slots over as they are (the capture zero-fills the segment's slots past them) and the CFG rows as ``[neg; pos]``
(the call's are ``[pos; neg]``).

ConceptAttention (:func:`zimage_concept_step`): the main layers are single-stream (one set of per-token weights and
one modulation), so the concepts are exactly extra caption tokens the image never sees, at the first caption
position (1, 0, 0), after the model's own one-token-caption path (cap_embedder, pad tokens, context refiner); they
attend to the real image tokens only (not the image pad tokens).
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from pipeline.models.attention import AttentionLayout, ConceptStream, attention_processors, register_recorder
from pipeline.models.families.base import Family, FamilyDriver, batched, call_default, register
from pipeline.models.flow_shift import shift_mu, uses_dynamic_shift
from pipeline.models.tokens import prompt_tokens

__all__ = ["ZImage", "ZImageRecorder", "chat_template", "zimage_concept_step"]

SEQ_MULTI_OF = 32  # transformer_z_image.SEQ_MULTI_OF: image and caption padded to a multiple of it

DEFAULT_SIZE = 1024  # ZImagePipeline.__call__: height = height or 1024 (pixels, whatever the VAE)


@register("ZImagePipeline")
class ZImage(FamilyDriver):
    family = Family(
        "zimage", "transformer", "text", "latent", flow=True, modes=("metrics", "schedule", "attention", "latent")
    )
    vae_upcast = False  # the pipeline decodes (and its img2img sibling encodes) in the VAE's own dtype

    # ------------------------------------------------------------------ geometry
    @classmethod
    def flow_geometry(cls, vae_scale, component):
        """Native: 1024 px (the ``__call__`` default); tokens: 2×2 latent patches."""
        return DEFAULT_SIZE, 2 * vae_scale

    @classmethod
    def flow_timestep_kwargs(cls, config, num_inference_steps, image_seq_len):
        """ZImagePipeline's: ``sigmas = torch.linspace(1, 1/N, N).tolist()`` and ``mu`` from the token count
        (always passed; ignored by a static-shift scheduler)."""
        n = int(num_inference_steps)
        out: dict = {"sigmas": torch.linspace(1.0, 1 / n, n).tolist()}  # float32 linspace, as the pipeline's
        if image_seq_len is not None:
            out["mu"] = shift_mu(config, image_seq_len, cls.shift_defaults)
        elif uses_dynamic_shift(config):
            cls.flow_mu(config, None)  # raises: μ needs the token count
        return out

    def native_size(self):
        return DEFAULT_SIZE, DEFAULT_SIZE

    def size_multiple(self) -> int:
        return self.model.vae_scale * 2  # __call__: height and width divisible by vae_scale_factor * 2

    def latent_shape(self, height, width):
        s = self.model.vae_scale
        return self.latent_channels, 2 * (height // (s * 2)), 2 * (width // (s * 2))

    def token_step(self) -> int:
        return self.model.vae_scale * 2

    def initial_noise(self, generators, height, width, init_noise_sigma):
        # prepare_latents: randn_tensor in float32 whatever the model dtype, not scaled by init_noise_sigma
        shape = (len(generators), *self.latent_shape(height, width))
        return randn_tensor(shape, generator=list(generators), device=self.model.device, dtype=torch.float32)

    # ------------------------------------------------------------------ conditioning
    def uses_cfg(self, guidance: float) -> bool:
        return guidance > 0  # ZImagePipeline.do_classifier_free_guidance

    def plain_guidance(self, guidance: float) -> float:
        return 0.0  # the pipeline's "no CFG"

    def encode(self, prompts, cfg, guidance, height, width) -> dict:
        """``encode_prompt`` of the prompts (and, with CFG, of ``""`` per sample, first: ``[uncond; cond]`` rows),
        padded to ``max_sequence_length`` with a mask (see the module docstring)."""
        max_len = int(call_default(self.pipe.__call__, "max_sequence_length", 512))
        halves = [self._encoded(list(prompts), max_len)]  # a copy: _encode_prompt rewrites the list in place
        if cfg:
            neg = self._encoded([""], max_len)  # every sample's negative prompt is the same ""
            halves.insert(0, tuple(t.expand(len(prompts), *t.shape[1:]) for t in neg))
        return {
            "prompt_embeds": torch.cat([e for e, _ in halves]),
            "prompt_mask": torch.cat([m for _, m in halves]),
        }

    def _encoded(self, prompts: list[str], max_len: int):
        embeds, _ = self.pipe.encode_prompt(
            prompt=prompts, device=self.model.device, do_classifier_free_guidance=False, max_sequence_length=max_len
        )
        pe = torch.stack([F.pad(e, (0, 0, 0, max_len - e.shape[0])) for e in embeds])
        lengths = torch.tensor([len(e) for e in embeds], device=pe.device)
        return pe, torch.arange(max_len, device=pe.device)[None] < lengths[:, None]

    # ------------------------------------------------------------------ the denoiser
    def denoise(self, x, t, cond, sampler):
        """As the pipeline: one call on ``[pos; neg]`` (CFG) or ``pos``, CFG ``pos + g (pos − neg)`` in float32, the
        result negated (the solver's velocity)."""
        t = torch.as_tensor(t, device=x.device)
        if not cond.cfg:
            return -self.forward(x, t, cond.kwargs).float()
        n = x.shape[0]
        swap = {k: torch.cat([v[n:], v[:n]]) for k, v in cond.kwargs.items()}  # ours [neg; pos] -> its [pos; neg]
        out = self.forward(torch.cat([x, x]), t, swap).float()
        pos, neg = out[:n], out[n:]
        return -self.combine(pos, neg, cond.guidance)

    def combine(self, cond_out, uncond_out, guidance):
        """ZImagePipeline's CFG (cfg_normalization off): ``pos + g (pos − neg)``."""
        return cond_out + guidance * (cond_out - uncond_out)

    def forward(self, x, t, kwargs):
        """One transformer call: latents as (C, 1, h, w) items in the transformer's dtype, each prompt's own
        embeddings, timestep ``(1000 − t) / 1000``; returns the raw (negated-velocity) output, (N, C, h, w)."""
        latents = list(x.to(self.denoiser.dtype).unsqueeze(2).unbind(dim=0))
        caps = [e[m] for e, m in zip(kwargs["prompt_embeds"], kwargs["prompt_mask"])]
        timestep = (1000 - batched(t, x)) / 1000
        out = self.denoiser(latents, timestep, caps, joint_attention_kwargs=None, return_dict=False)[0]
        return torch.stack(out).squeeze(2)

    def prediction(self, out):
        return out  # no learned σ

    # ------------------------------------------------------------------ VAE
    def latent_factors(self):
        c = self.model.vae.config
        return float(c.scaling_factor), float(getattr(c, "shift_factor", None) or 0.0), None, None

    # ------------------------------------------------------------------ attention
    def attention_layout(self, height, width) -> AttentionLayout:
        """The main layers' joint attention; the segment: the chat-templated caption's slots (module docstring)."""
        _, h, w = self.latent_shape(height, width)
        layers = tuple(
            k for k in attention_processors(self.denoiser) if re.fullmatch(r"layers\.\d+\.attention\.processor", k)
        )
        max_len = int(call_default(self.pipe.__call__, "max_sequence_length", 512))
        tok = self.pipe.tokenizer
        tokenize = functools.partial(prompt_tokens, tok, max_length=max_len, template=chat_template(tok), trail=0)
        slots = max_len + (-max_len) % SEQ_MULTI_OF
        blocks = tuple(k.removesuffix(".attention.processor") for k in layers)
        concepts = ConceptStream(blocks, zimage_concept_step, "attention")
        return AttentionLayout(
            "zimage", layers, (h // 2, w // 2), tok, max_len, (0, slots), True, "Qwen3", tokenize, concepts
        )

    def concept_tokens(self, words: list[str]) -> torch.Tensor:
        """Each concept word encoded alone by the pipeline's own ``encode_prompt`` (chat template); the mean over the
        word's tokens; then the transformer's own caption path for a one-token caption: padded to a multiple of 32
        (``_pad_with_ids``: the rest are ``cap_pad_token`` rows, positions from (1, 0, 0) on), ``cap_embedder``, and
        the ``context_refiner`` layers (no modulation: no timestep), whose self-attention sees that token and the
        caption pad tokens the model gives it; the token's row is the concept."""
        h, w = self.native_size()
        max_len = int(call_default(self.pipe.__call__, "max_sequence_length", 512))
        embeds, _ = self._encoded(list(words), max_len)
        tr = self.denoiser
        mean = self._concept_segment_mean(words, embeds, self.attention_layout(h, w)).to(tr.dtype)
        device, feats, pos_ids, pads = mean.device, [], [], []
        for row in mean:
            f, p, m, _, _ = tr._pad_with_ids(row[None], (1 + (-1) % SEQ_MULTI_OF, 1, 1), (1, 0, 0), device)
            feats.append(f), pos_ids.append(p), pads.append(m)
        lengths = [len(f) for f in feats]
        embedded = list(tr.cap_embedder(torch.cat(feats)).split(lengths))
        c, freqs, mask, _, _ = tr._prepare_sequence(embedded, pos_ids, pads, tr.cap_pad_token, None, device)
        for layer in tr.context_refiner:
            c = layer(c, mask, freqs)
        return c[:, 0]


def chat_template(tokenizer) -> str:
    """``ZImagePipeline._encode_prompt``'s text as a ``str.format`` pattern: one user message in the tokenizer's
    chat template, ``add_generation_prompt=True``, ``enable_thinking=True``."""
    mark = "\x00prompt\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": mark}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    if text.count(mark) != 1:
        raise ValueError(f"{type(tokenizer).__name__}: the chat template does not hold the prompt once: {text!r}")
    return "{}".join(part.replace("{", "{{").replace("}", "}}") for part in text.split(mark))


def zimage_concept_step(block, c, key, value, kwargs):
    """Z-Image's main ``ZImageTransformerBlock`` (diffusers 0.42) applied to concept tokens ``c`` as extra caption
    tokens the image never sees. The block is single-stream — one set of weights and one modulation
    (``adaLN_modulation(adaln_input)``) for text and image, all per token except the attention — so this is exactly the
    path a caption token takes, its attention restricted to [image keys; concept keys]: ``attention_norm1`` times the
    scale, ``to_q/k/v``, the RMS q/k norms, rotary at the first caption slot's position (1, 0, 0) (read from the
    block's own ``freqs_cis``, the same in every sample), ``to_out``, ``attention_norm2``, tanh gates, the SwiGLU
    feed-forward. The image keys are the real image tokens only (the image pad tokens up to a multiple of 32, which
    the model attends, are left out)."""
    if kwargs.get("noise_mask") is not None:
        raise ValueError("Z-Image's omni mode (per-token modulation) has no concept stream here")
    attn = block.attention
    mod = block.adaLN_modulation(kwargs["adaln_input"])
    scale_msa, gate_msa, scale_mlp, gate_mlp = mod.unsqueeze(1).chunk(4, dim=2)
    gate_msa, gate_mlp, scale_msa, scale_mlp = gate_msa.tanh(), gate_mlp.tanh(), 1.0 + scale_msa, 1.0 + scale_mlp
    x = block.attention_norm1(c) * scale_msa
    cq, ck, cv = (p(x).unflatten(-1, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        cq = attn.norm_q(cq)
    if attn.norm_k is not None:
        ck = attn.norm_k(ck)
    n_image = key.shape[2]
    t0 = n_image + (-n_image) % SEQ_MULTI_OF  # the caption's first slot, after the image and its pad tokens
    freqs = kwargs["freqs_cis"][:, t0 : t0 + 1].expand(c.shape[0], c.shape[1], -1)
    cq, ck = _rotary(cq, freqs), _rotary(ck, freqs)
    dtype = cq.dtype
    cq, ck, cv = (t.transpose(1, 2) for t in (cq, ck, cv))
    out = F.scaled_dot_product_attention(cq, torch.cat([key, ck], 2), torch.cat([value, cv], 2))
    out = out.transpose(1, 2).flatten(2, 3).to(dtype)
    o = attn.to_out[0](out)
    if len(attn.to_out) > 1:  # dropout
        o = attn.to_out[1](o)
    c = c + gate_msa * block.attention_norm2(o)
    return c + gate_mlp * block.ffn_norm2(block.feed_forward(block.ffn_norm1(c) * scale_mlp)), out


@register_recorder("zimage")
class ZImageRecorder:
    """Z-Image's ``ZSingleStreamAttnProcessor`` (diffusers 0.42), step for step, recording the joint softmax's image
    rows. The model's sequence is [image (``cap.n_image_tokens``); image pad; caption; caption pad], padded to the
    batch's longest under its boolean mask; the recorded Q/K keep it and pad it with masked zero keys to
    image + image pad + the segment's S slots (no mass): image = (0, image tokens), text = (image + pad, … + S).
    Under CFG (the sink's ``cfg``) the call's rows ``[pos; neg]`` are handed over as ``[neg; pos]``."""

    def __init__(self, cap, name: str):
        self.cap, self.name = cap, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        query, key, value = (
            p(hidden_states).unflatten(-1, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = _rotary(query, freqs_cis), _rotary(key, freqs_cis)
        dtype = query.dtype
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        self._record(query, key, attention_mask)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        if self.cap.wants_output and self.cap.recording:  # the concept stream's image rows (image first)
            n_image = self.cap.n_image_tokens
            rows = [key[:, :n_image].transpose(1, 2), value[:, :n_image].transpose(1, 2), out[:, :n_image].flatten(2)]
            if getattr(self.cap, "cfg", False):  # the call's [pos; neg] -> the sink's [uncond; cond]
                rows = [torch.cat(t.chunk(2)[::-1]) for t in rows]
            self.cap._record_image_output(self.name, *rows)
        out = attn.to_out[0](out.flatten(2, 3).to(dtype))
        if len(attn.to_out) > 1:  # dropout
            out = attn.to_out[1](out)
        return out

    def _record(self, query, key, mask) -> None:
        b, L = key.shape[:2]
        n_image = self.cap.n_image_tokens
        t0 = n_image + (-n_image) % SEQ_MULTI_OF  # the caption starts after the image's pad tokens
        if L - t0 > self.cap.layout.segment[1]:
            raise ValueError(f"{self.name}: {L - t0} caption slots, more than the segment's {self.cap.layout.segment}")
        key_mask = None if mask is None else mask.reshape(b, -1).bool()
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        if getattr(self.cap, "cfg", False):  # the call's [pos; neg] -> the sink's [uncond; cond]
            query, key = (torch.cat(t.chunk(2)[::-1]) for t in (query, key))
            key_mask = None if key_mask is None else torch.cat(key_mask.chunk(2)[::-1])
        # the call's caption slots as they are; the capture zero-fills the segment's slots past them
        self.cap._record_joint(self.name, query, key, image=(0, n_image), text=(t0, L), key_mask=key_mask)


def _rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """``ZSingleStreamAttnProcessor``'s rotary embedding: complex product in float32 (autocast off), cast back."""
    with torch.amp.autocast("cuda", enabled=False):
        z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(z * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)
