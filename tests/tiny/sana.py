"""A tiny SanaPipeline (diffusers 0.42), built offline: its dummy components from diffusers' own
tests/pipelines/sana/test_sana.py, with the hub tokenizer replaced by a character-level GemmaTokenizer and the
scheduler by what the Sana checkpoints ship (DPM-Solver++ 2M on flow σ's, ``flow_prediction``, ``flow_shift``)."""

from __future__ import annotations

import string
from pathlib import Path

import torch

from tiny import Tiny

__all__ = ["TINY", "tiny_sana", "gemma_tokenizer"]


def gemma_tokenizer():
    """A GemmaTokenizer (BPE, ``<bos>`` first, as Gemma) over single characters — every prompt tokenizes without
    ``<unk>`` — with merges up to whole words (``"▁red"``) for the caption words and those of SanaPipeline's default
    complex-human instruction: about Gemma's token count for it (~250, not ~1100 characters)."""
    import inspect

    from diffusers import SanaPipeline
    from tokenizers import pre_tokenizers
    from transformers import GemmaTokenizer

    from tiny import _words

    vocab = {t: i for i, t in enumerate(("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\u2581", "\n"))}
    for c in string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(c, len(vocab))
    chi = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    words = dict.fromkeys(w.strip(string.punctuation) for w in " ".join([*chi, *_words()]).split())
    merges: list[tuple[str, str]] = []
    for word in ("\u2581" + w for w in words if w):
        for end in range(2, len(word) + 1):  # "▁"+"r" -> "▁r", "▁r"+"e" -> "▁re", "▁re"+"d" -> "▁red"
            if word[:end] not in vocab:
                vocab[word[:end]] = len(vocab)
                merges.append((word[: end - 1], word[end - 1]))
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    # one pre-token per "▁word" (Gemma's own split never fires after its " " -> "▁" normalizer): only the word's own
    # chain of merges applies inside it
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    return tok


def tiny_sana(path: Path) -> Path:
    """SanaTransformer2DModel (1 layer, patch 1, 4 channels) on a 2-level DC-AE (x2: 32 px <-> 16x16 latents,
    scaling_factor 0.41407), a 1-layer Gemma2 (hidden 16) and DPMSolverMultistep(flow_prediction, flow_shift 3)."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tok = gemma_tokenizer()
    torch.manual_seed(0)
    text = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tok),
            hidden_size=16,
            head_dim=8,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=8192,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            attn_implementation="eager",
        )
    )
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=16,
        sample_size=32,
    )
    torch.manual_seed(0)
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    scheduler = DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
    )
    pipe = SanaPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# 32 px: the pipeline takes multiples of 32 only; the oracle draws at the requested size (no resolution binning)
TINY = {"sana": Tiny(tiny_sana, size=32, call=lambda g: {"guidance_scale": g, "use_resolution_binning": False})}
