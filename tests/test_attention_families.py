"""Attention capture on the 2026 families (tiny random-weight pipelines from tests/tiny/): each family's recorder
leaves its images unchanged and restores its processors; probabilities are float32 rows summing to 1 over the keys
its own attention mask lets through; per-word maps sum to 1 over the prompt's real tokens; the batch and CFG
conventions hold (a prompt's maps are the same alone or in a batch, under the family's guidance); the words map to
the tokens of the user's prompt only (chat templates and system prompts excluded); families that declare no
attention are refused by name before any work."""

from __future__ import annotations

import pytest
import torch
from tiny import NEW_FAMILY_NAMES, tiny_family, tiny_spec

from pipeline.models.families import FAMILIES
from pipeline.models.generation import generators, sample
from pipeline.modes.attention import attention_processors, capture

PROMPTS = ["a red circle on the left", "a blue square on the right and a green triangle on the left"]
# CogView4 runs prompts of different padded lengths in separate transformer calls, which the capture refuses
# (tests/test_attention_flux2_chroma_cogview4.py): its batch here pads to one length
SAME_LENGTH = ["a red circle on the left", "a blue square on the right"]
GUIDANCE = 4.0


def _attention_families() -> list[str]:
    named = {f.name for f in FAMILIES.values() if f.supports("attention")}
    return [n for n in NEW_FAMILY_NAMES if n.removesuffix("_distilled") in named or n == "sd35"]


def _size(name: str, model) -> tuple[int, int]:
    spec = tiny_spec(name)
    return model.resolve_size(spec.size, spec.size)


def _captured(model, h, w, prompts, seeds):
    layout = model.attention_layout(h, w)
    toks = [layout.tokens(p) for p in prompts]
    cond = model.condition(len(prompts), GUIDANCE, h, w, prompts=prompts)
    with capture(model, h, w, {1}, cfg=cond.cfg, valid_tokens=[t.num_tokens for t in toks]) as cap:
        images = sample(model, model.pipe.scheduler, cond, generators(0, seeds), 3, h, w)
    return images, cap, toks


@pytest.mark.parametrize("name", _attention_families())
def test_capture_is_exact_restores_and_keeps_batch_and_cfg_conventions(name, model_of):
    model = model_of(name)
    h, w = _size(name, model)
    prompts = SAME_LENGTH if name == "cogview4" else PROMPTS
    originals = {k: type(v) for k, v in attention_processors(model.denoiser).items()}
    cond = model.condition(2, GUIDANCE, h, w, prompts=prompts)
    plain = sample(model, model.pipe.scheduler, cond, generators(0, [0, 1]), 3, h, w)
    images, cap, toks = _captured(model, h, w, prompts, [0, 1])
    torch.testing.assert_close(images, plain, atol=1e-5, rtol=0)  # the recorders are the family's own algorithm
    assert {k: type(v) for k, v in attention_processors(model.denoiser).items()} == originals
    assert cap.max_row_sum_error < 1e-5
    agg = cap.aggregate()
    assert agg.dtype == torch.float32 and tuple(agg.shape[2:]) == tuple(model.latent_shape(h, w)[1:])
    tokenizer = cap.layout.tokenizer
    for i, t in enumerate(toks):  # every word found, at tokens that spell it (not the template's)
        assert t.words == prompts[i].split() and not t.truncated, (name, t)
        for word, pos in zip(t.words, t.positions):
            spelled = "".join(tokenizer.decode([t.ids[j] for j in pos]).split())  # some decoders space characters
            assert spelled == word, (name, word, pos)
        if cap.layout.renormalise:  # each pixel's map sums to 1 over the prompt's real tokens, padding gets 0
            sums = agg[i, : t.num_tokens].sum(0)
            torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
            assert agg[i, t.num_tokens :].abs().max() == 0
    if cap.text_share() is not None:
        assert 0 < float(cap.text_share().min()) and float(cap.text_share().max()) < 1
    # each prompt alone (its own seed) has the maps it had in the batch: batch rows and CFG halves or calls kept apart
    for i in range(len(prompts)):
        _, alone, _ = _captured(model, h, w, prompts[i : i + 1], [i])
        n = toks[i].num_tokens
        torch.testing.assert_close(alone.aggregate()[0, :n], agg[i, :n], atol=1e-4, rtol=1e-3)


def test_sana_runs_the_mode_end_to_end_with_the_real_image_protocol(tmp_path):
    """The stage, not only the capture, on the family whose solver is unlike the others': Sana's flow DPM-Solver++
    (its reference images are noised by ``add_noise``, there is no ``scale_noise``), cross-attention (no concepts).
    The stage is family-agnostic otherwise (the 2024 families run it in tests/test_attention.py)."""
    name = "sana"
    from conftest import compose_cfg

    from pipeline.run.runner import run_pipeline

    size = tiny_spec(name).size
    cfg = compose_cfg(
        [
            "model=hub",
            "features=[shapes_net]",
            "dataset=shapes",
            "dataset.size=32",
            f"model.path={tiny_family(name, tmp_path / name)}",
            "mode=[attention]",
            "sampler.num_inference_steps=3",
            "mode.attention.steps=[0,2]",
            "sampler.batch_size=1",
            "mode.attention.num_prompts=1",
            "mode.attention.num_reference=1",
            f"sampler.guidance_scale={GUIDANCE}",
            *([f"sampler.height={size}", f"sampler.width={size}"] if size else []),
        ],
        tmp_path / "out",
    )
    out = run_pipeline(cfg, tmp_path / "run")
    assert out.status == "FINISHED", out.error
    r = out.results
    assert r["attention/num_scored"] >= 1 and r["attention/num_reference_scored"] >= 1 and "attention/seg_map" in r
    assert "attention/miou_output" not in r  # cross-attention: no concept stream (a skipped. tag says so)


def test_flow_noise_through_a_dpm_solver_is_the_rectified_flow_interpolation(model_of):
    """Sana's native DPM-Solver++ on flow sigmas has no ``scale_noise``: the adapter's noise is (1 − σ)·x₀ + σ·ε."""
    model = model_of("sana")
    sched = type(model.pipe.scheduler).from_config(model.pipe.scheduler.config)
    model.set_timesteps(sched, 10, *model.native_size())
    z = torch.randn(2, *model.latent_shape(*model.native_size()), generator=torch.Generator().manual_seed(1))
    x = model.add_noise(sched, z, generators(0, [0, 1]), sched.timesteps[3])
    eps = torch.cat([torch.randn(1, *z.shape[1:], generator=g) for g in generators(0, [0, 1])])
    sigma = sched.sigmas[3]
    torch.testing.assert_close(x, (1 - sigma) * z + sigma * eps)
