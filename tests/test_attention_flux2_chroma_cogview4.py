"""Attention capture on FLUX.2, FLUX.2-klein, Chroma and CogView4 (tiny random-weight pipelines): the words map to the
ids the pipeline's own ``encode_prompt`` feeds its text encoder (chat templates, left or right padding); Chroma's maps
are the softmax its float mask really gives (a +1 logit bias on the kept keys, computed here from the layer's own
Q/K); CogView4's maps put its left-padded text's real tokens first (images unchanged); two-call CFG is refused."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pipeline.errors import UserError
from pipeline.models.generation import generators, sample
from pipeline.modes.attention import capture
from pipeline.modes.attention.capture import AttentionCapture

PROMPT = "a blue square on the right and a green triangle on the left"


@pytest.mark.parametrize("name", ["flux2", "flux2_klein"])
def test_flux2_words_are_the_ids_encode_prompt_feeds_its_llm(name, model_of):
    model = model_of(name)
    seen = {}
    hook = model.pipe.text_encoder.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        model.condition(1, 1.0, 32, 32, prompts=[PROMPT])
    hook.remove()
    real = seen["input_ids"][0][seen["attention_mask"][0].bool()].tolist()  # left or right padding removed
    layout = model.attention_layout(32, 32)
    tok = layout.tokens(PROMPT)
    assert list(tok.ids) == real and tok.num_tokens == len(real) and tok.words == PROMPT.split()
    text = layout.tokenizer.decode(real)
    first = tok.positions[0][0]
    assert first > 0 and PROMPT not in layout.tokenizer.decode(real[:first])  # the template before the prompt
    assert text.count(PROMPT) == 1 and seen["input_ids"].shape[1] == layout.max_length


def test_chroma_maps_are_the_softmax_with_its_float_mask_as_a_bias(model_of):
    """Chroma's float 0/1 mask is added to the logits (SDPA): the maps of its double-stream layer from Q, K
    computed here, softmax(QKᵀ/√d + m_k), image rows, head mean, renormalised over the prompt's real T5 tokens."""
    from diffusers.models.embeddings import apply_rotary_emb

    model = model_of("chroma")
    h = w = 32
    attn = model.denoiser.transformer_blocks[0].attn
    seen = {}
    hook = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    layout = model.attention_layout(h, w)
    layout = dataclasses.replace(layout, layers=("transformer_blocks.0.attn.processor",))
    tok = layout.tokens(PROMPT)
    cond = model.condition(1, 1.0, h, w, prompts=[PROMPT])
    # maps read at the token grid itself (no upsampling to the latent)
    with torch.no_grad(), AttentionCapture(model.denoiser, layout, layout.grid, valid_tokens=[tok.num_tokens]) as cap:
        sample(model, model.pipe.scheduler, cond, generators(0, [0]), 1, h, w)
    hook.remove()
    with torch.no_grad():

        def proj(linear, norm, t):
            return norm(linear(t).unflatten(-1, (-1, attn.head_dim)))

        x, c, mask = seen["hidden_states"], seen["encoder_hidden_states"], seen["attention_mask"]
        q = torch.cat([proj(attn.add_q_proj, attn.norm_added_q, c), proj(attn.to_q, attn.norm_q, x)], 1)
        k = torch.cat([proj(attn.add_k_proj, attn.norm_added_k, c), proj(attn.to_k, attn.norm_k, x)], 1)
        q = apply_rotary_emb(q, seen["image_rotary_emb"], sequence_dim=1).transpose(1, 2).double()
        k = apply_rotary_emb(k, seen["image_rotary_emb"], sequence_dim=1).transpose(1, 2).double()
    T = c.shape[1]
    assert mask.dtype.is_floating_point  # the pipeline's float mask: a bias, not a mask
    logits = q[:, :, T:] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask[:, :, T:].double()
    p = logits.softmax(-1).mean(1)[0]  # (HW, L)
    assert p[:, tok.num_tokens + 1 : T].sum() > 0  # the padding past the first pad still gets mass
    block = p[:, : tok.num_tokens]
    got = cap.aggregate()[0, : tok.num_tokens].flatten(1).T.double()
    torch.testing.assert_close(got, block / block.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cap.text_share().double(), p[:, :T].sum(-1).mean()[None], atol=1e-5, rtol=1e-5)


def test_cogview4_capture_is_exact_with_the_real_tokens_first(model_of):
    """CogView4's text is left-padded to a multiple of 16 (attended): its maps put the real tokens first, the
    images are unchanged; prompts of different padded lengths (separate transformer calls) are refused."""
    model = model_of("cogview4")
    layout = model.attention_layout(32, 32)
    tok = layout.tokens(PROMPT)
    n = len(model.pipe.tokenizer(PROMPT).input_ids)
    assert n % 16 and tok.num_tokens == n and layout.segment == (0, layout.max_length)
    cond = model.condition(1, 1.0, 32, 32, prompts=[PROMPT])
    plain = sample(model, model.pipe.scheduler, cond, generators(0, [0]), 2, 32, 32)
    with torch.no_grad(), capture(model, 32, 32, prompts=[PROMPT]) as cap:
        images = sample(model, model.pipe.scheduler, cond, generators(0, [0]), 2, 32, 32)
    torch.testing.assert_close(images, plain, atol=1e-5, rtol=0)
    assert cap.max_row_sum_error < 1e-5 and 0 < float(cap.text_share()[0]) < 1
    agg = cap.aggregate()[0]
    torch.testing.assert_close(agg[:n].sum(0), torch.ones_like(agg[0]), atol=1e-5, rtol=0)
    assert agg[n:].abs().max() == 0
    prompts = [PROMPT, "a red circle"]  # 64 and 16 tokens: two transformer calls
    cond = model.condition(2, 1.0, 32, 32, prompts=prompts)
    with pytest.raises(UserError, match="separate"):
        with torch.no_grad(), capture(model, 32, 32, prompts=prompts):
            sample(model, model.pipe.scheduler, cond, generators(0, [0, 1]), 1, 32, 32)
