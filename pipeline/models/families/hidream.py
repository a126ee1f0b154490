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
``z / scaling_factor + shift_factor``. Modes: metrics, schedule, latent; attention is not implemented yet (refused).
"""

from __future__ import annotations

import torch

from pipeline.errors import UserError
from pipeline.models.families.base import Family, FamilyDriver, batched, call_default, register
from pipeline.models.flow_shift import uses_dynamic_shift

__all__ = ["HiDreamImage"]

DEFAULT_SAMPLE_SIZE = 128  # HiDreamImagePipeline.default_sample_size (latent pixels)


@register("HiDreamImagePipeline")
class HiDreamImage(FamilyDriver):
    family = Family("hidream", "transformer", "text", "latent", flow=True, modes=("metrics", "schedule", "latent"))
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

    def attention_layout(self, height, width):
        raise UserError(
            f"mode=[attention]: {type(self.pipe).__name__} (hidream) is not supported yet: its attention over "
            "[image; T5; Llama] has no recorder"
        )
