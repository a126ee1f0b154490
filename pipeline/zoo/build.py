"""Builders for the zoo's models, from plain keyword arguments (the ``conf/train.yaml`` blocks).

Every model is a stock diffusers / transformers class, so the shipped directories load with the
libraries' own ``from_pretrained`` exactly like hub checkpoints.
"""

from __future__ import annotations

from typing import Sequence


def sd_scheduler_config() -> dict:
    """Stable Diffusion 1.x's noise schedule and DDIM/PNDM-compatible options."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
        timestep_spacing="leading",
    )


def build_vae(
    size: int = 32,
    block_out_channels: Sequence[int] = (32, 64, 64),
    latent_channels: int = 4,
    layers_per_block: int = 1,
    norm_num_groups: int = 16,
):
    """AutoencoderKL; each block after the first halves the resolution (3 blocks: 32x32 -> 8x8)."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=size,
    )


def build_text_encoder(
    vocab_size: int,
    bos_token_id: int,
    eos_token_id: int,
    max_length: int = 20,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate_size: int = 128,
):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        projection_dim=hidden_size,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,  # CLIP pads with <|endoftext|>
    )
    return CLIPTextModel(config)


def build_unet(
    latent_size: int = 8,
    latent_channels: int = 4,
    cross_attention_dim: int = 64,
    block_out_channels: Sequence[int] = (64, 128, 128),
    cross_attn_levels: int = 2,
    layers_per_block: int = 1,
    heads: int = 4,
    norm_num_groups: int = 16,
):
    """UNet2DConditionModel with cross-attention at the ``cross_attn_levels`` finest resolutions (and the mid block)."""
    from diffusers import UNet2DConditionModel

    n = len(block_out_channels)
    if not 1 <= cross_attn_levels <= n:
        raise ValueError(f"Expected 1 <= cross_attn_levels <= {n} (len(block_out_channels)), got {cross_attn_levels}")
    down = tuple("CrossAttnDownBlock2D" if i < cross_attn_levels else "DownBlock2D" for i in range(n))
    up = tuple(reversed(["CrossAttnUpBlock2D" if i < cross_attn_levels else "UpBlock2D" for i in range(n)]))
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=norm_num_groups,
    )


def build_ddpm_unet(
    size: int = 32,
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 1,
    attention: bool = False,
    norm_num_groups: int = 16,
):
    """Unconditional pixel-space UNet2DModel (optionally with self-attention at the coarsest level)."""
    from diffusers import UNet2DModel

    n = len(block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
    )


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())
