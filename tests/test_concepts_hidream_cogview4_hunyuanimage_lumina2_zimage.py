"""ConceptAttention output-space maps on HiDream, CogView4, Lumina 2 and Z-Image (tiny random-weight pipelines): with
concepts the generated image is bitwise identical (the image never sees them), the probability maps do not change,
the output maps are a softmax over the concepts and come from the conditional CFG half; and one concept block's step
equals that block's own forward with the concept tokens as its text (caption) tokens, its attention output checked
against the stock processor. HunyuanImage: its concepts go through the timestep-conditioned token refiner at each
denoiser call (``ConceptStream.prepare``), checked as one-token captions of their own."""

from __future__ import annotations

import torch
from tiny import tiny_spec

from pipeline.models.generation import generators, sample
from pipeline.modes.attention import capture

PROMPTS = ["a red circle on the left", "a blue square on the right"]  # one padded length (CogView4's one call)
WORDS = ["circle", "square", "triangle"]


def _size(name, model):
    spec = tiny_spec(name)
    return model.resolve_size(spec.size, spec.size)


def _check_generation(model, h, w):
    cond = model.condition(len(PROMPTS), 4.0, h, w, prompts=PROMPTS)
    assert cond.cfg
    with torch.no_grad():
        with capture(model, h, w, {1}, cfg=cond.cfg, prompts=PROMPTS) as plain:
            a = sample(model, model.pipe.scheduler, cond, generators(0, [0, 1]), 3, h, w)
        with capture(model, h, w, {0, 1}, cfg=cond.cfg, prompts=PROMPTS, concepts=WORDS) as cap:
            b = sample(model, model.pipe.scheduler, cond, generators(0, [0, 1]), 3, h, w)
    assert torch.equal(a, b)
    torch.testing.assert_close(cap.aggregate(), plain.aggregate(), atol=0, rtol=0)
    out = cap.aggregate("output")
    assert out.shape == (len(PROMPTS), len(WORDS), *model.latent_shape(h, w)[1:])
    torch.testing.assert_close(out.sum(1), torch.ones_like(out[:, 0]), atol=1e-5, rtol=0)
    # the conditional half: the first call's concept maps are those of the same call without CFG
    without = model.condition(len(PROMPTS), model.driver.plain_guidance(4.0), h, w, prompts=PROMPTS)
    assert not without.cfg
    with torch.no_grad(), capture(model, h, w, {0}, prompts=PROMPTS, concepts=WORDS) as alone:
        sample(model, model.pipe.scheduler, without, generators(0, [0, 1]), 3, h, w)
    torch.testing.assert_close(alone.snapshots("output")[0], cap.snapshots("output")[0], atol=1e-4, rtol=1e-3)
    return model.attention_layout(h, w)


def test_hidream_concepts_leave_the_image_unchanged_and_follow_the_blocks_own_text_path(model_of):
    from diffusers.models.transformers.transformer_hidream_image import apply_rope

    model = model_of("hidream")
    h, w = _size("hidream", model)
    layout = _check_generation(model, h, w)
    assert layout.concepts.blocks and all(b.startswith("double_stream_blocks.") for b in layout.concepts.blocks)
    # one block by hand: its own forward with encoder_hidden_states := the concept tokens (text ids zero)
    tr = model.denoiser
    block = tr.get_submodule(layout.concepts.blocks[0])
    attn, g, C = block.attn1, torch.Generator().manual_seed(0), len(WORDS)
    dim = attn.to_q.in_features
    gh, gw = layout.grid
    x, c, temb = (torch.randn(*s, generator=g) for s in ((1, gh * gw, dim), (1, C, dim), (1, dim)))
    p = tr.config.patch_size
    _, _, _, img_ids = tr.patchify(torch.zeros(1, tr.config.in_channels, gh * p, gw * p))
    rope = tr.pe_embedder(torch.cat([img_ids, torch.zeros(1, C, 3, dtype=img_ids.dtype)], 1))
    with torch.no_grad():
        x_ref, c_ref = block(hidden_states=x, encoder_hidden_states=c, temb=temb, image_rotary_emb=rope)
        mod = block.adaLN_modulation(temb)[:, None].chunk(12, dim=-1)
        norm_x = block.norm1_i(x) * (1 + mod[1]) + mod[0]
        heads, n = attn.heads, gh * gw
        k = attn.k_rms_norm(attn.to_k(norm_x)).view(1, n, heads, -1)
        v = attn.to_v(norm_x).view(1, n, heads, -1)
        q = attn.q_rms_norm(attn.to_q(norm_x)).view(1, n, heads, -1)
        if k.shape[-1] == rope.shape[-3] * 2:
            _, k = apply_rope(q, k, rope[:, :n])
        else:
            (q1, _), (k1, k2) = q.chunk(2, -1), k.chunk(2, -1)
            k = torch.cat([apply_rope(q1, k1, rope[:, :n])[1], k2], -1)
        c_ours, o = layout.concepts.step(
            block, c, k.transpose(1, 2), v.transpose(1, 2), {"temb": temb, "image_rotary_emb": rope}
        )
        norm_c = block.norm1_t(c) * (1 + mod[7]) + mod[6]
        _, ctx = attn(norm_x, None, norm_c, image_rotary_emb=rope)  # the stock processor
    torch.testing.assert_close(ctx, attn.to_out_t(o), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_ours, c_ref, atol=1e-5, rtol=1e-5)


