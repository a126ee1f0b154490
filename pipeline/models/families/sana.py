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
``use_resolution_binning=False``; sizes are multiples of 32 (the pipeline's ``check_inputs``). Attention maps are
not declared (refused up front).
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

from pipeline.models.families.base import Family, FamilyDriver, batched, call_default, register

__all__ = ["Sana"]


@register("SanaPipeline")
class Sana(FamilyDriver):
    family = Family("sana", "transformer", "text", "latent", flow=True, modes=("metrics", "schedule", "latent"))

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
