"""Attention capture on Qwen-Image, Z-Image and Lumina 2 (tiny pipelines from tests/tiny/): the words of a prompt map
to the token ids each pipeline's own ``encode_prompt`` feeds its text encoder (chat template, dropped template
prefix, system prompt), and Qwen-Image's masked joint maps equal a hand computation from one layer's own Q and K."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.modes.attention.capture import AttentionCapture

PROMPTS = ["a red circle on the left", "a blue square on the right and a green triangle on the left"]


def _fed_ids(pipe, prompts, **kwargs) -> list[list[int]]:
    """The non-padding input ids ``encode_prompt`` hands the text encoder, per prompt (spied on its forward)."""
    seen = {}

    def spy(module, args, kw):
        seen.update(ids=kw.get("input_ids", args[0] if args else None), mask=kw["attention_mask"])

    hook = pipe.text_encoder.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe.encode_prompt(list(prompts), device="cpu", **kwargs)
    finally:
        hook.remove()
    return [ids[m.bool()].tolist() for ids, m in zip(seen["ids"], seen["mask"])]


@pytest.mark.parametrize("name", ["qwenimage", "zimage", "lumina2"])
def test_segment_ids_are_the_ids_encode_prompt_feeds_the_text_encoder(name, model_of):
    model = model_of(name)
    pipe = model.pipe
    layout = model.attention_layout(32, 32)
    if name == "qwenimage":  # the pipeline drops the template prefix from the hidden states
        drop = pipe.prompt_template_encode_start_idx
        fed = [f[drop:] for f in _fed_ids(pipe, PROMPTS)]
    else:
        fed = _fed_ids(pipe, PROMPTS, do_classifier_free_guidance=False)
    for prompt, ids in zip(PROMPTS, fed):
        t = layout.tokens(prompt)
        assert list(t.ids) == ids and t.num_tokens == len(ids), (name, prompt)
        assert t.words == prompt.split() and not t.truncated
        first = t.positions[0][0]  # Qwen-Image: its template prefix is dropped; the others keep theirs
        assert (first == 0) == (name == "qwenimage") and ids[:first] == list(layout.tokens("").ids[:first])
        assert all(a[-1] < b[0] for a, b in zip(t.positions, t.positions[1:]))


def test_qwenimage_masked_maps_equal_a_hand_computation_from_q_and_k(model_of):
    """Block 0, two prompts of different lengths, no CFG: the image-query → text-key block of the masked
    softmax(QKᵀ/√d) (padding keys excluded, as the model's encoder_hidden_states_mask), head-averaged,
    renormalised over each prompt's tokens — from the layer's own projections, norms and rotary embedding."""
    model = model_of("qwenimage")
    h = w = 32
    attn = model.denoiser.transformer_blocks[0].attn
    seen = {}
    hook = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    cond = model.condition(2, 1.0, h, w, prompts=PROMPTS)
    layout = model.attention_layout(h, w)
    layout = dataclasses.replace(layout, layers=layout.layers[:1])
    toks = [layout.tokens(p) for p in PROMPTS]
    x = torch.randn(2, *model.latent_shape(h, w), generator=torch.Generator().manual_seed(0))
    cap = AttentionCapture(
        model.denoiser, layout, model.latent_shape(h, w)[1:], valid_tokens=[t.num_tokens for t in toks]
    )
    with torch.no_grad(), cap:
        model._forward(model.driver.pack(x), torch.tensor(500.0), cond)
    hook.remove()
    mask = seen["encoder_hidden_states_mask"]
    assert mask is not None and not mask.all()  # the shorter prompt's padding is masked
    img_freqs, txt_freqs = seen["image_rotary_emb"]
    d = attn.inner_dim // attn.heads

    def qk(linear, norm, hs, freqs):  # (n, L, heads·d) -> (n, heads, L, d): projection, RMS norm, complex rotation
        t = norm(linear(hs).unflatten(-1, (attn.heads, d)))
        z = torch.view_as_complex(t.double().reshape(*t.shape[:-1], -1, 2)) * freqs[:, None].to(torch.complex128)
        return torch.view_as_real(z).flatten(3).transpose(1, 2)

    with torch.no_grad():
        xs, cs = seen["hidden_states"], seen["encoder_hidden_states"]
        q_img = qk(attn.to_q, attn.norm_q, xs, img_freqs)
        k = torch.cat(
            [qk(attn.add_k_proj, attn.norm_added_k, cs, txt_freqs), qk(attn.to_k, attn.norm_k, xs, img_freqs)], 2
        )
    logits = q_img @ k.transpose(-1, -2) / math.sqrt(d)
    keep = torch.cat([mask.bool(), torch.ones(2, xs.shape[1], dtype=torch.bool)], 1)
    p = logits.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1).mean(1)  # (n, HW, L)
    got = cap.aggregate()  # (n, S, 16, 16): the 8×8 token grid's maps, bilinearly upsampled to the latent
    gh, gw = layout.grid
    for i, t in enumerate(toks):
        block = p[i, :, : t.num_tokens]
        ref = (block / block.sum(-1, keepdim=True)).T.reshape(1, t.num_tokens, gh, gw)
        ref = F.interpolate(ref, size=tuple(got.shape[2:]), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(got[i, : t.num_tokens].double(), ref, atol=1e-5, rtol=1e-4)
        assert got[i, t.num_tokens :].abs().max() == 0
    share = p[:, :, : cs.shape[1]].sum(-1).mean(-1)
    torch.testing.assert_close(cap.text_share().double(), share, atol=1e-5, rtol=1e-5)
    assert cap.max_row_sum_error < 1e-5
