"""Qwen-Image: ``QwenImagePipeline`` (rectified flow), driven as diffusers 0.42 ``QwenImagePipeline.__call__``.

Text: Qwen2.5-VL's last hidden states of the prompt in the pipeline's chat template, the template's first
``prompt_template_encode_start_idx`` tokens dropped, with a per-prompt mask (``encode_prompt``). Latents: a Wan-style
5-D VAE (one frame; scale 2^len(temperal_downsample)), packed 2×2 into tokens, normalised with the VAE's
``latents_mean``/``latents_std``; σ's ``linspace(1, 1/N, N)`` with μ from the token count; the transformer gets
``t / 1000`` and ``img_shapes``.

``sampler.guidance_scale`` is the pipeline's ``true_cfg_scale``: above 1, classifier-free guidance against the
project's "no prompt", the empty negative prompt ``""`` (``pipe(prompt, true_cfg_scale=g, negative_prompt="")``),
as two separate transformer calls each with its own prompt's mask and length, combined as
``comb = u + g (c − u)`` rescaled per token to the conditional prediction's norm, ``comb · ‖c‖ / ‖comb‖``.
The pipeline's own ``guidance_scale`` is only for guidance-distilled transformers (``guidance_embeds``); the 0.42
``QwenImageTransformer2DModel`` builds no guidance embedding for that flag and its forward cannot take the guidance
the pipeline passes, so such a transformer is refused up front (no such checkpoint exists).

Conditioning tensors are padded with zeros to ``max_sequence_length`` (the ``__call__`` default, 512), mask 0, so
that every prompt's condition has one shape (the latent mode's directions subtract conditions of different
prompts); each call trims them back to the batch's longest prompt, mask dropped when all ones — exactly the
tensors ``encode_prompt`` gives for that batch.

Attention: joint attention over [text; image] in every double-stream block (``transformer_blocks.N.attn``,
``QwenDoubleStreamAttnProcessor2_0``). The text is the prompt in the chat template with the template's first
``prompt_template_encode_start_idx`` tokens (system message and ``<|im_start|>user\n``) dropped: the prompt's own
tokens, then the template's tail (``<|im_end|>\n<|im_start|>assistant\n``), at most ``max_sequence_length``. The
segment is all ``max_sequence_length`` text slots; only the prompt's tokens map to words; the maps renormalise over
the prompt's tokens and the tail (the tokens the model's mask lets through). A call's text is as long as its batch's
longest prompt, so the recorder pads the text keys to the segment's length with masked keys (no mass). Output-space
concept maps (ConceptAttention, :func:`qwenimage_concept_step`): the concept tokens ride every block's text stream at
text position 0.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.models.attention import AttentionLayout, ConceptStream, register_recorder
from pipeline.models.families.base import Family, FamilyDriver, batched, call_default, register
from pipeline.models.flow_shift import shift_mu, uses_dynamic_shift
from pipeline.models.tokens import prompt_tokens

__all__ = ["QwenImage", "QwenImageJointRecorder", "qwenimage_concept_step"]

DEFAULT_SAMPLE_SIZE = 128  # QwenImagePipeline.default_sample_size (latent pixels before packing)
TEMPORAL_DOWNSAMPLE = (False, True, True)  # AutoencoderKLQwenImage's default temperal_downsample


@register("QwenImagePipeline")
class QwenImage(FamilyDriver):
    family = Family(
        "qwenimage", "transformer", "text", "latent", flow=True, modes=("metrics", "schedule", "attention", "latent")
    )
    cfg_calls = "two_calls"  # CFG: a conditional call, then an unconditional one (attention capture)

    def __init__(self, model):
        super().__init__(model)
        if getattr(self.denoiser.config, "guidance_embeds", False):
            raise UserError(
                f"{type(self.pipe).__name__}: the transformer is guidance-distilled (guidance_embeds: true), but the "
                "diffusers 0.42 QwenImageTransformer2DModel has no guidance embedding to feed its guidance_scale to "
                "(its forward fails on it); only true_cfg_scale models are driven (sampler.guidance_scale)"
            )

    # ------------------------------------------------------------------ geometry
    @classmethod
    def vae_scale_of(cls, vae_config):
        """QwenImagePipeline's ``2 ** len(vae.temperal_downsample)`` (8 without a VAE config)."""
        if not vae_config:
            return 8
        return 2 ** len(vae_config.get("temperal_downsample", TEMPORAL_DOWNSAMPLE))

    @classmethod
    def flow_geometry(cls, vae_scale, component):
        """Native: 128·scale (``default_sample_size``); tokens: 2×2-packed latents."""
        return DEFAULT_SAMPLE_SIZE * vae_scale, 2 * vae_scale

    @classmethod
    def flow_timestep_kwargs(cls, config, num_inference_steps, image_seq_len):
        """QwenImagePipeline's: ``sigmas = linspace(1, 1/N, N)`` and ``mu`` from the token count (always passed; a
        static-shift scheduler ignores it)."""
        n = int(num_inference_steps)
        out: dict = {"sigmas": np.linspace(1.0, 1 / n, n)}
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
        """(C, h, w): the pipeline's (C, 1, h, w) draw without its one-frame axis (same numbers, same order)."""
        s = self.model.vae_scale
        return self.latent_channels, 2 * (height // (s * 2)), 2 * (width // (s * 2))

    def token_step(self) -> int:
        return self.model.vae_scale * 2

    def pack(self, z):
        return self.pipe._pack_latents(z, *z.shape)

    def unpack(self, latents, height, width):
        return self.pipe._unpack_latents(latents, height, width, self.model.vae_scale)[:, :, 0]

    def initial_latents(self, x, init_noise_sigma):
        return self.pack(x)  # QwenImagePipeline does not scale by init_noise_sigma

    # ------------------------------------------------------------------ conditioning
    def encode(self, prompts, cfg, guidance, height, width) -> dict:
        """``encode_prompt`` of the prompts (and, with CFG, of ``""`` per sample, first: ``[uncond; cond]`` rows),
        each padded to ``max_sequence_length`` with mask 0 (see the module docstring)."""
        max_len = int(call_default(self.pipe.__call__, "max_sequence_length", 512))
        n = len(prompts)
        halves = [self._encoded(prompts, 1, max_len)]
        if cfg:
            halves.insert(0, self._encoded([""], n, max_len))  # the pipeline's negative prompt, repeated per image
        _, h, w = self.latent_shape(height, width)
        return {
            "encoder_hidden_states": torch.cat([e for e, _ in halves]),
            "encoder_hidden_states_mask": torch.cat([m for _, m in halves]),
            "img_shape": (1, h // 2, w // 2),  # QwenImagePipeline's img_shapes entry of one image
        }

    def _encoded(self, prompts, per_prompt: int, max_len: int):
        pe, mask = self.pipe.encode_prompt(
            prompt=prompts, device=self.model.device, num_images_per_prompt=per_prompt, max_sequence_length=max_len
        )
        if mask is None:  # encode_prompt drops an all-ones mask
            mask = torch.ones(pe.shape[:2], dtype=torch.long, device=pe.device)
        pad = max_len - pe.shape[1]
        return F.pad(pe, (0, 0, 0, pad)), F.pad(mask, (0, pad))

    # ------------------------------------------------------------------ the denoiser
    def denoise(self, x, t, cond, sampler):
        """As the pipeline: the conditional call, then (CFG) the unconditional one, then :meth:`combine`."""
        t = torch.as_tensor(t, device=x.device)
        if not cond.cfg:
            return self.forward(x, t, cond.kwargs, "cond")
        n = x.shape[0]
        pos = {k: v[n:] if isinstance(v, torch.Tensor) else v for k, v in cond.kwargs.items()}
        neg = {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in cond.kwargs.items()}
        cond_out = self.forward(x, t, pos, "cond")
        uncond_out = self.forward(x, t, neg, "uncond")
        return self.combine(cond_out, uncond_out, cond.guidance)

    def combine(self, cond_out, uncond_out, guidance):
        """``comb = u + g (c − u)``, rescaled per token to the conditional prediction's norm (as the pipeline)."""
        comb = uncond_out + guidance * (cond_out - uncond_out)
        cond_norm = torch.norm(cond_out, dim=-1, keepdim=True)
        noise_norm = torch.norm(comb, dim=-1, keepdim=True)
        return comb * (cond_norm / noise_norm)

    def forward(self, x, t, kwargs, context: str = "cond"):
        """One transformer call; the text trimmed to the batch's longest prompt (``encode_prompt``'s padding), the
        mask dropped when all ones, as the pipeline passes them. ``context``: the transformer's cache context."""
        mask = kwargs["encoder_hidden_states_mask"]
        length = int(mask.sum(dim=1).max())  # encode_prompt puts each prompt's tokens first: its length = its sum
        pe, mask = kwargs["encoder_hidden_states"][:, :length], mask[:, :length]
        with self.denoiser.cache_context(context):
            return self.denoiser(
                hidden_states=x,
                timestep=batched(t, x).to(x.dtype) / 1000,
                guidance=None,
                encoder_hidden_states_mask=None if mask.all() else mask,
                encoder_hidden_states=pe,
                img_shapes=[[kwargs["img_shape"]]] * x.shape[0],
                attention_kwargs={},
                return_dict=False,
            )[0]

    def prediction(self, out):
        return out  # no learned σ

    # ------------------------------------------------------------------ VAE
    def _factors(self, z):
        """The pipeline's ``latents_mean`` and ``1 / latents_std`` in ``z``'s dtype, shaped for (N, C, 1, h, w)."""
        c = self.model.vae.config
        mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1).to(z.device, z.dtype)
        return mean, inv_std

    def latent_factors(self):
        """No scaling/shift factor: per-channel ``latents_mean``/``latents_std`` (z = (x − mean) / std)."""
        c = self.model.vae.config
        return 1.0, 0.0, torch.tensor(c.latents_mean).view(1, -1, 1, 1), torch.tensor(c.latents_std).view(1, -1, 1, 1)

    def decode_latents(self, z):
        """As the pipeline: ``z / (1 / std) + mean`` on the one-frame 5-D latents, frame 0 of the decode."""
        with self.model.vae_dtype() as dtype:
            z = z.unsqueeze(2).to(dtype)
            mean, inv_std = self._factors(z)
            return self.model.vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]

    def encode_images(self, images):
        """The inverse, as the Qwen-Image img2img/edit pipelines encode: ``(mode − mean) · (1 / std)``."""
        with self.model.vae_dtype() as dtype:
            enc = self.model.vae.encode(images.to(self.model.device, dtype).unsqueeze(2))
            z = enc.latent_dist.mode()
            mean, inv_std = self._factors(z)
            return ((z - mean) * inv_std)[:, :, 0]

    # ------------------------------------------------------------------ attention
    def attention_layout(self, height, width) -> AttentionLayout:
        """Joint attention [text; image] in every double-stream block; the segment: the ``max_sequence_length`` text
        slots after the chat template's dropped prefix (module docstring)."""
        _, h, w = self.latent_shape(height, width)
        layers = tuple(
            k for k in self.denoiser.attn_processors if re.fullmatch(r"transformer_blocks\.\d+\.attn\.processor", k)
        )
        slots = int(call_default(self.pipe.__call__, "max_sequence_length", 512))
        tok = self.pipe.tokenizer
        tokenize = functools.partial(
            prompt_tokens,
            tok,
            max_length=slots,
            template=self.pipe.prompt_template_encode,
            drop=int(self.pipe.prompt_template_encode_start_idx),
            trail=0,  # the segment is a plain cut of the text: the template's tail may be cut off
        )
        blocks = tuple(k.removesuffix(".attn.processor") for k in layers)
        concepts = ConceptStream(blocks, qwenimage_concept_step)
        return AttentionLayout(
            "qwenimage", layers, (h // 2, w // 2), tok, slots, (0, slots), True, "Qwen2.5-VL", tokenize, concepts
        )

    def concept_tokens(self, words: list[str]) -> torch.Tensor:
        """Each concept word encoded alone by the pipeline's own ``encode_prompt`` (the chat template, its prefix
        dropped), the mean of the Qwen2.5-VL hidden states over the word's tokens, then what
        ``QwenImageTransformer2DModel`` applies to the text before its first block: ``txt_norm`` (RMSNorm, applied
        to the mean) and ``txt_in``. There is no text refiner."""
        h, w = self.native_size()
        max_len = int(call_default(self.pipe.__call__, "max_sequence_length", 512))
        embeds, _ = self._encoded(words, 1, max_len)
        mean = self._concept_segment_mean(words, embeds, self.attention_layout(h, w))
        d = self.denoiser
        return d.txt_in(d.txt_norm(mean.to(d.dtype)))


def qwenimage_concept_step(block, c, key, value, kwargs):
    """Qwen-Image's ``QwenImageTransformerBlock`` (diffusers 0.42) text-stream path applied to concept tokens:
    ``txt_mod(temb)`` (the first half of ``temb`` with ``zero_cond_t``, as the block), ``txt_norm1`` + shift/scale,
    the added q/k/v projections and q/k RMS norms, the complex rotary embedding of text position 0 (the block's own
    ``image_rotary_emb[1]`` row 0: index ``max_vid_index`` of ``QwenEmbedRope`` on every axis, where the prompt's
    first token sits — the chat template's prefix is dropped), attention of the concept queries over [image keys;
    concept keys] (``QwenDoubleStreamAttnProcessor2_0``; the text mask only masks text padding, the concepts are
    never masked and image keys never are), ``to_add_out``, gate, ``txt_norm2`` + shift/scale, ``txt_mlp``, gate
    (fp16 clipped as the block does). Every concept takes position 0: a set, not a sentence, and the position a
    one-word prompt's word has."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    attn, temb = block.attn, kwargs["temb"]
    if getattr(block, "zero_cond_t", False):
        temb = torch.chunk(temb, 2, dim=0)[0]
    mod1, mod2 = block.txt_mod(temb).chunk(2, dim=-1)
    shift, scale, gate = (t.unsqueeze(1) for t in mod1.chunk(3, dim=-1))
    norm_c = block.txt_norm1(c) * (1 + scale) + shift
    head_dim = attn.inner_dim // attn.heads
    cq, ck, cv = (p(norm_c).unflatten(-1, (-1, head_dim)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    if attn.norm_added_q is not None:
        cq = attn.norm_added_q(cq)
    if attn.norm_added_k is not None:
        ck = attn.norm_added_k(ck)
    rotary = kwargs.get("image_rotary_emb")
    if rotary is not None:  # (image freqs, text freqs): text position 0 for every concept
        pos0 = rotary[1][:1].expand(c.shape[1], -1)
        cq = apply_rotary_emb_qwen(cq, pos0, use_real=False)
        ck = apply_rotary_emb_qwen(ck, pos0, use_real=False)
    cq, ck, cv = (t.transpose(1, 2) for t in (cq, ck, cv))
    out = F.scaled_dot_product_attention(cq, torch.cat([key, ck], 2), torch.cat([value, cv], 2))
    out = out.transpose(1, 2).flatten(2).to(cq.dtype)
    c = c + gate * attn.to_add_out(out)
    shift, scale, gate = (t.unsqueeze(1) for t in mod2.chunk(3, dim=-1))
    c = c + gate * block.txt_mlp(block.txt_norm2(c) * (1 + scale) + shift)
    if c.dtype == torch.float16:
        c = c.clip(-65504, 65504)
    return c, out


@register_recorder("qwenimage")
class QwenImageJointRecorder:
    """Qwen-Image's ``QwenDoubleStreamAttnProcessor2_0`` (diffusers 0.42), step for step, recording the joint
    softmax's image rows. The model's order is [text; image] with the text as long as the call's longest prompt and
    its mask ``[encoder_hidden_states_mask; ones]``, handed over as they are (the capture zero-fills the segment's
    slots past the call's text)."""

    def __init__(self, cap, name: str):
        self.cap, self.name = cap, name

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        encoder_hidden_states_mask=None,
        attention_mask=None,
        image_rotary_emb=None,
    ):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if encoder_hidden_states is None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 does not accept an external attention_mask")
        b, n_image = hidden_states.shape[:2]
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones((b, n_image), dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        seq_txt = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads
        img_q, img_k, img_v = (
            p(hidden_states).unflatten(-1, (-1, head_dim)) for p in (attn.to_q, attn.to_k, attn.to_v)
        )
        txt_q, txt_k, txt_v = (
            p(encoder_hidden_states).unflatten(-1, (-1, head_dim))
            for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_q = apply_rotary_emb_qwen(img_q, img_freqs, use_real=False)
            img_k = apply_rotary_emb_qwen(img_k, img_freqs, use_real=False)
            txt_q = apply_rotary_emb_qwen(txt_q, txt_freqs, use_real=False)
            txt_k = apply_rotary_emb_qwen(txt_k, txt_freqs, use_real=False)
        self._record(txt_q, txt_k, img_q, img_k, encoder_hidden_states_mask)
        query, key, value = (torch.cat(p, dim=1) for p in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.flatten(2, 3).to(query.dtype)
        txt_out, img_out = out[:, :seq_txt], out[:, seq_txt:]
        if self.cap.wants_output and self.cap.recording:  # the image rows, for the concept stream
            self.cap._record_image_output(self.name, img_k.transpose(1, 2), img_v.transpose(1, 2), img_out)
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        return img_out, attn.to_add_out(txt_out.contiguous())

    def _record(self, txt_q, txt_k, img_q, img_k, text_mask) -> None:
        """[text (the call's length, its mask); image] as (b, heads, L, d); segment slots past the call's text are
        zero in the capture (padding this call does not have)."""
        if not self.cap.recording:  # the unconditional call of a two-call CFG step
            return
        b, seq_txt = txt_k.shape[:2]
        n_image = img_k.shape[1]
        key_mask = None
        if text_mask is not None:
            image = torch.ones((b, n_image), dtype=torch.bool, device=txt_k.device)
            key_mask = torch.cat([text_mask.bool(), image], dim=1)
        query = torch.cat([txt_q, img_q], dim=1).transpose(1, 2)
        key = torch.cat([txt_k, img_k], dim=1).transpose(1, 2)
        self.cap._record_joint(
            self.name, query, key, image=(seq_txt, seq_txt + n_image), text=(0, seq_txt), key_mask=key_mask
        )