def test_cogview4_concepts_leave_the_image_unchanged_and_follow_the_blocks_own_text_path(model_of):
    from diffusers.models.embeddings import apply_rotary_emb

    model = model_of("cogview4")
    h, w = _size("cogview4", model)
    layout = _check_generation(model, h, w)
    tr = model.denoiser
    block = tr.get_submodule(layout.concepts.blocks[0])
    attn, g, C = block.attn1, torch.Generator().manual_seed(0), len(WORDS)
    dim, tdim = attn.to_q.in_features, block.norm1.linear.in_features
    gh, gw = layout.grid
    n = gh * gw
    x, c, temb = (torch.randn(*s, generator=g) for s in ((1, n, dim), (1, C, dim), (1, tdim)))
    p = tr.config.patch_size
    rope = tr.rope(torch.zeros(1, tr.config.in_channels, gh * p, gw * p))
    with torch.no_grad():
        _, c_ref = block(x, c, temb, rope)
        norm_x, *_, norm_c, _, _, _, _ = block.norm1(x, c, temb)
        k, v = (t(norm_x).unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in (attn.to_k, attn.to_v))
        k = apply_rotary_emb(attn.norm_k(k), rope, use_real_unbind_dim=-2)
        c_ours, o = layout.concepts.step(block, c, k, v, {"temb": temb, "image_rotary_emb": rope})
        _, ctx = attn(hidden_states=norm_x, encoder_hidden_states=norm_c, image_rotary_emb=rope)  # stock processor
    torch.testing.assert_close(ctx, attn.to_out[1](attn.to_out[0](o)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_ours, c_ref, atol=1e-5, rtol=1e-5)


def test_hunyuanimage_concepts_are_refined_per_call_and_follow_the_blocks_own_text_path(model_of):
    """HunyuanImage's token refiner is timestep-conditioned: the concepts' text input is refined at each denoiser
    call (one-token captions, checked against the model's refiner); the double-stream step against the block."""
    from diffusers.models.embeddings import apply_rotary_emb

    from pipeline.models.families.hunyuanimage import hunyuanimage_concept_step, refine_concepts

    model = model_of("hunyuanimage")
    h, w = _size("hunyuanimage", model)
    assert model.attention_layout(h, w).concepts.prepare is not None
    _check_generation(model, h, w)
    tr, C = model.denoiser, len(WORDS)
    with torch.no_grad():
        raw = model.driver.concept_tokens(WORDS)
        assert raw.shape == (C, tr.context_embedder.proj_in.in_features)
        t = torch.tensor([500.0, 900.0])
        both = refine_concepts(tr, raw[None].expand(2, -1, -1), t)
        for i in range(2):  # each concept a one-token caption of its own, at its row's timestep
            for j in range(C):
                alone = tr.context_embedder(raw[None, j : j + 1], t[i : i + 1], torch.ones(1, 1, dtype=torch.bool))
                torch.testing.assert_close(both[i, j : j + 1], alone[0], atol=1e-6, rtol=1e-6)
    block = tr.transformer_blocks[0]
    attn, g = block.attn, torch.Generator().manual_seed(0)
    dim = attn.to_q.in_features
    gh, gw = model.attention_layout(h, w).grid
    n = gh * gw
    x, c, temb = (torch.randn(*s, generator=g) for s in ((1, n, dim), (1, C, dim), (1, dim)))
    rope = tr.rope(torch.zeros(1, tr.config.in_channels, gh, gw))
    with torch.no_grad():
        _, c_ref = block(x, c, temb, image_rotary_emb=rope)
        norm_x = block.norm1(x, emb=temb)[0]
        k, v = (p(norm_x).unflatten(2, (attn.heads, -1)) for p in (attn.to_k, attn.to_v))
        k = apply_rotary_emb(attn.norm_k(k), rope, sequence_dim=1)
        c_ours, o = hunyuanimage_concept_step(block, c, k.transpose(1, 2), v.transpose(1, 2), {"temb": temb})
        norm_c = block.norm1_context(c, emb=temb)[0]
        _, ctx = attn(hidden_states=norm_x, encoder_hidden_states=norm_c, image_rotary_emb=rope)  # stock processor
    torch.testing.assert_close(ctx, attn.to_add_out(o), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_ours, c_ref, atol=1e-5, rtol=1e-5)


def test_lumina2_concepts_leave_the_image_unchanged_and_follow_a_caption_tokens_path(model_of):
    """Single-stream: the concept step is the block's own forward on [concepts; image] (the concept rows), the
    concepts at caption position 0 (no rotation)."""
    from diffusers.models.embeddings import apply_rotary_emb

    model = model_of("lumina2")
    h, w = _size("lumina2", model)
    layout = _check_generation(model, h, w)
    block = model.denoiser.get_submodule(layout.concepts.blocks[0])
    attn, g, C = block.attn, torch.Generator().manual_seed(0), len(WORDS)
    dim, tdim = attn.to_q.in_features, block.norm1.linear.in_features
    n = layout.grid[0] * layout.grid[1]
    x, c, temb = (torch.randn(*s, generator=g) for s in ((1, n, dim), (1, C, dim), (1, tdim)))
    d = attn.to_q.out_features // attn.heads
    angles = torch.cat([torch.zeros(1, C, d // 2), torch.rand(1, n, d // 2, generator=g) * 6.28], 1)
    rope = torch.polar(torch.ones_like(angles), angles)  # concepts: position 0 (identity); image: any rotation
    with torch.no_grad():
        ref = block(torch.cat([c, x], 1), None, rope, temb)[:, :C]
        norm = block.norm1(torch.cat([c, x], 1), temb)[0]
        k, v = attn.to_k(norm[:, C:]), attn.to_v(norm[:, C:])
        kv = k.shape[-1] // d
        k = apply_rotary_emb(attn.norm_k(k.view(1, n, kv, d)), rope[:, C:], use_real=False)
        k, v = (t.view(1, n, kv, 1, d).repeat(1, 1, 1, attn.heads // kv, 1).flatten(2, 3) for t in (k, v))
        ours, o = layout.concepts.step(
            block, c, k.transpose(1, 2), v.transpose(1, 2), {"temb": temb, "image_rotary_emb": rope}
        )
        stock = attn(hidden_states=norm, encoder_hidden_states=norm, image_rotary_emb=rope)[:, :C]  # stock processor
    torch.testing.assert_close(stock, attn.to_out[1](attn.to_out[0](o)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_zimage_concepts_leave_the_image_unchanged_and_follow_a_caption_tokens_path(model_of):
    """Single-stream, [image; image pad; caption]: the concept step is the block's own forward on [image; concepts]
    (the concept rows), the concepts at the first caption position (1, 0, 0)."""
    from pipeline.models.families.zimage import SEQ_MULTI_OF, _rotary

    model = model_of("zimage")
    h, w = _size("zimage", model)
    layout = _check_generation(model, h, w)
    tr = model.denoiser
    block = tr.get_submodule(layout.concepts.blocks[0])
    attn, g, C = block.attention, torch.Generator().manual_seed(0), len(WORDS)
    dim, tdim = attn.to_q.in_features, block.adaLN_modulation[0].in_features
    n = layout.grid[0] * layout.grid[1]
    t0 = n + (-n) % SEQ_MULTI_OF
    x, c, temb = (torch.randn(*s, generator=g) for s in ((1, n, dim), (1, C, dim), (1, tdim)))
    ids = torch.cat(
        [tr.create_coordinate_grid((1, *layout.grid), (5, 0, 0)).flatten(0, 2), torch.tensor([[1, 0, 0]] * C)]
    )
    freqs = tr.rope_embedder(ids)[None]  # image at (5, i, j), the concepts at the first caption position
    slot = torch.zeros(1, t0 + 1, freqs.shape[-1], dtype=freqs.dtype)
    slot[:, t0] = freqs[0, n]  # what the step reads: the block's freqs at the caption's first slot
    with torch.no_grad():
        ref = block(torch.cat([x, c], 1), None, freqs, temb)[:, n:]
        mod = block.adaLN_modulation(temb).unsqueeze(1).chunk(4, dim=2)
        xs = block.attention_norm1(x) * (1 + mod[0])
        k = _rotary(attn.norm_k(attn.to_k(xs).unflatten(-1, (attn.heads, -1))), freqs[:, :n])
        v = attn.to_v(xs).unflatten(-1, (attn.heads, -1))
        kw = {"adaln_input": temb, "freqs_cis": slot}
        ours, o = layout.concepts.step(block, c, k.transpose(1, 2), v.transpose(1, 2), kw)
        seq = torch.cat([xs, block.attention_norm1(c) * (1 + mod[0])], 1)
        stock = attn(seq, attention_mask=None, freqs_cis=freqs)[:, n:]  # the stock processor
    torch.testing.assert_close(stock, attn.to_out[0](o), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
