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
i.e. the list ``encode_prompt`` returns. Attention maps are the next issue (mode not declared).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from pipeline.models.families.base import Family, FamilyDriver, batched, call_default, register
from pipeline.models.flow_shift import shift_mu, uses_dynamic_shift

__all__ = ["ZImage"]

DEFAULT_SIZE = 1024  # ZImagePipeline.__call__: height = height or 1024 (pixels, whatever the VAE)


@register("ZImagePipeline")
class ZImage(FamilyDriver):
    family = Family("zimage", "transformer", "text", "latent", flow=True, modes=("metrics", "schedule", "latent"))
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
