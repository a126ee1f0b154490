"""HiDream-I1: ``HiDreamImagePipeline`` (rectified flow), driven as diffusers 0.42 ``HiDreamImagePipeline.__call__``.

Four text encoders through the pipeline's own ``encode_prompt``: CLIP-L and CLIP-G projected (pooled) embeddings
concatenated, T5 hidden states, and the hidden states of every Llama layer (``LlamaForCausalLM`` with
``output_hidden_states``; the transformer picks its ``llama_layers``). The pipeline keeps the Llama states
layer-first, (layers, N, L, D), and concatenates the CFG halves along N; here they travel batch-first, (N, layers, L, D),
so that a row of every conditioning tensor is one sample (the latent mode edits rows), and are put back layer-first
for the transformer. Latents are *unpacked* (N, C, h, w): the transformer patchifies them itself; the first draw is
``randn_tensor`` in the prompt embeddings' dtype, not scaled by ``init_noise_sigma``. The transformer gets the
solver's raw timestep (0..1000, no ``/ 1000``) and its output is negated (``noise_pred = -noise_pred``) before CFG.

``sampler.guidance_scale`` is the pipeline's ``guidance_scale``: classifier-free guidance ``u + g (c − u)`` in one
[uncond, cond] batch when > 1, the unconditional half from the pipeline's default negative prompt "" (the project's
uncond convention); none at ≤ 1 (HiDream-I1-Dev/Fast run with guidance 0).

Timesteps: the pipeline calls ``set_timesteps(num_inference_steps, mu=calculate_shift(transformer.max_seq))`` — no
σ's — and plain ``set_timesteps(num_inference_steps)`` on a ``UniPCMultistepScheduler``; ``mu`` only matters to a
``use_dynamic_shifting`` scheduler. HiDream-I1's schedulers use a static shift; a dynamic-shift scheduler is refused,
because its μ comes from the transformer's ``max_resolution`` (not the image size), which the config-only schedule
mode cannot see.

Sizes: the pipeline rescales any requested height × width to the area of its default (128·vae_scale)², so only that
native size is drawn here (``fixed_size``; other sizes are refused up front rather than silently resized). Decode:
``z / scaling_factor + shift_factor``. Modes: metrics, schedule, latent, attention.

Attention (:class:`HiDreamJointRecorder`; ``HiDreamImageTransformer2DModel`` has no ``AttentionMixin``, so the
capture finds its layers by ``get_processor``): joint attention in every double- and single-stream block over
[image; T5; Llama (last of ``llama_layers``); Llama (the block's own layer)] — the transformer's text is T5 and the
last Llama layer carried through the double-stream blocks, plus a fresh Llama layer appended per block. The maps
come from the **T5** segment (0, T5 length) of the text: it is the one text segment that sits at the same place in
every block (the per-block Llama layers are different hidden layers of Llama 3.1), it is the encoder SD3 and Flux
maps come from (the families compare), and the T5 tokenizer adds no chat template or BOS (words map directly). The
transformer gets no text mask (every padding token is attended: ``key_mask`` None); maps are renormalised over the
prompt's real T5 tokens, as SD3's. Non-square latents, which the transformer pads to ``max_seq`` image tokens, are
refused (the pipeline draws only its square native size here anyway).

ConceptAttention (:func:`hidream_concept_step`): the concept tokens (T5, projected) ride the double-stream blocks as a
text stream of their own, in place of the blocks' [T5; Llama; Llama] text; single-stream blocks are left out.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.models.attention import AttentionLayout, ConceptStream, attention_processors, register_recorder
from pipeline.models.families.base import Family, FamilyDriver, batched, call_default, register
from pipeline.models.flow_shift import uses_dynamic_shift

__all__ = ["HiDreamImage", "HiDreamJointRecorder", "hidream_concept_step"]

DEFAULT_SAMPLE_SIZE = 128  # HiDreamImagePipeline.default_sample_size (latent pixels)


@register("HiDreamImagePipeline")
class HiDreamImage(FamilyDriver):
    family = Family(
        "hidream", "transformer", "text", "latent", flow=True, modes=("metrics", "schedule", "latent", "attention")
    )
    fixed_size = True  # the pipeline resizes every request to its native area

    @classmethod
    def flow_geometry(cls, vae_scale, component):
        """Native: 128·scale (HiDreamImagePipeline's default_sample_size); tokens: latent patches of patch_size."""
        transformer = component("transformer") or {}
        return DEFAULT_SAMPLE_SIZE * vae_scale, vae_scale * int(transformer.get("patch_size") or 2)

    @classmethod
    def flow_timestep_kwargs(cls, config, num_inference_steps, image_seq_len):
        """HiDreamImagePipeline's: ``num_inference_steps`` and no σ's; its ``mu`` (from the transformer config) is
        ignored by the static-shift schedulers HiDream uses, and a dynamic-shift one is refused."""
        if uses_dynamic_shift(config):
            raise UserError(
                "HiDreamImagePipeline: a use_dynamic_shifting scheduler is not supported: the pipeline's mu is "
                "calculate_shift(transformer.max_seq) from the transformer's max_resolution, not from the image size; "
                "use a static-shift scheduler (HiDream-I1's own)"
            )
        return {"num_inference_steps": int(num_inference_steps)}

    def set_timesteps(self, sampler, steps, height, width):
        from diffusers import UniPCMultistepScheduler

        if isinstance(sampler, UniPCMultistepScheduler):  # the pipeline's special case: its own flow σ's, no mu
            sampler.set_timesteps(steps, device=self.model.device)
        else:
            super().set_timesteps(sampler, steps, height, width)

    def native_size(self):
        s = int(getattr(self.pipe, "default_sample_size", DEFAULT_SAMPLE_SIZE)) * self.model.vae_scale
        return s, s

    def size_multiple(self) -> int:
        return self.model.vae_scale * 2

    def latent_shape(self, height, width):
        s = self.model.vae_scale
        return self.latent_channels, 2 * (height // (s * 2)), 2 * (width // (s * 2))

    def initial_latents(self, x, init_noise_sigma):
        return x  # HiDreamImagePipeline does not scale by init_noise_sigma

    def encode(self, prompts, cfg, guidance, height, width) -> dict:
        max_len = int(call_default(self.pipe.__call__, "max_sequence_length", 128))
        t5, neg_t5, llama, neg_llama, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            device=self.model.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=None,  # the pipeline's default: ""
            max_sequence_length=max_len,
        )
        if cfg:  # [uncond, cond], as the pipeline (Llama along its batch axis 1)
            t5, pooled = torch.cat([neg_t5, t5]), torch.cat([neg_pooled, pooled])
            llama = torch.cat([neg_llama, llama], dim=1)
        return {
            "encoder_hidden_states_t5": t5,
            "encoder_hidden_states_llama3": llama.transpose(0, 1),  # batch-first here, layer-first for the model
            "pooled_embeds": pooled,
        }

    def forward(self, x, t, kwargs):
        kw = dict(kwargs)
        kw["encoder_hidden_states_llama3"] = kw["encoder_hidden_states_llama3"].transpose(0, 1)
        out = self.denoiser(hidden_states=x, timesteps=batched(t, x), return_dict=False, **kw)[0]
        return -out  # the pipeline's noise_pred = -noise_pred, before CFG

    def prediction(self, out):
        return out  # no learned σ

    def latent_factors(self):
        scale, _, _, _ = super().latent_factors()
        return scale, float(getattr(self.model.vae.config, "shift_factor", None) or 0.0), None, None

    def attention_layout(self, height, width) -> AttentionLayout:
        """Joint attention [image; T5; Llama; Llama] in the double- and single-stream blocks; the maps' segment is
        T5 (0, min(max_sequence_length, tokenizer_3.model_max_length)) — module docstring."""
        _, h, w = self.latent_shape(height, width)
        p = int(self.denoiser.config.patch_size)
        if h != w:
            raise UserError(
                f"mode=[attention]: {type(self.denoiser).__name__} pads non-square latents ({h}x{w}) to max_seq image "
                "tokens (zeroed keys, not masked ones); only its square native size is supported"
            )
        layers = tuple(
            k
            for k in attention_processors(self.denoiser)
            if re.fullmatch(r"(double|single)_stream_blocks\.\d+\.block\.attn1\.processor", k)
        )
        tok = self.pipe.tokenizer_3
        t5 = min(int(call_default(self.pipe.__call__, "max_sequence_length", 128)), int(tok.model_max_length))
        double = tuple(k.removesuffix(".attn1.processor") for k in layers if k.startswith("double_stream_blocks."))
        concepts = ConceptStream(double, hidream_concept_step, "attn1")
        return AttentionLayout("hidream", layers, (h // p, w // p), tok, t5, (0, t5), True, "T5", None, concepts)

    def concept_tokens(self, words: list[str]) -> torch.Tensor:
        """Each concept word encoded alone by the pipeline's own ``encode_prompt`` (no CFG); its tokens in the T5
        segment averaged; the transformer's T5 ``caption_projection`` (its last) applied — what the T5 part of the
        double-stream blocks' text input is. The concepts are a text stream of their own: they take the place of
        the blocks' whole text input [T5; Llama (last layer); Llama (the block's layer)], so no Llama token joins
        them (ConceptAttention's concept tokens are the encoder's, here T5's, alone)."""
        h, w = self.native_size()
        embeds = self.encode(words, False, 1.0, h, w)["encoder_hidden_states_t5"]
        mean = self._concept_segment_mean(words, embeds, self.attention_layout(h, w)).to(self.denoiser.dtype)
        projection = self.denoiser.caption_projection
        return mean if projection is None else projection[-1](mean)


def hidream_concept_step(block, c, key, value, kwargs):
    """HiDream's double-stream ``HiDreamImageTransformerBlock`` (diffusers 0.42) text-stream path applied to concept
    tokens ``c``: the block's ``adaLN_modulation`` of ``temb`` (the text's shift/scale/gate), ``norm1_t``, the text
    projections ``to_*_t`` with their RMS q/k norms, RoPE at text position 0 (HiDream's ``txt_ids`` are zeros: the
    first text slot's rotation from the block's own ``image_rotary_emb``, an identity), attention of the concept
    queries over [image keys; concept keys] (no mask: HiDream has none), ``to_out_t``, gate, ``norm3_t`` and the text
    feed-forward ``ff_t`` (plain SwiGLU; the MoE is the image's)."""
    from diffusers.models.transformers.transformer_hidream_image import apply_rope

    attn, wtype = block.attn1, c.dtype
    mod = block.adaLN_modulation(kwargs["temb"])[:, None].chunk(12, dim=-1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[6:]
    norm_c = block.norm1_t(c).to(dtype=wtype) * (1 + scale_msa) + shift_msa
    b, n_c, n_image, d = c.shape[0], c.shape[1], key.shape[2], key.shape[-1]
    cq = attn.q_rms_norm_t(attn.to_q_t(norm_c)).to(dtype=wtype).view(b, n_c, attn.heads, d)
    ck = attn.k_rms_norm_t(attn.to_k_t(norm_c)).to(dtype=wtype).view(b, n_c, attn.heads, d)
    cv = attn.to_v_t(norm_c).view(b, n_c, attn.heads, d)
    rope = kwargs["image_rotary_emb"]  # (n, image + text, 1, d_rope / 2, 2, 2): text slot 0 follows the image
    rope = rope[:, n_image : n_image + 1].expand(b, n_c, *rope.shape[2:])
    if d == rope.shape[-3] * 2:
        cq, ck = apply_rope(cq, ck, rope)
    else:  # RoPE on the first half of each head, as the processor
        (q1, q2), (k1, k2) = cq.chunk(2, dim=-1), ck.chunk(2, dim=-1)
        q1, k1 = apply_rope(q1, k1, rope)
        cq, ck = torch.cat([q1, q2], dim=-1), torch.cat([k1, k2], dim=-1)
    cq, ck, cv = (t.transpose(1, 2) for t in (cq, ck, cv))
    out = F.scaled_dot_product_attention(cq, torch.cat([key, ck], 2), torch.cat([value, cv], 2))
    out = out.transpose(1, 2).reshape(b, n_c, attn.heads * d).to(cq.dtype)
    c = gate_msa * attn.to_out_t(out) + c
    c = gate_mlp * block.ff_t(block.norm3_t(c).to(dtype=wtype) * (1 + scale_mlp) + shift_mlp) + c
    return c, out


@register_recorder("hidream")
class HiDreamJointRecorder:
    """HiDream's ``HiDreamAttnProcessor`` (diffusers 0.42), step for step, recording the joint softmax's image rows.
    Double-stream blocks: [image; text] from the two projections; single-stream blocks: one sequence whose first
    ``n_image_tokens`` are the image. RMS q/k norms before the heads split, keys times the image-token mask when the
    transformer pads the image (never at a square size), RoPE (HiDream's ``apply_rope``, on the whole head or its
    first half) on every token; no attention mask."""

    def __init__(self, cap, name: str):
        self.cap, self.name = cap, name

    def __call__(
        self, attn, hidden_states, hidden_states_masks=None, encoder_hidden_states=None, image_rotary_emb=None, **kw
    ):
        from diffusers.models.transformers.transformer_hidream_image import apply_rope

        dtype, b = hidden_states.dtype, hidden_states.shape[0]
        query_i = attn.q_rms_norm(attn.to_q(hidden_states)).to(dtype=dtype)
        key_i = attn.k_rms_norm(attn.to_k(hidden_states)).to(dtype=dtype)
        value_i = attn.to_v(hidden_states)
        head_dim = key_i.shape[-1] // attn.heads
        query_i, key_i, value_i = (t.view(b, -1, attn.heads, head_dim) for t in (query_i, key_i, value_i))
        if hidden_states_masks is not None:
            key_i = key_i * hidden_states_masks.view(b, -1, 1, 1)
        if not attn.single:
            query_t = attn.q_rms_norm_t(attn.to_q_t(encoder_hidden_states)).to(dtype=dtype)
            key_t = attn.k_rms_norm_t(attn.to_k_t(encoder_hidden_states)).to(dtype=dtype)
            value_t = attn.to_v_t(encoder_hidden_states)
            query_t, key_t, value_t = (t.view(b, -1, attn.heads, head_dim) for t in (query_t, key_t, value_t))
            n_image, n_text = query_i.shape[1], query_t.shape[1]
            query = torch.cat([query_i, query_t], dim=1)
            key = torch.cat([key_i, key_t], dim=1)
            value = torch.cat([value_i, value_t], dim=1)
        else:
            n_image = self.cap.n_image_tokens  # [image; T5; Llama; Llama] in one sequence
            query, key, value = query_i, key_i, value_i
        if query.shape[-1] == image_rotary_emb.shape[-3] * 2:
            query, key = apply_rope(query, key, image_rotary_emb)
        else:
            query_1, query_2 = query.chunk(2, dim=-1)
            key_1, key_2 = key.chunk(2, dim=-1)
            query_1, key_1 = apply_rope(query_1, key_1, image_rotary_emb)
            query = torch.cat([query_1, query_2], dim=-1)
            key = torch.cat([key_1, key_2], dim=-1)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # (n, heads, L, d)
        self.cap._record_joint(self.name, query, key, image=(0, n_image), text=(n_image, query.shape[2]))
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
        if not attn.single:
            if self.cap.wants_output and self.cap.recording:  # the concept stream's image rows
                self.cap._record_image_output(
                    self.name, key[:, :, :n_image], value[:, :, :n_image], hidden_states[:, :n_image]
                )
            hidden_states_i, hidden_states_t = torch.split(hidden_states, [n_image, n_text], dim=1)
            return attn.to_out(hidden_states_i), attn.to_out_t(hidden_states_t)
        return attn.to_out(hidden_states)
