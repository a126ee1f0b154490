"""Tiny FLUX.2 pipelines (diffusers 0.42): ``Flux2Pipeline`` (guidance-distilled, Mistral-3 text encoder) and
``Flux2KleinPipeline`` (real CFG, Qwen3 text encoder), after diffusers' tests/pipelines/flux2 dummy components.

Both run at 32x32: AutoencoderKLFlux2 x2 (16x16x4 latents) -> 2x2 patchified + batch-norm normalised 8x8x16 ->
64 tokens of 16 channels. The text encoders are as deep as the pipelines' default ``text_encoder_out_layers``
(Mistral-3: hidden states 10, 20, 30; Qwen3: 9, 18, 27) but only 8 wide, so the defaults run unchanged.

Flux2Pipeline's tokenizer is a PixtralProcessor on the hub; transformers' PixtralProcessor cannot be built without
torchvision (not installed here), so the tiny pipeline carries a LlamaTokenizer with Mistral's special tokens and a
Mistral-style chat template in its place (the same batched ``apply_chat_template`` call works on it). The driver
only calls the pipeline's own ``encode_prompt``, so the oracle is the same whichever tokenizer object it holds.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from tiny import Tiny

__all__ = ["TINY", "tiny_flux2", "tiny_flux2_klein"]

_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set text = m.content[0].text %}"
    "{% if m.role == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]{% else %}[INST]{{ text }}[/INST]{% endif %}"
    "{% endfor %}"
)


def _vae():
    """AutoencoderKLFlux2, 2 levels (x2), 4 latent channels; random batch-norm statistics so that the pipeline's
    latent (de)normalisation is not the identity."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vae.bn.running_mean.copy_(0.2 * torch.randn(16))
    vae.bn.running_var.copy_(0.5 + torch.rand(16))
    return vae


def _transformer(text_hidden: int, guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    t = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * text_hidden,  # three stacked hidden-state layers
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )
    with torch.no_grad():  # random weights give a small velocity, barely moved by the text: scale both
        t.proj_out.weight.mul_(8.0)
        double, single = t.transformer_blocks[0].attn, t.single_transformer_blocks[0].attn
        gates = (t.double_stream_modulation_img.linear, t.single_stream_modulation.linear)
        for m in (*gates, double.add_v_proj, double.to_out[0], single.to_out):
            m.weight.mul_(4.0)
    return t


def _scheduler():
    """FLUX.2's scheduler config: resolution-dependent shift (the pipelines pass their empirical μ)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)


def tiny_flux2_klein(path: Path, distilled: bool = False) -> Path:
    """A Flux2KleinPipeline: 27-layer Qwen3 (hidden 8), byte-level Qwen2 tokenizer with a Qwen3 chat template,
    transformer without guidance embedding; ``distilled``: ``is_distilled=True`` (no CFG)."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tok = Qwen2Tokenizer(vocab={**vocab, "<|endoftext|>": len(vocab)}, merges=[])
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = _QWEN_TEMPLATE
    torch.manual_seed(0)
    text = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tok),
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=27,  # hidden_states[27], the deepest default layer
            num_attention_heads=1,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
        )
    )
    transformer = _transformer(8, guidance_embeds=False)
    torch.manual_seed(0)
    pipe = Flux2KleinPipeline(
        scheduler=_scheduler(),
        vae=_vae(),
        text_encoder=text,
        tokenizer=tok,
        transformer=transformer,
        is_distilled=distilled,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def tiny_flux2(path: Path) -> Path:
    """A Flux2Pipeline: 30-layer Mistral-3 text model (hidden 8) with a 1-layer Pixtral vision tower, a character
    LlamaTokenizer with Mistral's special tokens and chat template, transformer with guidance embedding."""
    from diffusers import Flux2Pipeline
    from transformers import LlamaTokenizer, Mistral3Config, Mistral3ForConditionalGeneration

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"]
    specials += ["[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    vocab = {s: i for i, s in enumerate(specials)}
    for c in "\u2581" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(c, len(vocab))
    tok = LlamaTokenizer(vocab=vocab, merges=[], pad_token="<pad>")
    tok.add_tokens(specials[4:], special_tokens=True)
    tok.chat_template = _MISTRAL_TEMPLATE
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = Mistral3Config(
        text_config=dict(
            model_type="mistral",
            vocab_size=len(tok),
            hidden_size=8,
            intermediate_size=8,
            max_position_embeddings=512,
            num_attention_heads=1,
            num_hidden_layers=30,  # hidden_states[30], the deepest default layer
            num_key_value_heads=1,
            head_dim=8,
            rope_theta=1e9,
            sliding_window=None,
            **ids,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            image_size=30,
            patch_size=6,
            num_channels=3,
        ),
        image_token_index=vocab["[IMG]"],
        **ids,
    )
    torch.manual_seed(0)
    text = Mistral3ForConditionalGeneration(config)
    transformer = _transformer(8, guidance_embeds=True)
    torch.manual_seed(0)
    pipe = Flux2Pipeline(scheduler=_scheduler(), vae=_vae(), text_encoder=text, tokenizer=tok, transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


TINY = {
    # guidance_scale: the distilled guidance embedding's value (no CFG)
    "flux2": Tiny(tiny_flux2, size=32),
    # guidance_scale: real CFG against the empty prompt (the pipeline's own negative)
    "flux2_klein": Tiny(tiny_flux2_klein, size=32),
}
