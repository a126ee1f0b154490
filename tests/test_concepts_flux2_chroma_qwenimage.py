"""ConceptAttention output-space maps on FLUX.2 (dev and klein), Chroma and Qwen-Image (tiny random-weight
pipelines): with concepts the generated image is bitwise identical (the image never sees them), the probability maps
do not change, the output maps are a softmax over the concepts; and one concept block's step equals that block's own
forward with the concept tokens as its text stream at text position 0 (its attention output checked against the
stock processor)."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_spec

from pipeline.models.generation import generators, sample
from pipeline.modes.attention import capture

PROMPTS = ["a red circle on the left", "a blue square on the right and a green triangle on the left"]
WORDS = ["circle", "square", "triangle"]


def _check_generation(model, name):
    """Images bitwise unchanged by the concepts, probability maps unchanged, output maps a softmax over concepts."""
    spec = tiny_spec(name)
    h, w = model.resolve_size(spec.size, spec.size)
    cond = model.condition(len(PROMPTS), 4.0, h, w, prompts=PROMPTS)
    with torch.no_grad():
        with capture(model, h, w, {1}, cfg=cond.cfg, prompts=PROMPTS) as plain:
            a = sample(model, model.pipe.scheduler, cond, generators(0, [0, 1]), 3, h, w)
        with capture(model, h, w, {1}, cfg=cond.cfg, prompts=PROMPTS, concepts=WORDS) as cap:
            b = sample(model, model.pipe.scheduler, cond, generators(0, [0, 1]), 3, h, w)
    assert torch.equal(a, b)
    torch.testing.assert_close(cap.aggregate(), plain.aggregate(), atol=0, rtol=0)
    out = cap.aggregate("output")
    assert out.shape == (len(PROMPTS), len(WORDS), *model.latent_shape(h, w)[1:])
    torch.testing.assert_close(out.sum(1), torch.ones_like(out[:, 0]), atol=1e-5, rtol=0)
    layout = model.attention_layout(h, w)
    calls = sum(s.calls for s in cap.sums["output"].values())
    assert calls == 3 * len(layout.concepts.blocks)  # every concept block of every step (conditional calls only)
    return layout, cond


@pytest.mark.parametrize("name", ["flux2", "flux2_klein"])
def test_flux2_concepts_leave_the_image_unchanged_and_follow_the_blocks_own_text_path(name, model_of):
    from diffusers.models.embeddings import apply_rotary_emb

    model = model_of(name)
    layout, cond = _check_generation(model, name)
    assert cond.cfg == (name == "flux2_klein")  # klein: two-call CFG; dev: distilled guidance
    assert layout.concepts.blocks and all(b.startswith("transformer_blocks.") for b in layout.concepts.blocks)
    tr = model.denoiser
    block = tr.get_submodule(layout.concepts.blocks[0])
    attn, g, C = block.attn, torch.Generator().manual_seed(0), len(WORDS)
    dim, (gh, gw) = attn.query_dim, layout.grid
    n = gh * gw
    x, c, temb = (torch.randn(*s, generator=g) for s in ((1, n, dim), (1, C, dim), (1, dim)))
    img_ids = model.pipe._prepare_latent_ids(torch.empty(1, 0, gh, gw))[0]
    txt_ids = model.pipe._prepare_text_ids(torch.empty(1, 5, 1))[0]  # what the pipeline gives a 5-token text
    assert txt_ids[0].tolist() == [0, 0, 0, 0]  # text position 0: (T, H, W, L) = 0
    with torch.no_grad():
        mod_img, mod_txt = tr.double_stream_modulation_img(temb), tr.double_stream_modulation_txt(temb)
        # the block's own forward, its text stream := the concepts, each at text position 0
        rope_c = tr.pos_embed(torch.cat([txt_ids[:1].expand(C, -1), img_ids]))
        c_ref, _ = block(
            hidden_states=x,
            encoder_hidden_states=c,
            temb_mod_img=mod_img,
            temb_mod_txt=mod_txt,
            image_rotary_emb=rope_c,
        )
        # the image rows as the recorder hands them over, under the real [5 text tokens; image] rotary embedding
        rope = tr.pos_embed(torch.cat([txt_ids, img_ids]))
        shift, scale = mod_img.unsqueeze(1).chunk(6, -1)[:2]
        norm_x = (1 + scale) * block.norm1(x) + shift
        k, v = (p(norm_x).unflatten(-1, (-1, attn.head_dim)) for p in (attn.to_k, attn.to_v))
        k = apply_rotary_emb(attn.norm_k(k), tuple(r[5:] for r in rope), sequence_dim=1)
        kw = {"temb_mod_img": mod_img, "temb_mod_txt": mod_txt, "image_rotary_emb": rope}
        c_ours, o = layout.concepts.step(block, c, k.transpose(1, 2), v.transpose(1, 2), kw)
        shift_c, scale_c = mod_txt.unsqueeze(1).chunk(6, -1)[:2]
        norm_c = (1 + scale_c) * block.norm1_context(c) + shift_c
        _, ctx = attn(hidden_states=norm_x, encoder_hidden_states=norm_c, image_rotary_emb=rope_c)  # stock processor
    torch.testing.assert_close(ctx, attn.to_add_out(o), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_ours, c_ref, atol=1e-5, rtol=1e-5)
    # the concept tokens: each word's own encoding through the pipeline, mean over its tokens (the real tokens by
    # the text encoder's own mask: dev's tokenizer pads on the left), context_embedder
    seen = {}
    hook = model.pipe.text_encoder.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        words = model.driver.concept_tokens(WORDS[:1])
    hook.remove()
    h, w = model.native_size()
    pe = model.driver._encode(WORDS[:1], h, w)["encoder_hidden_states"]
    real = pe[0][seen["attention_mask"][0].bool()]
    pos = layout.tokens(WORDS[0]).positions[0]
    assert (name == "flux2") == (layout.tokenizer.padding_side == "left")  # both sides covered
    torch.testing.assert_close(words, tr.context_embedder(real[pos].mean(0, keepdim=True)), atol=1e-6, rtol=1e-6)


def test_chroma_concepts_leave_the_image_unchanged_and_follow_the_blocks_own_text_path(model_of):
    model = model_of("chroma")
    layout, cond = _check_generation(model, "chroma")
    assert cond.cfg  # two-call CFG
    assert layout.concepts.blocks and all(b.startswith("transformer_blocks.") for b in layout.concepts.blocks)
    tr = model.denoiser
    block = tr.get_submodule(layout.concepts.blocks[0])
    attn, g, C = block.attn, torch.Generator().manual_seed(0), len(WORDS)
    dim, (gh, gw) = attn.query_dim, layout.grid
    n = gh * gw
    # the approximator's per-block modulation: 6 image rows, 6 text rows (distinct, so the split is checked)
    x, c, temb = (torch.randn(*s, generator=g) for s in ((1, n, dim), (1, C, dim), (1, 12, dim)))
    img_ids = model.pipe._prepare_latent_image_ids(1, gh, gw, "cpu", x.dtype)
    rope = tr.pos_embed(torch.cat([torch.zeros(C, 3), img_ids]))  # Chroma's text ids are zeros
    # the pipeline's float 0/1 mask, the concepts as real tokens: all ones (a +1 bias on every logit)
    mask = torch.ones(1, C + n)
    with torch.no_grad():
        c_ref, _ = block(
            hidden_states=x, encoder_hidden_states=c, temb=temb, image_rotary_emb=rope, attention_mask=mask
        )
        norm_x = block.norm1(x, emb=temb[:, :6])[0]
        k, v = (p(norm_x).unflatten(-1, (-1, attn.head_dim)) for p in (attn.to_k, attn.to_v))
        from diffusers.models.embeddings import apply_rotary_emb

        k = apply_rotary_emb(attn.norm_k(k), tuple(r[C:] for r in rope), sequence_dim=1)
        kw = {"temb": temb, "image_rotary_emb": rope, "attention_mask": torch.ones(1, 7 + n)}  # the call's own
        c_ours, o = layout.concepts.step(block, c, k.transpose(1, 2), v.transpose(1, 2), kw)
        norm_c = block.norm1_context(c, emb=temb[:, 6:])[0]
        _, ctx = attn(hidden_states=norm_x, encoder_hidden_states=norm_c, image_rotary_emb=rope)  # stock processor
    torch.testing.assert_close(ctx, attn.to_add_out(o), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_ours, c_ref, atol=1e-5, rtol=1e-5)


def test_qwenimage_concepts_leave_the_image_unchanged_and_follow_the_blocks_own_text_path(model_of):
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    model = model_of("qwenimage")
    layout, cond = _check_generation(model, "qwenimage")
    assert cond.cfg  # two-call true CFG
    assert layout.concepts.blocks == tuple(
        f"transformer_blocks.{i}" for i in range(len(model.denoiser.transformer_blocks))
    )
    tr = model.denoiser
    block = tr.get_submodule(layout.concepts.blocks[0])
    attn, g, C = block.attn, torch.Generator().manual_seed(0), len(WORDS)
    dim, (gh, gw) = attn.to_q.in_features, layout.grid
    n, head_dim = gh * gw, attn.inner_dim // attn.heads
    x, c, temb = (torch.randn(*s, generator=g) for s in ((1, n, dim), (1, C, dim), (1, dim)))
    img_freqs, txt_freqs = tr.pos_embed([(1, gh, gw)], max_txt_seq_len=5, device=torch.device("cpu"))
    assert not torch.allclose(txt_freqs[0], torch.ones_like(txt_freqs[0]))  # text position 0 is a real rotation
    with torch.no_grad():
        # the block's own forward, its text stream := the concepts, each at text position 0
        rope_c = (img_freqs, txt_freqs[:1].expand(C, -1))
        c_ref, _ = block(
            hidden_states=x,
            encoder_hidden_states=c,
            encoder_hidden_states_mask=None,
            temb=temb,
            image_rotary_emb=rope_c,
        )
        shift, scale = block.img_mod(temb).chunk(6, -1)[:2]
        norm_x = block.img_norm1(x) * (1 + scale[:, None]) + shift[:, None]
        k, v = (p(norm_x).unflatten(-1, (-1, head_dim)) for p in (attn.to_k, attn.to_v))
        k = apply_rotary_emb_qwen(attn.norm_k(k), img_freqs, use_real=False)
        kw = {"temb": temb, "image_rotary_emb": (img_freqs, txt_freqs), "encoder_hidden_states_mask": None}
        c_ours, o = layout.concepts.step(block, c, k.transpose(1, 2), v.transpose(1, 2), kw)
        shift_c, scale_c = block.txt_mod(temb).chunk(6, -1)[:2]
        norm_c = block.txt_norm1(c) * (1 + scale_c[:, None]) + shift_c[:, None]
        _, ctx = attn(hidden_states=norm_x, encoder_hidden_states=norm_c, image_rotary_emb=rope_c)  # stock processor
    torch.testing.assert_close(ctx, attn.to_add_out(o), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_ours, c_ref, atol=1e-5, rtol=1e-5)
    # the concept tokens: each word's own encoding, mean over its tokens, then txt_norm and txt_in
    words = model.driver.concept_tokens(WORDS[:1])
    pe, _ = model.pipe.encode_prompt(prompt=WORDS[:1], device=torch.device("cpu"), max_sequence_length=512)
    pos = layout.tokens(WORDS[0]).positions[0]
    ref = tr.txt_in(tr.txt_norm(pe[0, pos].mean(0, keepdim=True)))
    torch.testing.assert_close(words, ref, atol=1e-6, rtol=1e-6)
