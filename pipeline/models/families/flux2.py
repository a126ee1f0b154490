"""FLUX.2: ``Flux2Pipeline`` (family ``flux2``) and ``Flux2KleinPipeline`` (``flux2_klein``), rectified flow, as
diffusers 0.42's ``__call__`` drives them (text-to-image: no reference ``image``).

Shared: text embeddings are three stacked hidden-state layers of an LLM (Mistral-3 / Qwen3, the pipeline's own
``encode_prompt`` with its default ``max_sequence_length`` and ``text_encoder_out_layers``) with 4-axis position ids
(T, H, W, L); AutoencoderKLFlux2 latents are 2×2-patchified and batch-norm normalised (the VAE's running
statistics), then flattened to one token per patch. The project's "unpacked latent" z is that patchified,
normalised (4C, H/2s, W/2s) tensor: the pipeline draws its unit noise there, so ``latent_shape``/``pack`` are the
pipeline's ``prepare_latents``, and decode/encode add/remove the normalisation and the 2×2 patchification around
the VAE. Timesteps: ``sigmas = linspace(1, 1/N, N)`` (unless ``use_flow_sigmas``) with FLUX.2's *empirical* μ,
which depends on the image token count *and* the number of steps (``compute_empirical_mu``), not the scheduler's
base/max shift.

``sampler.guidance_scale`` means:
  flux2        the distilled guidance fed to the guidance embedding (no CFG), also for a condition "without
               guidance" (FLUX.2-dev)
  flux2_klein  real CFG ``u + g (c − u)`` against the empty prompt, two separate transformer calls as the pipeline
               makes, when ``g > 1``; a step-distilled checkpoint (``is_distilled``) ignores it (no CFG)

Attention (``attention_layout``, :class:`Flux2JointRecorder`): joint attention over [text; image] in the double-stream
(``Flux2AttnProcessor``) and single-stream (``Flux2ParallelSelfAttnProcessor``) blocks, no attention mask (padding is
attended). The text sequence is the whole chat-templated LLM input, ``max_sequence_length`` tokens: FLUX.2-dev's
system message and ``[INST]…[/INST]`` (``format_input``, ``apply_chat_template``), klein's Qwen3 user turn with the
generation prompt and thinking switched off — only the tokens of the user's prompt belong to words. A left-padding
tokenizer puts the padding first: the recorder rotates each row's text tokens so that the real ones come first, as
the layout's positions count them (a permutation of the keys: the softmax is unchanged).
klein's CFG: only the conditional call (the first of the two) is recorded. Output-space concept maps (ConceptAttention,
:func:`flux2_concept_step`): the concept tokens ride the text stream of the double-stream blocks at text position 0;
the single-stream blocks are left out.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.models.attention import AttentionLayout, ConceptStream, register_recorder
from pipeline.models.families.base import Family, FamilyDriver, batched, call_default, register
from pipeline.models.flow_shift import uses_dynamic_shift
from pipeline.models.tokens import prompt_tokens, special_prefix

__all__ = ["Flux2", "Flux2Klein", "Flux2JointRecorder", "compute_empirical_mu", "flux2_concept_step"]

DEFAULT_SAMPLE_SIZE = 128  # Flux2*Pipeline.default_sample_size (latent pixels before 2×2 patchification)
MODES = ("metrics", "schedule", "latent", "attention")
_SLOT = "\x00PROMPT\x00"  # stands for the prompt while the chat template is rendered


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """``diffusers.pipelines.flux2.pipeline_flux2.compute_empirical_mu`` (0.42), copied: importing the pipeline
    module pulls in its text encoders. μ is linear in the token count, and below 4300 tokens also in the steps."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200, m_10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a  # kept as a separate term: the same rounding as diffusers'
    return float(a * num_steps + b)


