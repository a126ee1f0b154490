"""Unconditional UNet2DModel families, drawing only their native size.

* ``ddpm``: ``DDPMPipeline`` / ``DDIMPipeline``: pixel space, images in [-1, 1];
* ``ldm``: ``LDMPipeline``: latents of a VQ-VAE (``vqvae``, ``scaling_factor``).
"""

from __future__ import annotations

from pipeline.models.families.base import UNTEXTED_MODES, Family, FamilyDriver, register

__all__ = ["DDPM", "LDM"]


@register("DDPMPipeline", "DDIMPipeline")
class DDPM(FamilyDriver):
    family = Family("ddpm", "unet", "none", "pixel", modes=UNTEXTED_MODES)
    fixed_size = True

    def forward(self, x, t, kwargs):
        return self.denoiser(x, t).sample


@register("LDMPipeline")
class LDM(DDPM):
    family = Family("ldm", "unet", "none", "latent", vae_attr="vqvae", modes=UNTEXTED_MODES)
