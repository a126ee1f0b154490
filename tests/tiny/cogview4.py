"""A tiny CogView4Pipeline (diffusers 0.42), built offline: its dummy components from diffusers' own
tests/pipelines/cogview4/test_cogview4.py, with the hub's GLM-4 tokenizer replaced by a character-level
PreTrainedTokenizerFast shaped like it (``[gMASK]<sop>`` prefix, ``<|endoftext|>`` pad, left padding) and a GlmModel
text encoder (the pipeline's own type), and the shared tiny KL VAE (x2)."""

from __future__ import annotations

import string
from pathlib import Path

import torch

from tiny import Tiny, _vae

__all__ = ["TINY", "tiny_cogview4", "glm_tokenizer"]


def glm_tokenizer():
    """Single characters (spaces included) as tokens; every encoding starts ``[gMASK]<sop>`` as GLM-4's does."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "[gMASK]", "<sop>"]
    chars = dict.fromkeys(" \n" + string.ascii_letters + string.digits + string.punctuation)
    vocab = {t: i for i, t in enumerate([*specials, *chars])}
    tok = Tokenizer(models.BPE(vocab, merges=[], unk_token="<|endoftext|>"))  # no merges: one token a character
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", special_tokens=[("[gMASK]", 1), ("<sop>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|endoftext|>", padding_side="left"
    )


def tiny_cogview4(path: Path) -> Path:
    """CogView4Transformer2DModel (2 layers, patch 2, 4 channels) on the tiny x2 KL VAE (32 px <-> 16x16 latents),
    a 2-layer GlmModel (hidden 32) and CogView4's FlowMatchEuler (dynamic linear shift, base 0.25, max 0.75)."""
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    tok = glm_tokenizer()
    torch.manual_seed(0)
    text = GlmModel(
        GlmConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=8,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            pad_token_id=tok.pad_token_id,
        )
    )
    torch.manual_seed(0)
    transformer = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=4,
        out_channels=4,
        text_embed_dim=32,
        time_embed_dim=8,
        condition_dim=4,
        sample_size=16,
    )
    torch.manual_seed(0)
    vae = _vae()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True, time_shift_type="linear"
    )
    pipe = CogView4Pipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


TINY = {"cogview4": Tiny(tiny_cogview4, size=32)}  # the pipeline's check_inputs: multiples of 16
