"""Attention capture on tiny random-weight pipelines (SD 1.x-, SD 2.x- and SDXL-style): correctness of the
probabilities, CFG half, token offsets, flat memory, restoring processors. (mIoU bar: test_shapes_e2e.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from conftest import compose_cfg
from pipeline.attention import CrossAttentionCapture, cross_attention_layers, layer_grid
from pipeline.errors import UserError
from pipeline.runner import run_pipeline
from pipeline.stages.attention import spatial_entropy, word_tokens
from tiny import tiny_ddpm, tiny_sd, tiny_sdxl

PROMPTS = ["a red circle on the left", "a blue square on the right and a green triangle on the left"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    path = tiny_sd(tmp_path_factory.mktemp("sd") / "m")
    return DiffusionPipeline.from_pretrained(path, use_safetensors=True).to("cpu"), path


def _gen(pipe, prompts, steps=4, guidance=5.0, **kw):
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt", **kw).images


def test_capture_does_not_change_images_and_restores_processors(sd):
    pipe, _ = sd
    before = _gen(pipe, PROMPTS)
    originals = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    with CrossAttentionCapture(pipe.unet, (8, 8), {1}) as cap:
        during = _gen(pipe, PROMPTS)
    assert torch.allclose(before, during, atol=1e-5)
    assert cap.max_row_sum_error < 1e-5  # each pixel's probabilities over tokens sum to 1
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == originals
    # an error inside the block leaves the pipeline untouched too
    with pytest.raises(RuntimeError, match="boom"):
        with CrossAttentionCapture(pipe.unet, (8, 8), set()):
            raise RuntimeError("boom")
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == originals


def test_only_cross_attention_layers_are_hooked(sd):
    pipe, _ = sd
    names = cross_attention_layers(pipe.unet)
    assert names and all(n.endswith("attn2.processor") for n in names)
    assert len(names) < len(pipe.unet.attn_processors)  # self-attention (attn1) stays as it was


def test_conditional_half_is_kept_under_cfg(sd):
    pipe, _ = sd
    with CrossAttentionCapture(pipe.unet, (8, 8), {0}, cfg_batch=True) as with_cfg:
        _gen(pipe, PROMPTS, guidance=5.0)
    with CrossAttentionCapture(pipe.unet, (8, 8), {0}, cfg_batch=False) as cond_only:
        _gen(pipe, PROMPTS, guidance=1.0)  # no CFG: the batch is the conditional prompts alone
    # step 0 sees the same latents in both runs: the kept half must be the conditional one
    assert torch.allclose(with_cfg.snapshots[0], cond_only.snapshots[0], atol=1e-5)


def test_token_positions_skip_the_start_token_and_merge_split_words(sd):
    pipe, _ = sd
    words, pos, truncated = word_tokens(pipe.tokenizer, "a red circle")
    assert words == ["a", "red", "circle"] and pos == [[1], [2], [3]] and not truncated
    words, pos, _ = word_tokens(pipe.tokenizer, "a zebu circle")  # 'zebu' is not in the vocabulary: 4 letters
    assert pos[1] == [2, 3, 4, 5] and pos[2] == [6]
    words, pos, truncated = word_tokens(pipe.tokenizer, " ".join(["red"] * 30))  # tokenizer limit is 16
    assert truncated and len(words) == 14 and pos[-1] == [14]


def test_memory_does_not_grow_with_steps(sd):
    pipe, _ = sd
    sizes = []
    for steps in (3, 9):
        with CrossAttentionCapture(pipe.unet, (8, 8), {1, 2}) as cap:
            _gen(pipe, PROMPTS, steps=steps)
        sizes.append(sum(l.running.numel() for l in cap.layers.values()) + sum(s.numel() for s in cap.snapshots.values()))
    assert sizes[0] == sizes[1]


def test_layer_grid_handles_non_square_latents():
    assert layer_grid(12 * 8, (12, 8)) == (12, 8) and layer_grid(3 * 2, (12, 8)) == (3, 2)
    assert layer_grid(4 * 3, (7, 5)) == (4, 3)  # odd sizes: padded convs round up
    assert spatial_entropy(torch.ones(4, 4)) == pytest.approx(1.0)
    assert spatial_entropy(torch.eye(4)[0].reshape(2, 2)) == pytest.approx(0.0, abs=1e-9)


def _run(path, tmp_path, extra=()):
    cfg = compose_cfg(["model=hub", "features=[shapes_net]", "dataset=shapes", f"model.path={path}", "mode=[attention]", "sampler.num_inference_steps=4",
                       "mode.attention.steps=[0,3]", "sampler.batch_size=2", *extra], tmp_path / "out")
    return run_pipeline(cfg, tmp_path / "run")


def test_mode_runs_on_sd_with_seed_prompt_and_non_square_images(sd, tmp_path):
    _, path = sd
    out = _run(path, tmp_path, ['mode.attention.prompts=["a red car parked next to a blue house",'
                                '"a red circle on the left"]', "mode.attention.height=16", "mode.attention.width=24"])
    r = out.results
    assert r["attention/num_prompts"] == 2 and 0 < r["attention/bos_share"] < 1
    assert 0 <= r["attention/entropy_early"] <= 1 and 0 <= r["attention/entropy_late"] <= 1
    maps = np.load(tmp_path / "run" / "tables" / "attention_maps.npz")
    assert maps["maps_0000"].shape == (9, 16, 24) and list(maps["words_0000"])[1] == "red"
    assert (tmp_path / "run" / "plots" / "attention_overlay_0.png").is_file()
    assert (tmp_path / "run" / "plots" / "attention_resolutions_0.png").is_file()


def test_mode_runs_on_sdxl_style_pipeline(tmp_path):
    path = tiny_sdxl(tmp_path / "xl")
    out = _run(path, tmp_path, ['mode.attention.prompts=["a red circle on the left"]'])
    assert out.status == "FINISHED" and out.results["attention/num_prompts"] == 1


def test_sd2_style_linear_projection_unet_is_captured(tmp_path):
    unet = UNet2DConditionModel(sample_size=(6, 10), in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, cross_attention_dim=24, attention_head_dim=(2, 4), norm_num_groups=4,
                                use_linear_projection=True, upcast_attention=True,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")).eval()
    x, t, text = torch.randn(2, 4, 6, 10), torch.tensor(10), torch.randn(2, 7, 24)
    plain = unet(x, t, encoder_hidden_states=text).sample
    with CrossAttentionCapture(unet, (6, 10), {0}, cfg_batch=False) as cap:
        captured = unet(x, t, encoder_hidden_states=text).sample
    assert torch.allclose(plain, captured, atol=1e-5)
    assert {l.grid for l in cap.layers.values()} == {(6, 10), (3, 5)} and cap.aggregate().shape == (2, 7, 6, 10)


def test_unconditional_model_is_skipped_and_other_modes_continue(tmp_path):
    path = tiny_ddpm(tmp_path / "ddpm")
    cfg = compose_cfg(["model=hub", "features=[shapes_net]", "dataset=shapes", f"model.path={path}", "mode=[attention,schedule]", "mode.schedule.compare=[linear]"],
                      tmp_path / "out")
    out = run_pipeline(cfg, tmp_path / "run")
    assert out.status == "FINISHED" and "no cross-attention" in out.skipped["attention"]
    assert "schedule/log_snr_max" in out.results and not any(k.startswith("attention/") for k in out.results)


def test_snapshot_steps_out_of_range_fail_before_any_work(tmp_path):
    cfg = compose_cfg(["mode=[attention]", "sampler.num_inference_steps=10", "mode.attention.steps=[5,15]",
                       "model=hub", "features=[shapes_net]", "dataset=shapes", "model.path=/nonexistent"], tmp_path / "out")
    with pytest.raises(UserError, match=r"mode.attention.steps=\[5, 15\]: .* 0..9"):
        run_pipeline(cfg, tmp_path / "run")


def test_each_captioned_object_is_scored_with_its_own_words():
    """Both objects of a two-object caption are found (not only the first), also with a repeated colour."""
    from pipeline.stages.attention import object_word_positions

    words = "a yellow triangle on the left and a yellow circle on the right".split()
    objects = [("yellow", "triangle", "left"), ("yellow", "circle", "right")]
    assert object_word_positions(words, objects) == [(1, 2), (8, 9)]
    assert object_word_positions(words[:6], objects) == [(1, 2), None]  # truncated prompt: the second is not scored


def test_attention_overlays_have_one_colour_bar_on_a_fixed_scale():
    from pipeline.stages.attention import _overlay_figure, _resolution_figure

    image = np.zeros((16, 16, 3), dtype=np.uint8)
    maps = torch.rand(2, 16, 16) * 1e-3  # raw attention: drawn min-max normalised on 0..1, as scored
    fig = _overlay_figure(image, ["red", "circle"], {2: maps}, maps, "a red circle", 0.4)
    assert len(fig.axes) == 2 * 3 + 1 and "τ = 0.4" in fig.axes[-1].get_ylabel()  # the colour bar
    assert fig.axes[1].images[-1].get_clim() == (0.0, 1.0)
    res = _resolution_figure(image, ["red", "circle"], {(8, 8): maps, (2, 2): maps}, "a red circle", 0.4)
    assert len(res.axes) == 2 * 2 + 1
