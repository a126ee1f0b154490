"""A tiny HiDreamImagePipeline (diffusers' tests/pipelines/hidream_image dummy components, all built offline)."""

from __future__ import annotations

import string
from pathlib import Path

import torch

from tiny import Tiny, _clip_text_config, _clip_tokenizer, _t5_encoder, _t5_tokenizer, _vae, _words

MAX_SEQUENCE_LENGTH = 128  # HiDreamImagePipeline.__call__'s default: every text encoder is padded to it


def _llama_tokenizer():
    """An offline Llama BPE tokenizer: single characters plus merges that make each caption word (``"▁red"``) one
    token; BOS added as Llama 3's does (so the empty prompt is not all padding), EOS doubles as the pad token (the
    pipeline sets that itself)."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in ["\u2581", *string.ascii_letters, *string.digits, *string.punctuation]:
        vocab.setdefault(c, len(vocab))
    merges: list[tuple[str, str]] = []
    for w in dict.fromkeys(_words()):
        piece = "\u2581"
        for c in w:
            if (piece, c) not in merges:
                merges.append((piece, c))
            piece += c
            vocab.setdefault(piece, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_SEQUENCE_LENGTH, add_bos_token=True)


def tiny_hidream(path: Path) -> Path:
    """HiDream-I1 at its native 128x128 (the pipeline resizes every request to (128·vae_scale)²; a 1-level VAE keeps
    that small): 4-channel 128x128 latents, patch 8 -> 16x16 tokens (max_resolution 128 -> max_seq 256); 1 double +
    1 single MoE block (4 experts, 2 active; 4 heads of 8); two CLIPs (width 16, projection 16 -> pooled 32, 128
    positions: the pipeline pads CLIP to 128), a 1-layer T5 (d_model 32) and a 2-layer Llama (hidden 16, both layers
    fed to the transformer); FlowMatch Euler with a static shift 3 (HiDream-I1 uses static shifts)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel
    from transformers import CLIPTextModelWithProjection, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=8,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=[32, 16],  # [T5 d_model, Llama hidden]
        text_emb_dim=32,  # CLIP-L + CLIP-G projections
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(128, 128),
        llama_layers=(0, 1),
    )
    torch.manual_seed(0)
    vae = _vae(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        mid_block_add_attention=False,  # its attention over 128x128 latent pixels would dominate the test's time
    )
    tok = _clip_tokenizer(path)
    clip_cfg = _clip_text_config(tok, num_hidden_layers=2, hidden_act="gelu")
    clip_cfg.max_position_embeddings = MAX_SEQUENCE_LENGTH
    torch.manual_seed(0)
    text = CLIPTextModelWithProjection(clip_cfg)
    torch.manual_seed(1)
    text_2 = CLIPTextModelWithProjection(clip_cfg)
    torch.manual_seed(0)
    tok_3 = _t5_tokenizer()
    text_3 = _t5_encoder(tok_3)
    tok_4 = _llama_tokenizer()
    torch.manual_seed(0)
    text_4 = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok_4),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=MAX_SEQUENCE_LENGTH,
            bos_token_id=tok_4.bos_token_id,
            eos_token_id=tok_4.eos_token_id,
            pad_token_id=tok_4.eos_token_id,
        )
    )
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        text_encoder_2=text_2,
        tokenizer_2=tok,
        text_encoder_3=text_3,
        tokenizer_3=tok_3,
        text_encoder_4=text_4,
        tokenizer_4=tok_4,
        transformer=transformer,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# size None: the native 128x128 (the only size HiDreamImagePipeline draws); guidance_scale > 1: CFG against ""
TINY = {"hidream": Tiny(tiny_hidream)}
