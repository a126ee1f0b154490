"""A tiny Lumina2Pipeline (diffusers 0.42), built offline after the dummy components of diffusers'
tests/pipelines/lumina2/test_pipeline_lumina2.py; the Gemma tokenizer, which those take from the hub, is a
character-level one built here, and the text encoder is a Gemma2Model as the Lumina-Image-2.0 release ships."""

from __future__ import annotations

import string
from pathlib import Path

import torch

from tiny import Tiny, _vae

__all__ = ["TINY", "tiny_lumina2"]


def _gemma_tokenizer():
    """A GemmaTokenizer (BPE without merges) whose pieces are single characters, so that every prompt — the
    pipeline's system prompt with ``<Prompt Start>`` included — tokenizes without ``<unk>``; ``<bos>`` first."""
    from transformers import GemmaTokenizer

    vocab = {t: i for i, t in enumerate(("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\u2581", "\n"))}
    for c in string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True)


def tiny_lumina2(path: Path) -> Path:
    """Lumina 2 at its native 32x32: an x8 VAE (4 levels: Lumina2Pipeline hard-codes vae_scale_factor 8) with
    Flux's scaling/shift factors -> 4x4x4 latents, patch 2 -> 4 image tokens; a 2-layer Lumina2 DiT (hidden 16,
    2 heads) on the second-to-last hidden states of a 1-layer Gemma2 (hidden 16); FlowMatch Euler with a static
    shift 6 (the pipeline's μ is then ignored)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tok = _gemma_tokenizer()
    torch.manual_seed(0)
    transformer = Lumina2Transformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=4,
        hidden_size=16,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=2,
        multiple_of=16,
        axes_dim_rope=(4, 2, 2),
        axes_lens=(300, 32, 32),
        cap_feat_dim=16,
    )
    with torch.no_grad():  # sharper attention: the prompt's few tokens, against ~175 shared system-prompt tokens,
        for p in transformer.parameters():  # then visibly change the image (max 10/255 rather than 2/255)
            if p.dim() >= 2:
                p.mul_(4.0)
    torch.manual_seed(0)
    vae = _vae(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        sample_size=32,
    )
    torch.manual_seed(0)
    text = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tok),
            hidden_size=16,
            head_dim=8,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            attn_implementation="eager",
        )
    ).eval()
    pipe = Lumina2Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0),
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# sampler.guidance_scale is Lumina2Pipeline's guidance_scale (CFG u + g (c − u) for g > 1, then its default
# cfg_normalization); the negative prompt is the project's "" (the pipeline's default too)
TINY = {"lumina2": Tiny(tiny_lumina2, size=32, call=lambda g: {"guidance_scale": g, "negative_prompt": ""})}