class _Flux2Common(FamilyDriver):
    """What both FLUX.2 pipelines share (geometry, latents, timesteps, prompt encoding, VAE)."""

    @classmethod
    def flow_geometry(cls, vae_scale, component):
        """Native: 128·scale (default_sample_size); tokens: 2×2 patches of latent pixels."""
        return DEFAULT_SAMPLE_SIZE * vae_scale, 2 * vae_scale

    @classmethod
    def flow_mu(cls, config, image_seq_len):
        """FLUX.2's μ also depends on the number of steps: only :meth:`flow_timestep_kwargs` can give it."""
        if not uses_dynamic_shift(config):
            return None
        raise ValueError("Expected the number of steps for FLUX.2's empirical mu (use flow_timestep_kwargs)")

    @classmethod
    def flow_timestep_kwargs(cls, config, num_inference_steps, image_seq_len):
        """The pipelines' ``retrieve_timesteps(sigmas=linspace(1, 1/N, N) or None with use_flow_sigmas,
        mu=compute_empirical_mu(image_seq_len, N))`` (μ is ignored by a static-shift scheduler)."""
        n = int(num_inference_steps)
        out: dict = (
            {"num_inference_steps": n}
            if config.get("use_flow_sigmas", False)
            else {"sigmas": np.linspace(1.0, 1 / n, n)}
        )
        if image_seq_len is not None:
            out["mu"] = compute_empirical_mu(int(image_seq_len), n)
        elif uses_dynamic_shift(config):
            raise ValueError("Expected image_seq_len for FLUX.2's resolution-dependent mu, got None")
        return out

    def native_size(self):
        s = int(getattr(self.pipe, "default_sample_size", DEFAULT_SAMPLE_SIZE)) * self.model.vae_scale
        return s, s

    def size_multiple(self) -> int:
        return self.model.vae_scale * 2

    def latent_shape(self, height, width):
        """Patchified: (4C = transformer in_channels, H / 2s, W / 2s), the shape ``prepare_latents`` draws."""
        s = 2 * self.model.vae_scale
        return self.latent_channels, height // s, width // s

    def token_step(self) -> int:
        return self.model.vae_scale * 2

    def pack(self, z):
        return self.pipe._pack_latents(z)  # (N, C, h, w) -> (N, h·w, C)

    def unpack(self, latents, height, width):
        # the pipeline scatters tokens by their (H, W) position ids, which are in raster order: a pure reshape
        _, h, w = self.latent_shape(height, width)
        return latents.transpose(1, 2).reshape(latents.shape[0], -1, h, w)

    def initial_noise(self, generators, height, width, init_noise_sigma):
        """``randn_tensor`` of the patchified shape in the prompt embeddings' dtype (the text encoder's), packed;
        the pipeline does not scale by ``init_noise_sigma``."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (len(generators), *self.latent_shape(height, width))
        x = randn_tensor(shape, generator=list(generators), device=self.model.device, dtype=self._latents_dtype())
        return self.pack(x)

    def initial_latents(self, x, init_noise_sigma):
        return self.pack(x)

    def _latents_dtype(self) -> torch.dtype:
        text = getattr(self.pipe, "text_encoder", None)
        return text.dtype if text is not None else self.model.dtype

    def _encode(self, prompts: list[str], height: int, width: int) -> dict:
        """``encode_prompt`` with the ``__call__`` defaults, and the image position ids of ``prepare_latents``."""
        pipe, device = self.pipe, self.model.device
        pe, text_ids = pipe.encode_prompt(
            prompt=prompts,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=int(call_default(pipe.__call__, "max_sequence_length", 512)),
            text_encoder_out_layers=tuple(call_default(pipe.__call__, "text_encoder_out_layers", (10, 20, 30))),
        )
        _, h, w = self.latent_shape(height, width)
        img_ids = pipe._prepare_latent_ids(torch.empty(len(prompts), 0, h, w)).to(device)
        return {"encoder_hidden_states": pe, "txt_ids": text_ids, "img_ids": img_ids}

    def forward(self, x, t, kwargs):
        # the pipeline: timestep = t.expand(N).to(latents.dtype) / 1000, hidden_states in the transformer's dtype
        tb = batched(t, x).to(x.dtype) / 1000
        return self.denoiser(hidden_states=x.to(self.denoiser.dtype), timestep=tb, return_dict=False, **kwargs)[0]

    def prediction(self, out):
        return out  # velocity, no learned σ

    def latent_factors(self):
        """(1, 0, batch-norm running mean, sqrt(running var + eps)) over the patchified channels."""
        vae = self.model.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return 1.0, 0.0, mean, std

    def decode_latents(self, z):
        """The end of ``__call__``: de-normalise in the latents' dtype, unpatchify, ``vae.decode`` (no upcast)."""
        _, _, mean, std = self.latent_factors()
        z = z * std.to(z.device, z.dtype) + mean.to(z.device, z.dtype)
        return self.model.vae.decode(self.pipe._unpatchify_latents(z), return_dict=False)[0]

    def encode_images(self, images):
        """``_encode_vae_image``: the posterior's mode, patchified, normalised (the exact inverse of decode)."""
        vae = self.model.vae
        z = vae.encode(images.to(self.model.device, vae.dtype)).latent_dist.mode()
        z = self.pipe._patchify_latents(z)
        _, _, mean, std = self.latent_factors()
        return (z - mean.to(z.device, z.dtype)) / std.to(z.device, z.dtype)

    # ------------------------------------------------------------------ attention
    def _chat(self, prompt: str) -> str:
        """The text the pipeline tokenizes for ``prompt`` (its chat template, rendered)."""
        raise NotImplementedError

    def _chat_drop(self, tokenizer) -> int:
        """Leading tokens the plain tokenizer call adds that the pipeline's tokenization has not."""
        return 0

    def attention_layout(self, height, width) -> AttentionLayout:
        """Joint attention [text; image] in every double- and single-stream block; segment: the whole
        ``max_sequence_length`` LLM sequence, words only inside the user's prompt (:meth:`_chat`)."""
        _, h, w = self.latent_shape(height, width)
        layers = tuple(
            k
            for k in self.denoiser.attn_processors
            if re.fullmatch(r"(single_)?transformer_blocks\.\d+\.attn\.processor", k)
        )
        tok = getattr(self.pipe.tokenizer, "tokenizer", self.pipe.tokenizer)  # FLUX.2-dev: a processor
        n = int(call_default(self.pipe.__call__, "max_sequence_length", 512))
        template = self._chat(_SLOT).replace("{", "{{").replace("}", "}}").replace(_SLOT, "{}")
        drop = self._chat_drop(tok)
        if special_prefix(tok)[1]:
            raise UserError(
                f"mode=[attention]: {type(self.pipe).__name__}: {type(tok).__name__} appends end tokens the "
                "pipeline's chat template does not have; its token positions cannot be located"
            )

        def tokenize(prompt: str):
            return prompt_tokens(tok, prompt.replace("[IMG]", ""), n, template=template, drop=drop, trail=0)

        double = tuple(k.removesuffix(".attn.processor") for k in layers if k.startswith("transformer_blocks."))
        concepts = ConceptStream(double, flux2_concept_step)
        return AttentionLayout("flux2", layers, (h, w), tok, n, (0, n), True, "LLM", tokenize, concepts)

    def concept_tokens(self, words: list[str]) -> torch.Tensor:
        """Each concept word encoded alone by the pipeline's own ``encode_prompt`` (its chat template, the stacked
        LLM layers), the mean over the word's tokens in the segment, then the transformer's ``context_embedder``
        (the only thing FLUX.2 applies to the text before its first block). A left-padding tokenizer puts the
        padding first: each row is rotated so that its real tokens come first, as the layout's positions count
        them (as :class:`Flux2JointRecorder` does for the maps)."""
        h, w = self.native_size()
        layout = self.attention_layout(h, w)
        embeds = self._encode(words, h, w)["encoder_hidden_states"]
        if getattr(layout.tokenizer, "padding_side", "right") == "left":
            embeds = torch.stack([e.roll(layout.tokens(word).num_tokens, 0) for e, word in zip(embeds, words)])
        mean = self._concept_segment_mean(words, embeds, layout)
        return self.denoiser.context_embedder(mean.to(self.denoiser.dtype))


