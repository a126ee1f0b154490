"""``shapes_sd``: a text encoder and a latent UNet2DConditionModel trained with ε-prediction on SD 1.x's noise schedule,
on the latents of the frozen shapes VAE; the stock ``StableDiffusionPipeline`` (DDIM) samples from the EMA weights."""

from __future__ import annotations

import copy
import pathlib

import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

from pipeline.zoo.build import build_text_encoder, build_unet, sd_scheduler_config
from pipeline.zoo.loop import Epsilon, Trainee, train_loop
from pipeline.zoo.snapshots import MetricFn, Snapshots, save_pipeline
from pipeline.zoo.trainset import caption_latents, frozen_vae

__all__ = ["sd_pipeline", "train_sd"]


def sd_pipeline(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**sd_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_sd(cfg, out: pathlib.Path, device: torch.device, log_metric: MetricFn) -> pathlib.Path:
    c = cfg.sd
    torch.manual_seed(cfg.seed)  # the models' initial weights
    # 1. latents and token ids of the training set, once
    vae, _ = frozen_vae(c, out, device, "sd")
    data, tokenizer = caption_latents(cfg, c, vae, out / "shapes_sd" / "tokenizer", device, "sd")
    # 2. models; the sampling copy holds the EMA weights and shares the frozen VAE
    text_encoder = build_text_encoder(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, c.max_length, **c.text_encoder
    ).to(device)
    unet = build_unet(data.x0.shape[-1], data.x0.shape[1], c.text_encoder.hidden_size, **c.unet).to(device)
    noise_sched = DDPMScheduler(
        **{
            k: v
            for k, v in sd_scheduler_config().items()
            if k not in ("steps_offset", "set_alpha_to_one", "timestep_spacing")
        }
    )
    ema_te, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    pipe = sd_pipeline(vae, ema_te, tokenizer, ema_unet)
    if data.grounding is not None:
        data.grounding.install(unet)  # after the copy: the sampling copy keeps the stock processors

    def predict(z_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return unet(z_t, t, text_encoder(ids).last_hidden_state).sample

    # 3. train, with snapshots of the EMA weights; the final model is the last one
    trainee = Trainee(unet, [text_encoder], predict, sampling=[ema_unet, ema_te])
    minutes = train_loop(
        "sd",
        c,
        cfg.seed,
        data,
        trainee,
        Epsilon(noise_sched, c.snr_gamma or 0.0, device),
        device,
        log_metric,
        Snapshots(cfg, c, out, device, pipe, "sd", log_metric),
    )
    log_metric("sd/train_minutes", minutes, c.steps)
    path = out / "shapes_sd"
    save_pipeline(pipe, path)
    return path
