"""HunyuanImage 2.1: ``HunyuanImagePipeline`` (rectified flow), as diffusers 0.42's ``HunyuanImagePipeline.__call__``.

Text: Qwen2.5-VL hidden states (``hidden_states[-3]``) of the prompt in the pipeline's chat template, the template's
first 34 tokens dropped, with their mask; plus ByT5 embeddings of the prompt's quoted (glyph) text with its own mask,
zeros when there is none — both from the pipeline's own ``encode_prompt``. Latents (C, H/s, W/s) at the VAE's
``spatial_compression_ratio`` s (32 for the real model), unscaled noise, σ's ``linspace(1, 0, N + 1)[:-1]`` through
the scheduler's static shift, the transformer at timestep σ·1000 in the model dtype; decode ``z / scaling_factor``.

``sampler.guidance_scale`` g:
  * base model (no ``guidance_embeds``): guidance is the pipeline's ``guider`` component, an
    AdaptiveProjectedMixGuidance (CFG for the first steps, then adaptive projected guidance with a momentum buffer
    and a norm threshold — stateful across steps), or its ``ocr_guider`` for a prompt with quoted text. g is that
    guider's ``guidance_scale`` (``guider.new(guidance_scale=g)``, as diffusers' docs change it); every other
    setting (APG scale, momentum, rescale, start step, start/stop) is the saved guider's. The guiders themselves
    are driven step for step — ``set_state``, ``prepare_inputs``, ``__call__`` on the cond / uncond predictions —
    fresh for each batch and per sample group (the pipeline picks the OCR guider when *its* prompt has glyph text,
    so each sample gets what it would get alone; the guider's norms and momentum are per sample). g = 1 is the
    guider's own "no guidance" (the conditional prediction only). The uncond prompt is "" (the pipeline's default
    negative prompt). Cond and uncond run as one batch (the pipeline makes two calls: same values).
  * guidance-distilled model (``guidance_embeds``): g is ``distilled_guidance_scale``, fed to the guidance
    embedding as g·1000 (also for a condition without CFG); a saved guider, if any, runs as saved.
  * MeanFlow transformers (``use_meanflow``) also get ``timestep_r``, the solver's next timestep (0 at the end).

Refused: g ≠ 1 on a base model saved without guiders (its pipeline ignores any guidance); a scheduler with
``use_dynamic_shifting`` (the pipeline passes σ's without ``mu``: its own call fails); guided denoiser calls outside
the solver loop (the guider's step index and MeanFlow's next timestep exist only there — the latent mode's
inversion uses conditions without CFG, so only MeanFlow models are refused there, up front:
:meth:`latent_part_refusal`).

Attention (:class:`HunyuanImageJointRecorder`): joint attention over [image; text] in every double- and
single-stream block (the refiner's text self-attention is not recorded). Text = the refined Qwen2.5-VL tokens (the
chat template's first 34 tokens dropped, 1000 slots) — and, on a transformer with a ByT5 projection
(``context_embedder_2``), the glyph tokens, which the transformer sorts as [valid ByT5; valid Qwen; padding ByT5;
padding Qwen]. The maps come from the Qwen segment (0, 1000) of the text, only the user's prompt's tokens mapping
to words (template excluded); the model's boolean mask (image and valid text keys) is the keys' mask. Without glyph
text the valid Qwen tokens sit at text positions 0..m-1, as the segment says; a prompt *with* quoted (glyph) text
on a transformer with a ByT5 projection is refused up front: its valid Qwen tokens then sit after a per-sample
number of glyph tokens, which a fixed segment cannot express.

No ConceptAttention concept stream yet: the text reaches the blocks through a timestep-conditioned token refiner
(:func:`refine_concepts`), so the concepts' block input changes per denoiser call, which fixed concept tokens cannot
carry; :func:`hunyuanimage_concept_step` is the double-stream text path for when the capture can.
"""

from __future__ import annotations

import contextlib
import re

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging

from pipeline.errors import UserError
from pipeline.models.attention import AttentionLayout, ConceptStream, register_recorder
from pipeline.models.families.base import Family, FamilyDriver, batched, register
from pipeline.models.tokens import PromptTokens, prompt_tokens