def flux2_concept_step(block, c, key, value, kwargs):
    """FLUX.2's double-stream ``Flux2TransformerBlock`` (diffusers 0.42) text-stream path applied to concept tokens:
    the shared text modulation ``temb_mod_txt`` (shift/scale/gate for attention and MLP), ``norm1_context``, the
    added q/k/v projections and q/k RMS norms, rotary embedding of text position 0 (ids (T, H, W, L) = (0, 0, 0, 0):
    the block's own ``image_rotary_emb`` row 0, the first text token's — an identity rotation), attention of the
    concept queries over [image keys; concept keys] (no mask: FLUX.2 masks nothing), ``to_add_out``, gate, then
    ``norm2_context`` and the SwiGLU ``ff_context`` (fp16 clipped as the block does).

    Why position 0: the concepts are a set, not a sentence — all at one position, none is favoured by its offset
    to another; the position does not depend on the chat template, the system message or the padding side (which
    move the prompt's own tokens); it is a position every FLUX.2 text sequence has; and it is Flux.1's convention
    (all text ids zero), where ConceptAttention was defined. The single-stream blocks (text and image share one
    set of fused weights in one sequence) are not used for concepts, as ConceptAttention uses the MM-attention
    blocks only."""
    from diffusers.models.embeddings import apply_rotary_emb

    attn, mod = block.attn, kwargs["temb_mod_txt"]
    mod = mod.unsqueeze(1) if mod.ndim == 2 else mod  # (n, 1, 6·dim): as Flux2Modulation.split
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
    norm_c = (1 + scale) * block.norm1_context(c) + shift
    cq, ck, cv = (
        proj(norm_c).unflatten(-1, (-1, attn.head_dim)) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
    )
    cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
    rotary = kwargs.get("image_rotary_emb")
    if rotary is not None:  # [text; image] rows: row 0 is text position 0, given to every concept
        pos0 = tuple(r[:1].expand(c.shape[1], -1) for r in rotary)
        cq = apply_rotary_emb(cq, pos0, sequence_dim=1)
        ck = apply_rotary_emb(ck, pos0, sequence_dim=1)
    cq, ck, cv = (t.transpose(1, 2) for t in (cq, ck, cv))
    out = torch.nn.functional.scaled_dot_product_attention(cq, torch.cat([key, ck], 2), torch.cat([value, cv], 2))
    out = out.transpose(1, 2).flatten(2).to(cq.dtype)
    c = c + gate * attn.to_add_out(out)
    c = c + gate_mlp * block.ff_context(block.norm2_context(c) * (1 + scale_mlp) + shift_mlp)
    if c.dtype == torch.float16:
        c = c.clip(-65504, 65504)
    return c, out


