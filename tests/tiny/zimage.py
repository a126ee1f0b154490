"""A tiny ZImagePipeline (diffusers 0.42), built offline after the dummy components of diffusers'
tests/pipelines/z_image/test_z_image.py; the Qwen tokenizer, which those take from the hub, is trained here and
given a Qwen3-style chat template (the pipeline wraps every prompt in it)."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny import Tiny, _vae, _words

__all__ = ["TINY", "tiny_zimage", "qwen3_tokenizer"]

# Qwen3's chat template, reduced to what ZImagePipeline asks of it (one user message, add_generation_prompt,
# enable_thinking=True: no empty <think> block)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def qwen3_tokenizer():
    """A byte-level BPE Qwen2Tokenizer whose caption and template words are one token each (with and without a
    leading space; other words are spelled in bytes); ``<|endoftext|>`` pad, ``<|im_start|>``/``<|im_end|>``
    special, right padding, Qwen3's chat template."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    words = sorted({"user", "assistant", *_words()})
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator([w for x in words for w in (x, " " + x)], trainer)  # merges until each is one token
    model = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_zimage(path: Path) -> Path:
    """Z-Image at 32x32: x2 VAE with Flux's scaling/shift factors -> 16x16x4 latents, patch 2 -> 64 image tokens;
    a 2-layer single-stream transformer (dim 32, 2 heads, 1 refiner layer each for image and text) on the
    second-to-last hidden states of a 2-layer Qwen3 (hidden 16); FlowMatch Euler with Z-Image-Turbo's static
    shift 3 (the pipeline's μ is computed and ignored)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tok = qwen3_tokenizer()
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # the pad tokens are torch.empty: fixed as diffusers' test does
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
        # the final layer is zero-initialised: random weights, so that the velocity (and the images) depend on the
        # prompt and the noise
        for p in transformer.all_final_layer.parameters():
            p.normal_(0, 0.3)
    torch.manual_seed(0)
    vae = _vae(use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    torch.manual_seed(0)
    text = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
        )
    ).eval()
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        transformer=transformer,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# sampler.guidance_scale is ZImagePipeline's own guidance_scale (CFG pos + g (pos − neg), on when g > 0), with the
# project's empty negative prompt (the pipeline's default negative prompt is "" too)
TINY = {"zimage": Tiny(tiny_zimage, size=32, call=lambda g: {"guidance_scale": g, "negative_prompt": ""})}
