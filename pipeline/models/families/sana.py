"""Sana: ``SanaPipeline`` (rectified flow), driven as diffusers 0.42 ``SanaPipeline.__call__`` does.

Gemma2 ``encode_prompt`` with the pipeline's own defaults (its long ``complex_human_instruction`` prepended to the
prompt, ``select_index`` keeping the first + last ``max_sequence_length − 1`` tokens; the negative prompt "" without
it), attention masks; CFG ``u + g (c − u)`` on one [uncond, cond] batch when ``sampler.guidance_scale`` > 1 (the
pipeline's ``guidance_scale``); timestep ``t · timestep_scale``; learned-σ channels dropped after CFG. Latents live
in float32 (the pipeline's ``prepare_latents`` draws them so; the transformer gets them in its dtype, its output is
upcast). DC-AE (``AutoencoderDC``): x ``2^(len(encoder_block_out_channels) − 1)``, ``latents / scaling_factor``
decoded; its encoder is deterministic (``.latent``), so latent mode applies.

Solver: Sana ships DPM-Solver++ with ``prediction_type: flow_prediction``, ``use_flow_sigmas`` and ``flow_shift``;
the pipeline calls ``retrieve_timesteps(scheduler, N)`` (no σ's, no μ), i.e. ``set_timesteps(N)`` on that solver:
``scheduler=native`` does exactly that (:func:`pipeline.models.schedulers.native_flow_sigmas`). The flow_* options
(FlowMatch reference σ's) are refused for it in ``build_scheduler``. Generated at the requested size =
``use_resolution_binning=False``; sizes are multiples of 32 (the pipeline's ``check_inputs``).

Attention (:class:`SanaCrossRecorder`): the cross-attention ``attn2`` of every block (image queries, Gemma keys;
the linear self-attention ``attn1`` has no probabilities to record). The keys are the pipeline's selected
``max_sequence_length`` Gemma tokens: the prompt is lowercased and stripped (``clean_caption=False``), prefixed by
the complex human instruction, and of the padded sequence the first token (``<bos>``) and the last
``max_sequence_length − 1`` are kept — i.e. [<bos>; the instruction's last token(s); the prompt; padding], position
0 being the start token; only the prompt's own tokens map to words. Without an instruction the segment is the plain
tokenization. Maps are the raw probabilities over all the selected tokens (cross-attention, as PixArt); the mask
(padding → −10000) gives padding no mass. ``clean_caption=True`` (which rewrites the prompt) and an instruction with
braces are refused.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from pipeline.errors import UserError
from pipeline.models.attention import AttentionLayout, register_recorder
from pipeline.models.families.base import Family, FamilyDriver, batched, call_default, register
from pipeline.models.tokens import PromptTokens, prompt_tokens

__all__ = ["Sana", "SanaCrossRecorder", "sana_prompt_tokens"]


@register("SanaPipeline")
class Sana(FamilyDriver):
    family = Family(
        "sana", "transformer", "text", "latent", flow=True, modes=("metrics", "schedule", "attention", "latent")
    )

    @classmethod
    def vae_scale_of(cls, vae_config):
        """DC-AE: 2^(len(encoder_block_out_channels) − 1) (SanaPipeline's own fallback without a VAE: 32)."""
        blocks = (vae_config or {}).get("encoder_block_out_channels")
        return 2 ** (len(blocks) - 1) if blocks else 32

    @classmethod
    def flow_geometry(cls, vae_scale, component):
        """Native: transformer sample_size·scale (its resolution bins); tokens: latent patches."""
        transformer = component("transformer") or {}
        return int(transformer.get("sample_size") or 32) * vae_scale, vae_scale * int(
            transformer.get("patch_size") or 1
        )

    @classmethod
    def flow_mu(cls, config, image_seq_len):
        return None  # SanaPipeline passes no mu: its shift is the solver's flow_shift

    def size_multiple(self) -> int:
        patch = int(getattr(self.denoiser.config, "patch_size", None) or 1)
        return math.lcm(32, self.model.vae_scale * patch)  # check_inputs: multiples of 32

    def initial_noise(self, generators, height, width, init_noise_sigma):
        # prepare_latents: randn_tensor in float32 whatever the model dtype, not scaled by init_noise_sigma
        shape = (len(generators), *self.latent_shape(height, width))
        return randn_tensor(shape, generator=list(generators), device=self.model.device, dtype=torch.float32)

    def pack(self, z):
        return z.float()  # given latents too: prepare_latents casts them to float32

    def encode(self, prompts, cfg, guidance, height, width) -> dict:
        pipe, call = self.pipe, self.pipe.__call__
        pe, pam, npe, npam = pipe.encode_prompt(
            prompts,
            cfg,
            negative_prompt="",
            num_images_per_prompt=1,
            device=self.model.device,
            clean_caption=bool(call_default(call, "clean_caption", False)),
            max_sequence_length=int(call_default(call, "max_sequence_length", 300)),
            complex_human_instruction=call_default(call, "complex_human_instruction", None),
        )
        if cfg:
            pe, pam = torch.cat([npe, pe]), torch.cat([npam, pam])
        return {"encoder_hidden_states": pe.to(self.model.dtype), "encoder_attention_mask": pam}

    def forward(self, x, t, kwargs):
        timestep = batched(t, x) * self.denoiser.config.timestep_scale
        out = self.denoiser(x.to(self.model.dtype), timestep=timestep, return_dict=False, **kwargs)[0]
        return out.float()

    def encode_images(self, images):
        """DC-AE's deterministic encoding × scaling_factor: the inverse of :meth:`decode_latents`."""
        scale = self.latent_factors()[0]
        with self.model.vae_dtype() as dtype:
            return self.model.vae.encode(images.to(self.model.device, dtype)).latent * scale

    def attention_layout(self, height, width) -> AttentionLayout:
        """Cross-attention ``attn2`` of every block over the ``max_sequence_length`` selected Gemma tokens
        (:func:`sana_prompt_tokens`); raw probabilities, no renormalisation."""
        pipe, call = self.pipe, self.pipe.__call__
        if call_default(call, "clean_caption", False):
            raise UserError(
                f"mode=[attention]: {type(pipe).__name__} with clean_caption=True rewrites the prompt before "
                "tokenizing it; its tokens cannot be mapped back to the prompt's words"
            )
        max_len = int(call_default(call, "max_sequence_length", 300))
        instruction = call_default(call, "complex_human_instruction", None)
        _, h, w = self.latent_shape(height, width)
        p = int(getattr(self.denoiser.config, "patch_size", None) or 1)
        layers = tuple(
            k for k in self.denoiser.attn_processors if re.fullmatch(r"transformer_blocks\.\d+\.attn2\.processor", k)
        )

        def tokenize(prompt: str) -> PromptTokens:
            return sana_prompt_tokens(pipe.tokenizer, prompt, max_len, instruction)

        return AttentionLayout(
            "sana", layers, (h // p, w // p), pipe.tokenizer, max_len, (0, max_len), False, "Gemma", tokenize
        )


def sana_prompt_tokens(tokenizer, prompt: str, max_length: int, instruction=None) -> PromptTokens:
    """The prompt's words in the Gemma tokens ``SanaPipeline.encode_prompt`` (diffusers 0.42) keeps: the prompt
    lowercased and stripped, prefixed by ``"\n".join(instruction)`` (when given), padded to
    ``n_instruction + max_length − 2`` tokens (``n_instruction`` = the instruction tokenized alone, ``<bos>``
    included), of which token 0 and the last ``max_length − 1`` are kept. Kept token j ≥ 1 is token
    j + n_instruction − 2 of the whole: the template's first n_instruction − 2 tokens dropped, then token 0 put back
    to ``<bos>`` (a start token)."""
    text = prompt.lower().strip()
    if not instruction:
        return prompt_tokens(tokenizer, text, max_length)
    chi = "\n".join(instruction)
    if "{" in chi or "}" in chi:
        raise UserError("mode=[attention]: SanaPipeline's complex_human_instruction has braces; not supported")
    drop = len(tokenizer.encode(chi)) - 2
    t = prompt_tokens(tokenizer, text, max_length, template=chi + "{}", drop=drop)
    if any(0 in p for p in t.positions):
        raise ValueError(f"{type(tokenizer).__name__}: a word of {prompt!r} at the kept <bos> slot")
    bos = tokenizer(chi + text).input_ids[0]
    return dataclasses.replace(t, start_token=True, ids=(bos, *t.ids[1:]))


@register_recorder("sana")
class SanaCrossRecorder:
    """Sana's ``SanaAttnProcessor2_0`` (diffusers 0.42), step for step: q/k norms on the projections before the
    heads split (Sana 1.5's ``rms_norm_across_heads``; the classic ``cross`` recorder norms per head, so it is not
    exact there), the text mask as an additive bias. The float32 probabilities softmax(Q Kᵀ/√d + mask), (B·heads, HW,
    T), go to ``sink._record_cross``; the output is the stock ``scaled_dot_product_attention`` (identical images)."""

    def __init__(self, cap, name: str):
        self.cap, self.name = cap, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        b, seq, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, b)
            attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.shape[-1])
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(b, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        # the probabilities the SDPA below computes (its default scale 1/√d), in float32
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) / math.sqrt(head_dim)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            else:
                scores = scores + attention_mask.float()
        probs = scores.softmax(-1)  # (B, heads, HW, T)
        del scores
        self.cap._record_cross(self.name, probs.flatten(0, 1), attn.heads)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states / attn.rescale_output_factor
