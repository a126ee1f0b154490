"""Attention capture on HunyuanImage and Sana (tiny pipelines from tests/tiny/): the words' token ids are the ones
the pipeline's own ``encode_prompt`` feeds its text encoder for the maps' segment (HunyuanImage: the chat template
with its first 34 tokens dropped; Sana: the complex human instruction, lowercasing and the first + last
max_sequence_length − 1 selection), a glyph prompt on a ByT5-projecting HunyuanImage is refused by name, and one
HunyuanImage joint layer's maps equal a hand computation from its own Q and K under its text mask."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch

from pipeline.errors import UserError
from pipeline.modes.attention.capture import AttentionCapture

PROMPTS = ["a red circle on the left", "A Blue square, right of a green triangle. "]


def _text_encoder_ids(model, prompts, **kwargs):
    """(input_ids, attention_mask) the pipeline's own encode_prompt hands its (first) text encoder."""
    seen = {}

    def spy(module, args, kwargs):
        seen.setdefault("ids", kwargs.get("input_ids", args[0] if args else None))
        seen.setdefault("mask", kwargs["attention_mask"])

    hook = model.pipe.text_encoder.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            model.pipe.encode_prompt(prompts, device=model.device, **kwargs)
    finally:
        hook.remove()
    return seen["ids"].cpu(), seen["mask"].cpu()


def test_hunyuanimage_tokens_are_the_template_segment_the_pipeline_encodes(model_of):
    model = model_of("hunyuanimage")
    layout = model.attention_layout(16, 16)
    drop = model.pipe.prompt_template_encode_start_idx
    ids, mask = _text_encoder_ids(model, PROMPTS, batch_size=len(PROMPTS))
    ids, mask = ids[:, drop:], mask[:, drop:]  # the pipeline keeps hidden states and mask after the template prefix
    for i, prompt in enumerate(PROMPTS):
        t = layout.tokens(prompt)
        assert t.num_tokens == int(mask[i].sum()) and list(t.ids) == ids[i, : t.num_tokens].tolist()
        assert t.words == prompt.split() and not t.start_token
        # the words' tokens spell the prompt, and nothing of the template maps
        assert "".join(layout.tokenizer.decode([t.ids[j] for j in p]) for p in t.positions).replace(" ", "") == (
            prompt.replace(" ", "")
        )
    try:  # a ByT5-projecting transformer puts glyph tokens first: a quoted prompt is refused by name
        model.denoiser.context_embedder_2 = torch.nn.Identity()
        with pytest.raises(UserError, match="HunyuanImagePipeline.*glyph"):
            model.attention_layout(16, 16).tokens('a sign that says "hello"')
        model.attention_layout(16, 16).tokens("a sign")  # no quotes: fine
    finally:
        model.denoiser.context_embedder_2 = None


def test_sana_tokens_are_the_selected_gemma_tokens_the_pipeline_encodes(model_of):
    model = model_of("sana")
    layout = model.attention_layout(32, 32)
    n = layout.max_length
    call = inspect.signature(model.pipe.__call__).parameters  # the driver's encode: __call__'s defaults
    chi, n_call = call["complex_human_instruction"].default, call["max_sequence_length"].default
    assert chi and n_call == n
    ids, mask = _text_encoder_ids(model, PROMPTS, complex_human_instruction=chi, max_sequence_length=n)
    select = [0, *range(ids.shape[1] - n + 1, ids.shape[1])]  # encode_prompt's select_index
    ids, mask = ids[:, select], mask[:, select]
    for i, prompt in enumerate(PROMPTS):
        t = layout.tokens(prompt)
        assert t.num_tokens == int(mask[i].sum()) and list(t.ids) == ids[i, : t.num_tokens].tolist()
        assert t.words == prompt.lower().split() and t.start_token  # the pipeline lowercases; <bos> at 0
        for word, p in zip(t.words, t.positions):
            assert layout.tokenizer.decode([t.ids[j] for j in p]).strip() == word and 0 not in p


def test_hunyuanimage_joint_maps_equal_a_hand_computation_under_its_mask(model_of):
    """The double-stream layer, no CFG: the image-query → Qwen-key block of softmax(QKᵀ/√d) over the keys the text
    mask lets through, head-averaged, renormalised over the prompt's real tokens — from the layer's own
    projections, norms and RoPE."""
    from diffusers.models.embeddings import apply_rotary_emb

    model = model_of("hunyuanimage")
    h = w = 16
    name = "transformer_blocks.0.attn.processor"
    layout = dataclasses.replace(model.attention_layout(h, w), layers=(name,))
    attn = model.denoiser.transformer_blocks[0].attn
    seen = {}
    hook = attn.register_forward_pre_hook(lambda m, args, kw: seen.update(kw), with_kwargs=True)
    prompt = PROMPTS[1]
    tok = layout.tokens(prompt)
    cond = model.condition(1, 1.0, h, w, prompts=[prompt])  # guidance 1: the guider's conditional batch only
    assert not cond.cfg
    x = torch.randn(1, *model.latent_shape(h, w), generator=torch.Generator().manual_seed(0))
    latent_hw = model.latent_shape(h, w)[1:]
    try:
        with torch.no_grad(), AttentionCapture(model.denoiser, layout, latent_hw, valid_tokens=[tok.num_tokens]) as cap:
            model._forward(x, torch.tensor(500.0), cond)
    finally:
        hook.remove()
    with torch.no_grad():

        def proj(linear, norm, t, rope=None):  # (1, L, heads·d) -> (1, heads, L, d), q/k norm, RoPE on the image
            t = norm(linear(t).unflatten(2, (attn.heads, -1)))
            return (t if rope is None else apply_rotary_emb(t, rope, sequence_dim=1)).transpose(1, 2)

        x_, c_, rope = seen["hidden_states"], seen["encoder_hidden_states"], seen["image_rotary_emb"]
        q = torch.cat([proj(attn.to_q, attn.norm_q, x_, rope), proj(attn.add_q_proj, attn.norm_added_q, c_)], 2)
        k = torch.cat([proj(attn.to_k, attn.norm_k, x_, rope), proj(attn.add_k_proj, attn.norm_added_k, c_)], 2)
    n_img, n_txt = x_.shape[1], c_.shape[1]
    keep = torch.cat([torch.ones(n_img, dtype=torch.bool), cond.kwargs["encoder_attention_mask"][0].bool().cpu()])
    assert int(keep[n_img:].sum()) == tok.num_tokens < n_txt  # the mask hides the Qwen padding
    logits = q[:, :, :n_img].double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1).mean(1)
    s0, _ = layout.segment
    block = p[0, :, n_img + s0 : n_img + s0 + tok.num_tokens]
    ref = block / block.sum(-1, keepdim=True)  # (HW, real Qwen tokens)
    got = cap.aggregate()[0, : tok.num_tokens].flatten(1).T.double()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cap.text_share().double(), p[0, :, n_img:].sum(-1).mean()[None], atol=1e-5, rtol=1e-5)
    # without the mask the padding would take mass: the mask matters here
    unmasked = torch.softmax(logits, -1).mean(1)[0, :, n_img:].sum(-1).mean()
    assert abs(float(unmasked) - float(cap.text_share())) > 1e-3
