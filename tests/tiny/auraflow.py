"""A tiny AuraFlowPipeline: a text-to-image class no family file drives, so it runs on the native path (its own
``__call__``, ``generation.path=native_call``)."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny import Tiny, _t5_tokenizer, _vae


def tiny_auraflow(path: Path) -> Path:
    """AuraFlow at 32x32: x2 VAE -> 16x16x4 latents, patch 2 -> 64 tokens; 1 MMDiT + 1 single DiT layer (2 heads of
    8), a 1-layer UMT5 (d_model 32) on the offline T5 tokenizer, FlowMatch Euler (static shift 1.73, as the hub's)."""
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    tok = _t5_tokenizer(model_max_length=16)
    text = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tok),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )
    )
    torch.manual_seed(0)
    transformer = AuraFlowTransformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=64,
    )
    torch.manual_seed(0)
    vae = _vae()
    pipe = AuraFlowPipeline(
        tokenizer=tok,
        text_encoder=text,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.73),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


TINY = {"auraflow": Tiny(tiny_auraflow, size=32)}
