"""A tiny ChromaPipeline (diffusers' tests/pipelines/chroma dummy components, offline tokenizer and T5)."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny import Tiny, _t5_encoder, _t5_tokenizer, _vae


def tiny_chroma(path: Path) -> Path:
    """Chroma at 32x32: x2 VAE -> 16x16x4 latents, packed 2x2 -> 8x8 tokens of 16 channels; 1 double + 1 single
    block (2 heads of 16), a 1-layer approximator, a 1-layer T5 (d_model 32) on the offline T5 tokenizer; FlowMatch
    Euler with dynamic shifting (as Flux-dev / Chroma1-HD); no IP-Adapter image encoder."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    tok = _t5_tokenizer()
    text = _t5_encoder(tok)
    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text.config.d_model,
        axes_dims_rope=(4, 4, 8),
        approximator_hidden_dim=32,
        approximator_layers=1,
        approximator_num_channels=16,
    )
    torch.manual_seed(0)
    vae = _vae(use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = ChromaPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# guidance_scale > 1: real CFG against the pipeline's default negative prompt "" (the project's convention)
TINY = {"chroma": Tiny(tiny_chroma, size=32)}