@register_recorder("flux2")
class Flux2JointRecorder:
    """FLUX.2's ``Flux2AttnProcessor`` (double-stream: text and image streams projected apart, [text; image]) and
    ``Flux2ParallelSelfAttnProcessor`` (single-stream: one [text; image] sequence, attention and MLP fused), diffusers
    0.42, step for step, recording the joint softmax's image rows (no mask: every key is attended). Left-padded text
    (padding first) is handed over rotated so that each row's real tokens come first (:meth:`_real_first`)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, cap, name: str):
        self.cap, self.name = cap, name

    def __call__(self, attn, hidden_states, *args, **kwargs):
        if hasattr(attn, "to_qkv_mlp_proj"):
            return self._single(attn, hidden_states, *args, **kwargs)
        return self._double(attn, hidden_states, *args, **kwargs)

    def _attend(self, attn, query, key, value, text: int, attention_mask):
        """Record, then the stock attention. ``query``…: (n, L, heads, d) after norms and RoPE, text first."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if attention_mask is not None:
            raise ValueError(f"{self.name}: FLUX.2 text-to-image attention takes no mask, got one")
        if self.cap.recording:  # not the unconditional call of a two-call CFG step (klein)
            q, k = self._real_first(query.transpose(1, 2), key.transpose(1, 2), text)
            L = query.shape[1]
            self.cap._record_joint(self.name, q, k, image=(text, L), text=(0, text))
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        return out.flatten(2, 3).to(query.dtype)

    def _real_first(self, q: torch.Tensor, k: torch.Tensor, text: int):
        """(n, heads, L, d): with a left-padding tokenizer each row's text tokens rotated so that its real tokens
        (``valid_tokens``, the sink's per-sample count) come first, as the layout's positions count them."""
        layout = getattr(self.cap, "layout", None)
        if layout is None:
            raise ValueError(f"{self.name}: the FLUX.2 recorder reads the padding side from its sink's layout")
        if getattr(layout.tokenizer, "padding_side", "right") != "left":
            return q, k
        valid = getattr(self.cap, "valid_tokens", None)
        if valid is None or len(valid) != q.shape[0] or getattr(self.cap, "cfg", False):
            raise ValueError(
                f"{self.name}: left-padded FLUX.2 text needs each row's real-token count (valid_tokens, one per row "
                f"of one call without CFG halves), got {valid} for {q.shape[0]} rows"
            )
        shift = torch.tensor([text - v for v in valid], device=q.device)
        idx = (torch.arange(text, device=q.device)[None, :] + shift[:, None]) % text  # (n, text)
        idx = idx[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3])

        def rotate(t):
            return torch.cat([t[:, :, :text].gather(2, idx), t[:, :, text:]], dim=2)

        return rotate(q), rotate(k)

    def _double(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

        query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text = encoder_hidden_states.shape[1]
        out = self._attend(attn, query, key, value, text, attention_mask)
        if self.cap.wants_output and self.cap.recording:  # the image rows, after the text, for the concept stream
            k, v = (t[:, text:].transpose(1, 2) for t in (key, value))
            self.cap._record_image_output(self.name, k, v, out[:, text:])
        encoder_hidden_states, hidden_states = out.split_with_sizes([text, out.shape[1] - text], dim=1)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states

    def _single(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text = query.shape[1] - self.cap.n_image_tokens
        hidden_states = self._attend(attn, query, key, value, text, attention_mask)
        hidden_states = torch.cat([hidden_states, attn.mlp_act_fn(mlp_hidden_states)], dim=-1)
        return attn.to_out(hidden_states)


@register("Flux2Pipeline")
class Flux2(_Flux2Common):
    """FLUX.2-dev: guidance-distilled (the guidance embedding gets ``guidance_scale``), no CFG."""

    family = Family("flux2", "transformer", "text", "latent", flow=True, modes=MODES)
    cfg_calls = "two_calls"  # CFG: a conditional call, then an unconditional one (attention capture)

    def uses_cfg(self, guidance: float) -> bool:
        return False

    def plain_guidance(self, guidance: float) -> float:
        return guidance

    def _chat(self, prompt: str) -> str:
        """``format_input`` (system message + user turn, content as a text part) through ``apply_chat_template``
        with ``add_generation_prompt=False``, as ``_get_mistral_3_small_prompt_embeds``."""
        system = getattr(self.pipe, "system_message", None)
        if system is None:
            from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE as system
        messages = [
            {"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": [{"type": "text", "text": prompt}]},
        ]
        return self.pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)

    def _chat_drop(self, tokenizer) -> int:
        # apply_chat_template tokenizes the rendered text without special tokens (the template has its own BOS)
        return special_prefix(tokenizer)[0]

    def encode(self, prompts, cfg, guidance, height, width) -> dict:
        g = torch.full([1], guidance, device=self.model.device, dtype=torch.float32).expand(len(prompts))
        return {**self._encode(prompts, height, width), "guidance": g}


@register("Flux2KleinPipeline")
class Flux2Klein(_Flux2Common):
    """FLUX.2-klein: no guidance embedding; real CFG against "" as two calls, unless step-distilled."""

    family = Family("flux2_klein", "transformer", "text", "latent", flow=True, modes=MODES)
    cfg_calls = "two_calls"  # CFG: a conditional call, then an unconditional one (attention capture)

    def _chat(self, prompt: str) -> str:
        """``_get_qwen3_prompt_embeds``: one user turn, ``add_generation_prompt=True, enable_thinking=False``,
        then the tokenizer on that text (with its own special tokens, as the prompt tokens are counted)."""
        messages = [{"role": "user", "content": prompt}]
        return self.pipe.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )

    def uses_cfg(self, guidance: float) -> bool:
        # the pipeline's do_classifier_free_guidance
        return guidance > 1 and not bool(getattr(self.pipe.config, "is_distilled", False))

    def encode(self, prompts, cfg, guidance, height, width) -> dict:
        kw = self._encode(prompts, height, width)
        if not cfg:
            return kw
        neg = self._encode([""] * len(prompts), height, width)  # the pipeline's fixed negative prompt
        return {k: torch.cat([neg[k], kw[k]]) for k in kw}  # [uncond, cond]

    def denoise(self, x, t, cond, sampler):
        """Two transformer calls (cond, then uncond), as ``__call__`` makes them, combined ``u + g (c − u)``."""
        if sampler is not None and hasattr(sampler, "scale_model_input"):
            x = sampler.scale_model_input(x, t)
        t = torch.as_tensor(t, device=x.device)
        if not cond.cfg:
            return self.forward(x, t, cond.kwargs)
        halves = {k: v.chunk(2) for k, v in cond.kwargs.items()}
        out = self.forward(x, t, {k: v[1] for k, v in halves.items()})
        uncond = self.forward(x, t, {k: v[0] for k, v in halves.items()})
        return self.combine(out, uncond, cond.guidance)
