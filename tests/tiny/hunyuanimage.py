"""Tiny HunyuanImage-2.1 pipelines (``HunyuanImagePipeline``): the guided base model (APG/CFG guiders) and the
guidance-distilled MeanFlow variant, after diffusers' tests/pipelines/hunyuan_image_21 dummy components, built
offline (a byte-level Qwen2 tokenizer with no merges: one token per byte; ByT5 needs no vocabulary files)."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny import Tiny

GUIDANCE = 4.0  # tests/test_families.py's: the guider's guidance_scale is config, not a __call__ argument


def _qwen_tokenizer():
    """Qwen2Tokenizer over the 256 byte-level characters plus Qwen's chat specials (pad = ``<|endoftext|>``): the
    pipeline's prompt template tokenizes, one token per byte, into > drop_idx (34) tokens, so prompts survive."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab.update({s: len(vocab) + k for k, s in enumerate(specials)})
    return Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=specials[1:])


def _qwen_encoder(tok):
    """A 3-layer Qwen2.5-VL (hidden 32): the pipeline reads hidden_states[-3], the first layer's output."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": len(tok),
            "bos_token_id": None,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32},
        hidden_size=16,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _byt5_encoder(tok):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            d_model=32,
            d_kv=4,
            d_ff=16,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            vocab_size=len(tok),  # ByT5: 3 specials + 256 bytes + 125 extra ids
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu_new",
            is_encoder_decoder=False,
            use_cache=False,
            tie_word_embeddings=False,
        )
    )


def tiny_hunyuanimage(path: Path, distilled: bool = False, text_embed_2_dim: int | None = None) -> Path:
    """HunyuanImage at 16x16: x4 VAE (4 levels of 32 channels) -> 4x4x4 latents, patch 1; 1 dual + 1 single block
    (2 heads of 8, MLP ratio 1); Qwen2.5-VL text (1000 tokens after the template's 34) and ByT5 glyph text (128
    tokens, encoded whenever a prompt has quoted text); FlowMatch Euler, static shift 7.

    ``text_embed_2_dim``: the transformer's ByT5 input width (32 = the ByT5 here; None: no glyph projection, the
    default — its fixed 2048-wide MLP would be most of the tests' time; the pipeline still encodes glyph text and
    picks the OCR guider by it).

    Base (``distilled=False``): ``guider`` / ``ocr_guider`` are AdaptiveProjectedMixGuidance with guidance_scale
    = the tests' GUIDANCE; the guider projects (APG) from step 1 (step 0 is CFG, filling the momentum buffer) with
    a norm threshold small enough to clip, the OCR guider from step 2 with another APG scale: every branch of the
    guider runs in 2-3 steps. ``distilled=True``: a guidance-embedding MeanFlow transformer (``timestep_r``), no
    guiders."""
    from diffusers import (
        AdaptiveProjectedMixGuidance,
        AutoencoderKLHunyuanImage,
        FlowMatchEulerDiscreteScheduler,
        HunyuanImagePipeline,
        HunyuanImageTransformer2DModel,
    )
    from transformers import ByT5Tokenizer

    torch.manual_seed(0)
    transformer = HunyuanImageTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=1.0,
        patch_size=(1, 1),
        guidance_embeds=distilled,
        use_meanflow=distilled,
        text_embed_dim=32,
        text_embed_2_dim=text_embed_2_dim,
        rope_axes_dim=(4, 4),
    )
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanImage(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32, 32, 32),  # 4 levels but x4: the scale is the ratio, not 2^(levels - 1)
        layers_per_block=1,
        scaling_factor=0.476986,
        spatial_compression_ratio=4,
        sample_size=128,
    )
    guiders = {"guider": None, "ocr_guider": None}
    if not distilled:
        guiders = {
            "guider": AdaptiveProjectedMixGuidance(
                guidance_scale=GUIDANCE,
                adaptive_projected_guidance_start_step=0,
                adaptive_projected_guidance_rescale=0.002,
            ),
            "ocr_guider": AdaptiveProjectedMixGuidance(
                guidance_scale=GUIDANCE, adaptive_projected_guidance_start_step=1, adaptive_projected_guidance_scale=6.0
            ),
        }
    torch.manual_seed(0)
    tok = _qwen_tokenizer()
    text = _qwen_encoder(tok)
    torch.manual_seed(0)
    tok_2 = ByT5Tokenizer()
    text_2 = _byt5_encoder(tok_2)
    pipe = HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        text_encoder_2=text_2,
        tokenizer_2=tok_2,
        transformer=transformer,
        **guiders,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


TINY = {
    # no __call__ keyword sets the base model's guidance: pipe() uses its saved guider (guidance_scale = GUIDANCE)
    "hunyuanimage": Tiny(tiny_hunyuanimage, size=16, call=lambda g: {"negative_prompt": ""}),
    "hunyuanimage_distilled": Tiny(
        lambda path: tiny_hunyuanimage(path, distilled=True), size=16, call=lambda g: {"distilled_guidance_scale": g}
    ),
}
