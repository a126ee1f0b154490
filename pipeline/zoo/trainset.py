"""Training data of the zoo: rendered shapes images, and for the latent text-to-image recipes (``sd``, ``sd3``) the
latents of the frozen shapes VAE with the caption token ids, computed once."""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from diffusers import AutoencoderKL

from pipeline.data.shapes import ShapesDataset, vocabulary
from pipeline.zoo.grounding import TokenGrounding
from pipeline.zoo.loop import TrainSet
from pipeline.zoo.snapshots import find_component
from pipeline.zoo.tokenizer import build_tokenizer

__all__ = ["images", "frozen_vae", "caption_latents"]


def images(data_cfg, split: str, n: int, seed_offset: int = 0) -> tuple[torch.Tensor, list[str], list]:
    """n rendered images of a split as float (N, 3, H, W) in [-1, 1], captions, and objects."""
    ds = ShapesDataset(
        split,
        n,
        seed=data_cfg.seed + seed_offset,
        size=data_cfg.size,
        shapes=data_cfg.shapes,
        colours=data_cfg.colours,
        p_two=data_cfg.p_two,
    )
    samples = list(ds)
    x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, [s.caption for s in samples], [s.objects for s in samples]


def frozen_vae(c, out: pathlib.Path, device: torch.device, name: str) -> tuple[AutoencoderKL, pathlib.Path]:
    """The VAE ``c.vae_path``, else this run's (``<out>/shapes_sd/vae``), else the shipped one; frozen, and its path."""
    vae_path = (
        pathlib.Path(c.vae_path) if c.vae_path else find_component(out, "shapes_sd/vae", "config.json", "shapes_sd")
    )
    if vae_path is None:
        raise FileNotFoundError(
            f"{name}: no VAE at {out / 'shapes_sd/vae'} and none shipped; run components=[vae] first"
        )
    vae = AutoencoderKL.from_pretrained(vae_path, dtype=torch.float32).to(device).eval()
    vae.requires_grad_(False)
    return vae, vae_path


def caption_latents(cfg, c, vae: AutoencoderKL, tokenizer_dir: pathlib.Path, device: torch.device, name: str):
    """(TrainSet, tokenizer): scaled latents of ``c.n_train`` train images and their caption ids (VAE and tokenizer
    are frozen, so both are computed once), the token grounding when ``c.grounding_weight`` is set."""
    tokenizer = build_tokenizer(vocabulary(), tokenizer_dir, c.max_length)
    x, captions, objects = images(cfg.data, "train", c.n_train)
    with torch.no_grad():
        latents = (
            torch.cat([vae.encode(x[i : i + 500].to(device)).latent_dist.mode().cpu() for i in range(0, len(x), 500)])
            * vae.config.scaling_factor
        )
    del x
    grounding = TokenGrounding(tokenizer, captions, objects, tuple(latents.shape[-2:])) if c.grounding_weight else None
    del objects
    print(
        f"{name}: {len(latents)} latents {tuple(latents.shape[1:])}, RMS {latents.pow(2).mean().sqrt():.3f}", flush=True
    )

    def tokens(caps: list[str]) -> torch.Tensor:
        return tokenizer(
            caps, padding="max_length", max_length=c.max_length, truncation=True, return_tensors="pt"
        ).input_ids

    return TrainSet(latents, tokens(captions), tokens([""])[0], grounding), tokenizer
