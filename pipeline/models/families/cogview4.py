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

Refused up front (not declared): attention maps (the next issue), and latent mode — its flow ODE (inversion,
reconstruction) queries the model at timestep 1000·σ, while CogView4 is conditioned on the unshifted timestep T·u of
σ = shift(u), so the mode's paths would not ask the model what its own pipeline asks it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from pipeline.errors import UserError
from pipeline.models.families.base import Family, FamilyDriver, batched, call_default, register
from pipeline.models.flow_shift import uses_dynamic_shift

__all__ = ["CogView4"]


def _unshifted_timesteps(num_train_timesteps: int, steps: int) -> np.ndarray:
    """The pipeline's ``np.linspace(T, 1.0, N).astype(np.int64).astype(np.float32)``."""
    return np.linspace(num_train_timesteps, 1.0, steps).astype(np.int64).astype(np.float32)


@register("CogView4Pipeline")
class CogView4(FamilyDriver):
    family = Family("cogview4", "transformer", "text", "latent", flow=True, modes=("metrics", "schedule"))
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