__all__ = ["HunyuanImage", "HunyuanImageJointRecorder", "hunyuanimage_concept_step", "refine_concepts"]

COND_KEYS = ("encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2", "encoder_attention_mask_2")


@contextlib.contextmanager
def _quiet():
    """Building a guider logs diffusers' "experimental feature" warning each time: once per batch is noise."""
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


@register("HunyuanImagePipeline")
class HunyuanImage(FamilyDriver):
    family = Family(
        "hunyuanimage", "transformer", "text", "latent", flow=True, modes=("metrics", "schedule", "attention", "latent")
    )

    # ------------------------------------------------------------------ geometry
    @classmethod
    def vae_scale_of(cls, vae_config):
        """The VAE's ``spatial_compression_ratio`` (the pipeline's vae_scale_factor; 32 without a VAE)."""
        return int((vae_config or {}).get("spatial_compression_ratio") or 32)

    @classmethod
    def flow_geometry(cls, vae_scale, component):
        """Native: 64·s (the pipeline's default_sample_size); tokens: latent patches (no μ: static shift)."""
        patch = (component("transformer") or {}).get("patch_size") or (1, 1)
        return 64 * vae_scale, vae_scale * int(patch[-1])

    @classmethod
    def flow_timestep_kwargs(cls, config, num_inference_steps, image_seq_len):
        """The pipeline's ``sigmas = linspace(1, 0, N + 1)[:-1]`` and no ``mu``."""
        if config.get("use_dynamic_shifting", False):
            raise UserError(
                "model.path: HunyuanImagePipeline passes sigmas without mu, so a scheduler with use_dynamic_shifting "
                "cannot run in it (its own __call__ fails); use a static-shift scheduler config"
            )
        n = int(num_inference_steps)
        return {"sigmas": np.linspace(1.0, 0.0, n + 1)[:-1]}

    def _patch(self) -> int:
        return int(self.denoiser.config.patch_size[-1])

    def native_size(self):
        s = int(self.pipe.default_sample_size) * self.model.vae_scale
        return s, s

    def size_multiple(self) -> int:
        return self.model.vae_scale * self._patch()  # other sizes: the pipeline floors them (a smaller image)

    def token_step(self) -> int:
        return self.model.vae_scale * self._patch()

    def initial_latents(self, x, init_noise_sigma):
        return x  # the pipeline does not scale its noise

    # ------------------------------------------------------------------ guidance
    @property
    def distilled(self) -> bool:
        return bool(self.denoiser.config.guidance_embeds)

    def _guiders(self, guidance: float) -> dict[bool, object]:
        """Fresh guiders {has glyph text: guider} as ``__call__`` picks them, the base model's with
        guidance_scale = ``guidance``."""
        from diffusers import AdaptiveProjectedMixGuidance

        pipe = self.pipe
        with _quiet():
            plain = pipe.guider if pipe.guider is not None else AdaptiveProjectedMixGuidance(enabled=False)
            ocr = pipe.ocr_guider if pipe.ocr_guider is not None else plain
            over = {} if self.distilled else {"guidance_scale": float(guidance)}
            return {False: plain.new(**over), True: ocr.new(**over)}

    def uses_cfg(self, guidance: float) -> bool:
        """Whether a guider asks for an uncond prediction (its own rule: enabled and a scale ≠ 1)."""
        pipe = self.pipe
        if not self.distilled and pipe.guider is None and pipe.ocr_guider is None and guidance != 1:
            raise UserError(
                f"sampler.guidance_scale={guidance}: this HunyuanImagePipeline has no guider component and no "
                "guidance embedding, so its __call__ applies no guidance at all; set sampler.guidance_scale=1"
            )
        return any(g.num_conditions > 1 for g in self._guiders(guidance).values())

    def plain_guidance(self, guidance: float) -> float:
        return guidance if self.distilled else 1.0

    # ------------------------------------------------------------------ conditioning
    def encode(self, prompts, cfg, guidance, height, width) -> dict:
        pipe, device, dtype = self.pipe, self.model.device, self.denoiser.dtype
        n = len(prompts)

        def enc(texts):
            pe, pm, pe2, pm2 = pipe.encode_prompt(prompt=texts, device=device, batch_size=n, num_images_per_prompt=1)
            return pe.to(dtype), pm, pe2.to(dtype), pm2

        out = enc(prompts)
        if cfg:  # rows [uncond; cond]; the pipeline's negative prompt defaults to "" per sample
            out = tuple(torch.cat([u, c]) for u, c in zip(enc([""] * n), out))
        kwargs = dict(zip(COND_KEYS, out))
        rows = out[0].shape[0]
        kwargs["guidance"] = (
            torch.full((rows,), float(guidance), dtype=dtype, device=device) * 1000.0 if self.distilled else None
        )
        return kwargs

    # ------------------------------------------------------------------ the denoiser
    def _step(self, sampler, where: str) -> int:
        """The pipeline's loop index i: the solver's step index (None before its first step)."""
        if sampler is None:
            raise UserError(
                f"HunyuanImagePipeline: {where} needs the solver's step index, which only the sampling loop has; "
                "this denoiser call is outside it (mode.latent's inversion and ood reconstructions): leave those "
                "out of mode.latent.parts for this model"
            )
        i = getattr(sampler, "step_index", None)
        return 0 if i is None else int(i)

    def denoise(self, x, t, cond, sampler):
        kwargs = dict(cond.kwargs)
        if self.denoiser.config.use_meanflow:  # timestep_r: the next timestep, 0 after the last
            i = self._step(sampler, "a MeanFlow transformer's timestep_r")
            ts = sampler.timesteps
            r = ts[i + 1] if i + 1 < len(ts) else torch.tensor([0.0], device=x.device)
            kwargs["timestep_r"] = torch.as_tensor(r, device=x.device)
        if not cond.cfg:
            return self.forward(x, torch.as_tensor(t, device=x.device), kwargs)
        i = self._step(sampler, "the stateful HunyuanImage guider")
        if i == 0 or "guiders" not in cond.extra:  # fresh guider state for every sampling run
            cond.extra["guiders"] = self._guiders(cond.guidance)
        out = self.forward(torch.cat([x, x]), torch.as_tensor(t, device=x.device), kwargs)
        uncond, c = out.chunk(2)
        glyph = ~(cond.kwargs["encoder_hidden_states_2"].chunk(2)[1] == 0).flatten(1).all(dim=1)
        pred = torch.empty_like(c)
        for has_glyph, guider in cond.extra["guiders"].items():
            rows = (glyph == has_glyph).nonzero().flatten()
            if len(rows):
                pred[rows] = self._guide(guider, i, len(sampler.timesteps), t, c[rows], uncond[rows])
        return pred

    def _guide(self, guider, i: int, steps: int, t, cond_out, uncond_out):
        """One step of the pipeline's guider on precomputed predictions: its own state update, batch preparation
        (momentum reset at step 0; one or two predictions) and combination."""
        guider.set_state(step=i, num_inference_steps=steps, timestep=t)
        batches = guider.prepare_inputs({"noise_pred": (cond_out, uncond_out)})
        for _ in batches:  # what the pipeline does around each of its denoiser calls
            guider.prepare_models(self.denoiser)
            guider.cleanup_models(self.denoiser)
        return guider(batches)[0]

    def forward(self, x, t, kwargs):
        kwargs = dict(kwargs)
        r = kwargs.pop("timestep_r", None)
        if self.denoiser.config.use_meanflow and r is None:
            self._step(None, "a MeanFlow transformer's timestep_r")
        tb = batched(t, x).to(x.dtype)  # the pipeline casts its timesteps to the latents' dtype
        r = batched(r, x).to(x.dtype) if r is not None else None
        return self.denoiser(hidden_states=x, timestep=tb, timestep_r=r, return_dict=False, **kwargs)[0]

    def latent_part_refusal(self, part):
        """MeanFlow transformers need the solver's next timestep on every call; the latent mode's inversion and OOD
        reconstructions call the denoiser outside the sampling loop, where there is none."""
        if part in ("inversion", "ood") and self.denoiser.config.use_meanflow:
            return (
                "a MeanFlow transformer (use_meanflow) needs the solver's next timestep, which its denoiser calls lack"
            )
        return None

    def prediction(self, out):
        return out  # velocity, no learned σ

    # ------------------------------------------------------------------ attention
    def attention_layout(self, height, width) -> AttentionLayout:
        """Joint attention [image; text] in the double- and single-stream blocks; the maps' segment is the Qwen2.5-VL
        tokens (0, ``tokenizer_max_length``) of the text, tokenized in the pipeline's chat template with its first
        ``prompt_template_encode_start_idx`` tokens dropped (module docstring)."""
        pipe = self.pipe
        _, h, w = self.latent_shape(height, width)
        ph, pw = (int(p) for p in self.denoiser.config.patch_size[-2:])
        layers = tuple(
            k
            for k in self.denoiser.attn_processors
            if re.fullmatch(r"(single_)?transformer_blocks\.\d+\.attn\.processor", k)
        )
        n = int(pipe.tokenizer_max_length)
        template, drop = pipe.prompt_template_encode, int(pipe.prompt_template_encode_start_idx)
        glyph_stream = getattr(self.denoiser, "context_embedder_2", None) is not None

        def tokenize(prompt: str) -> PromptTokens:
            from diffusers.pipelines.hunyuan_image.pipeline_hunyuanimage import extract_glyph_text

            if glyph_stream and extract_glyph_text(prompt) is not None:
                raise UserError(
                    f"mode=[attention]: {type(pipe).__name__}: the prompt {prompt!r} has quoted (glyph) text, and "
                    f"{type(self.denoiser).__name__} puts its ByT5 tokens before the Qwen2.5-VL tokens (a per-sample "
                    "offset the attention maps' fixed token segment cannot express); drop the quotes"
                )
            return prompt_tokens(pipe.tokenizer, prompt, n, template=template, drop=drop)

        # the concepts' text-stream input depends on the call's timestep (the token refiner is timestep-conditioned):
        # refine_concepts at the first block of each denoiser call
        blocks = tuple(k.removesuffix(".attn.processor") for k in layers if k.startswith("transformer_blocks."))
        concepts = ConceptStream(
            blocks,
            hunyuanimage_concept_step,
            prepare=lambda denoiser, c, call: refine_concepts(denoiser, c, call["timestep"]),
        )
        return AttentionLayout(
            "hunyuanimage",
            layers,
            (h // ph, w // pw),
            pipe.tokenizer,
            n,
            (0, n),
            True,
            "Qwen2.5-VL",
            tokenize,
            concepts,
        )

    def concept_tokens(self, words: list[str]) -> torch.Tensor:
        """(C, D_text): each concept word encoded alone by the pipeline's own ``encode_prompt`` (its chat template,
        the template's first tokens dropped), the mean over the word's Qwen2.5-VL tokens. These are the refiner's
        *inputs*: the double-stream blocks' text input is :func:`refine_concepts` of them at each call's timestep."""
        h, w = self.native_size()
        embeds = self.encode(words, False, 1.0, h, w)["encoder_hidden_states"]
        return self._concept_segment_mean(words, embeds, self.attention_layout(h, w))


def refine_concepts(transformer, tokens: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """Concept tokens (n, C, D_text) -> the double-stream blocks' text input at this denoiser call: each concept is
    a one-token caption through the transformer's own ``context_embedder`` (``HunyuanImageTokenRefiner``, diffusers
    0.42: pooled text = the token itself, ``proj_in``, the refiner blocks' self-attention over that one token). The
    refiner is conditioned on the call's ``timestep`` (n,), so the result differs per denoiser call."""
    n, C, D = tokens.shape
    flat = tokens.reshape(n * C, 1, D)
    mask = torch.ones((n * C, 1), dtype=torch.bool, device=tokens.device)
    refined = transformer.context_embedder(flat, timestep.repeat_interleave(C), mask)
    return refined.reshape(n, C, -1)


def hunyuanimage_concept_step(block, c, key, value, kwargs):
    """HunyuanImage's double-stream ``HunyuanImageTransformerBlock`` (diffusers 0.42) text-stream path applied to
    concept tokens ``c``: ``norm1_context`` (AdaLN-Zero by ``temb``), the added projections ``add_*_proj`` and their
    q/k norms, no rotary embedding (the processor rotates the image tokens only), attention of the concept queries
    over [image keys; concept keys] (no image key is masked), ``to_add_out``, gate, ``norm2_context`` modulation and
    ``ff_context``."""
    attn = block.attn
    norm_c, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(c, emb=kwargs["temb"])
    cq, ck, cv = (p(norm_c).unflatten(2, (attn.heads, -1)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    if attn.norm_added_q is not None:
        cq = attn.norm_added_q(cq)
    if attn.norm_added_k is not None:
        ck = attn.norm_added_k(ck)
    cq, ck, cv = (t.transpose(1, 2) for t in (cq, ck, cv))
    out = torch.nn.functional.scaled_dot_product_attention(cq, torch.cat([key, ck], 2), torch.cat([value, cv], 2))
    out = out.transpose(1, 2).flatten(2, 3).to(cq.dtype)
    c = c + attn.to_add_out(out) * gate_msa.unsqueeze(1)
    norm_c = block.norm2_context(c) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return c + gate_mlp.unsqueeze(1) * block.ff_context(norm_c), out


@register_recorder("hunyuanimage")
class HunyuanImageJointRecorder:
    """HunyuanImage's ``HunyuanImageAttnProcessor`` (diffusers 0.42), step for step, recording the joint softmax's
    image rows. Order [image; text] in both kinds of block: double-stream blocks project the text with ``add_*_proj``
    (after the image's RoPE), single-stream blocks hand image and text apart and the processor concatenates them (RoPE
    on the image part only). ``key_mask``: the model's boolean mask (n, 1, 1, L) — image and valid text keys."""

    def __init__(self, cap, name: str):
        self.cap, self.name = cap, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        n_image = hidden_states.shape[1]
        single = attn.add_q_proj is None and encoder_hidden_states is not None
        if single:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        # 1-2. projections, heads, q/k norms
        query, key, value = (p(hidden_states).unflatten(2, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # 3. RoPE on the image tokens
        if image_rotary_emb is not None:
            if single:
                n_text = encoder_hidden_states.shape[1]
                query, key = (
                    torch.cat([apply_rotary_emb(t[:, :-n_text], image_rotary_emb, sequence_dim=1), t[:, -n_text:]], 1)
                    for t in (query, key)
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        # 4. the text stream of a double-stream block, appended after the image tokens
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            eq, ek, ev = (
                p(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = torch.cat([query, eq], 1), torch.cat([key, ek], 1), torch.cat([value, ev], 1)
        if encoder_hidden_states is not None:
            n, L = query.shape[:2]
            key_mask = None
            if attention_mask is not None:
                if (
                    attention_mask.dtype != torch.bool
                    or attention_mask.shape[-1] != L
                    or attention_mask[0].numel() != L
                ):
                    raise ValueError(
                        f"Expected HunyuanImage's boolean (n, 1, 1, {L}) key mask in {self.name}, got "
                        f"{attention_mask.dtype} {tuple(attention_mask.shape)}"
                    )
                key_mask = attention_mask.reshape(-1, L).expand(n, L)
            self.cap._record_joint(
                self.name,
                query.transpose(1, 2),
                key.transpose(1, 2),
                image=(0, n_image),
                text=(n_image, L),
                key_mask=key_mask,
            )
        # 5. attention: the stock dispatch on the stock Q, K, V
        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if not single and encoder_hidden_states is not None and self.cap.wants_output and self.cap.recording:
            self.cap._record_image_output(
                self.name,
                key[:, :n_image].transpose(1, 2),
                value[:, :n_image].transpose(1, 2),
                hidden_states[:, :n_image],
            )
        # 6. output projections
        if encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
            hidden_states, encoder_hidden_states = hidden_states[:, :-n_text], hidden_states[:, -n_text:]
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states
