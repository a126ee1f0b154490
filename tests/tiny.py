"""Tiny random-weight pipelines built from configs, saved like hub checkpoints (structural tests only)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_ddpm(path: Path, size: int = 32) -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(path)
    return path


def tiny_sd(path: Path, sample_size: int | tuple[int, int] = 8, words=None) -> Path:
    """A StableDiffusionPipeline: 2-level VAE (x2 down), 1-layer CLIP text encoder, UNet with cross-attention
    at two resolutions. ``sample_size`` is the latent size (an (h, w) tuple for non-square)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline.data.shapes import vocabulary
    from pipeline.zoo.build import sd_scheduler_config
    from pipeline.zoo.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(words or [*vocabulary(), "car", "house", "parked", "next", "to"], path / "_tok", model_max_length=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    unet = UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler.from_config(sd_scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def tiny_sdxl(path: Path) -> Path:
    """A StableDiffusionXLPipeline: two text encoders whose hidden states are concatenated (cross-attention dim
    32 + 32), text-time added conditioning, linear projections, 2 transformer layers in the second block."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pipeline.data.shapes import vocabulary
    from pipeline.zoo.build import sd_scheduler_config
    from pipeline.zoo.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer([*vocabulary(), "car", "house", "parked", "next", "to"], path / "_tok", model_max_length=16)
    text_cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=16, projection_dim=32, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, hidden_act="gelu")
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=64,
        norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)), tokenizer_2=tok, unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(sd_scheduler_config()))
    pipe.save_pretrained(path)
    return path


def tiny_models(root: Path) -> dict[str, Path]:
    """Tiny SD and DDPM pipelines plus a random-weight ShapesNet (feature space / judge) under ``root``."""
    from pipeline.zoo.shapes_net import ShapesNet

    torch.manual_seed(0)
    ShapesNet().save_pretrained(root / "net")
    return {"ddpm": tiny_ddpm(root / "ddpm"), "sd": tiny_sd(root / "sd"), "net": root / "net"}
