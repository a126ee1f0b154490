"""A tiny QwenImagePipeline (diffusers 0.42), built offline after the dummy components of diffusers'
tests/pipelines/qwenimage/test_qwenimage.py; the tokenizer, which those take from the hub, is trained here."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny import Tiny, _words

_SPECIALS = ("<|im_start|>", "<|im_end|>")
# the words of QwenImagePipeline.prompt_template_encode, whose first 34 tokens (prompt_template_encode_start_idx)
# the pipeline drops
_TEMPLATE_WORDS = (
    "system user assistant Describe the image by detailing the color shape size texture quantity text spatial "
    "relationships of objects and background"
)


def _qwen_tokenizer():
    """A byte-level BPE Qwen2Tokenizer whose every template and caption word is one token (with and without its
    leading space), so the template's system + user prefix is 34 tokens as with Qwen2.5-VL's own tokenizer and
    dropping them leaves exactly the prompt; other words are spelled in bytes. Pad/EOS ``<|endoftext|>``, right
    padding, ``<|im_start|>``/``<|im_end|>`` special."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    words = sorted(set(_TEMPLATE_WORDS.split()) | set(_words()))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=100_000, initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator([w for x in words for w in (x, " " + x)], trainer)  # merges until each is one token
    model = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    tok.add_special_tokens({"additional_special_tokens": list(_SPECIALS)})
    return tok


def _check_template(tok, template: str, drop: int) -> None:
    """The pipeline's template must lose exactly its prefix: ``drop`` tokens up to and including ``user\\n``."""
    prefix = template.split("{}")[0]
    if (
        len(tok(prefix).input_ids) != drop
        or tok(template.format("a red circle")).input_ids[drop] != tok("a").input_ids[0]
    ):
        raise ValueError(f"tiny Qwen tokenizer: the template prefix is not {drop} tokens")
    for w in _words():
        if len(tok(" " + w).input_ids) != 1:
            raise ValueError(f"tiny Qwen tokenizer splits {w!r}")


def tiny_qwenimage(path: Path) -> Path:
    """QwenImage at 32x32: x2 Wan-style VAE (one temperal_downsample entry, z_dim 4, non-trivial latents_mean/std;
    narrower than diffusers' dummy, whose decode dominated the test) -> 16x16x4 latents, packed 2x2 -> 64 tokens of
    16 channels; diffusers' dummy transformer (2 double-stream blocks, 3 heads of 16) and 2-layer Qwen2.5-VL (hidden
    16); FlowMatch Euler with a resolution-dependent shift like Qwen/Qwen-Image's (exponential time shift, μ over
    256..8192 tokens, shift_terminal 0.02)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = _qwen_tokenizer()
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, -0.1],
        latents_std=[1.5, 0.8, 2.0, 1.2],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),  # as Qwen2.5-VL's
            "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=len(tok),
    )
    text = Qwen2_5_VLForConditionalGeneration(config).eval()
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tok, transformer=transformer)
    _check_template(tok, pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# sampler.guidance_scale is QwenImagePipeline's true_cfg_scale, with the project's empty negative prompt
TINY = {
    "qwenimage": Tiny(tiny_qwenimage, size=32, call=lambda g: {"true_cfg_scale": g, "negative_prompt": ""}),
}
