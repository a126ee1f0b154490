"""Attention capture on every text-to-image family (tiny random-weight pipelines): the probabilities are right
(CFG half, float32 in bf16, joint-attention block against a hand computation), images unchanged, processors
restored, token offsets with and without a start token, solver-step snapshots, refusals, the real-image protocol.
(mIoU bar on generated images: test_shapes_e2e.py.)"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import compose_cfg
from diffusers import DiffusionPipeline, UNet2DConditionModel
from tiny import _t5_tokenizer, tiny_family

from pipeline.errors import UserError
from pipeline.models.adapter import AttentionLayout, ModelAdapter
from pipeline.models.generation import denoiser_call_steps, generators, sample
from pipeline.models.tokens import prompt_tokens
from pipeline.modes.attention import AttentionCapture, capture, cross_attention_layers, layer_grid
from pipeline.modes.attention.scoring import spatial_entropy
from pipeline.run.runner import run_pipeline

PROMPTS = ["a red circle on the left", "a blue square on the right and a green triangle on the left"]
TEXT_FAMILIES = ("sd", "sdxl", "pixart", "sd3", "sd3_no_t5", "flux")


def _load(path, **kw):
    extra = {"text_encoder_3": None, "tokenizer_3": None} if "sd3_no_t5" in str(path) else {}
    return DiffusionPipeline.from_pretrained(path, use_safetensors=True, **extra, **kw).to("cpu")


@pytest.fixture(scope="module")
def family_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: tiny_family(f, root / f) for f in (*TEXT_FAMILIES, "dit", "ddpm")}


@pytest.fixture(scope="module")
def sd(family_paths):
    return _load(family_paths["sd"])


def _size(model):
    return (32, 32) if model.family.name == "flux" else model.native_size()


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_capture_leaves_images_unchanged_restores_processors_and_rows_sum_to_one(family, family_paths):
    model = ModelAdapter(_load(family_paths[family]))
    h, w = _size(model)
    sampler = model.pipe.scheduler
    cond = model.condition(2, 4.0, h, w, prompts=PROMPTS)
    before = sample(model, sampler, cond, generators(0, [0, 1]), 3, h, w)
    originals = {k: type(v) for k, v in model.denoiser.attn_processors.items()}
    toks = [model.attention_layout(h, w).tokens(p) for p in PROMPTS]
    with capture(model, h, w, {1}, cfg=cond.cfg, valid_tokens=[t.num_tokens for t in toks]) as cap:
        during = sample(model, sampler, cond, generators(0, [0, 1]), 3, h, w)
    torch.testing.assert_close(before, during, atol=1e-5, rtol=0)
    assert {k: type(v) for k, v in model.denoiser.attn_processors.items()} == originals
    assert cap.max_row_sum_error < 1e-5
    agg = cap.aggregate()
    assert agg.device.type == "cpu" and agg.dtype == torch.float32
    assert agg.shape[:2] == (2, cap.layout.segment[1] - cap.layout.segment[0])
    assert tuple(agg.shape[2:]) == tuple(model.latent_shape(h, w)[1:])  # stored at latent resolution
    if cap.layout.renormalise:  # joint attention: each pixel's map sums to 1 over the segment's real tokens
        for i, t in enumerate(toks):
            sums = agg[i, : t.num_tokens].sum(0)
            torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
            assert agg[i, t.num_tokens :].abs().max() == 0
        assert 0 < float(cap.text_share().min()) and float(cap.text_share().max()) < 1
    with pytest.raises(RuntimeError, match="boom"):  # an error inside the block leaves the pipeline untouched
        with capture(model, h, w, prompts=PROMPTS):
            raise RuntimeError("boom")
    assert {k: type(v) for k, v in model.denoiser.attn_processors.items()} == originals


def test_sd3_joint_maps_equal_a_hand_computation_from_q_and_k(family_paths):
    """One joint layer, no CFG: the image-query → T5-key block of softmax(QKᵀ/√d) over all keys, head-averaged,
    renormalised over the prompt's real T5 tokens — computed here from the layer's own projections."""
    model = ModelAdapter(_load(family_paths["sd3"]))
    h, w = model.native_size()
    attn = model.denoiser.transformer_blocks[0].attn
    seen = {}
    hook = attn.register_forward_pre_hook(
        lambda m, args, kw: seen.update(x=kw["hidden_states"], c=kw["encoder_hidden_states"]), with_kwargs=True
    )
    cond = model.condition(1, 1.0, h, w, prompts=[PROMPTS[1]])
    layout = model.attention_layout(h, w)
    tok = layout.tokens(PROMPTS[1])
    x = torch.randn(1, *model.latent_shape(h, w), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture(model, h, w, prompts=[PROMPTS[1]]) as cap:
        model._forward(x, torch.tensor(500.0), cond)
    hook.remove()
    heads = attn.heads
    with torch.no_grad():

        def proj(linear, norm, t):  # (1, L, heads·d) -> (1, heads, L, d), then the optional q/k norm
            t = linear(t).view(1, -1, heads, linear.out_features // heads).transpose(1, 2)
            return t if norm is None else norm(t)

        q = torch.cat([proj(attn.to_q, attn.norm_q, seen["x"]), proj(attn.add_q_proj, attn.norm_added_q, seen["c"])], 2)
        k = torch.cat([proj(attn.to_k, attn.norm_k, seen["x"]), proj(attn.add_k_proj, attn.norm_added_k, seen["c"])], 2)
    n_img = seen["x"].shape[1]
    p = torch.softmax(q[:, :, :n_img].double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1).mean(1)
    s0, s1 = layout.segment
    block = p[0, :, n_img + s0 : n_img + s0 + tok.num_tokens]
    ref = block / block.sum(-1, keepdim=True)  # (HW, real T5 tokens)
    got = cap.aggregate()[0, : tok.num_tokens].flatten(1).T.double()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert layout.segment_name == "T5" and s0 == model.pipe.tokenizer_max_length  # T5 follows the 77 CLIP slots
    torch.testing.assert_close(cap.text_share().double(), p[0, :, n_img:].sum(-1).mean()[None], atol=1e-5, rtol=1e-5)


def test_joint_maps_read_the_same_block_in_either_token_order():
    """Flux's [text; image] order gives the maps SD3's [image; text] order gives for the same tokens."""
    from pipeline.modes.attention import joint_segment_maps

    g = torch.Generator().manual_seed(0)
    q_img, k_img, q_txt, k_txt = (torch.randn(2, 3, n, 8, generator=g) for n in (12, 12, 7, 7))
    valid = torch.tensor([[True] * 4 + [False], [True] * 5])
    sd3 = joint_segment_maps(
        torch.cat([q_img, q_txt], 2), torch.cat([k_img, k_txt], 2), (0, 12), (12, 19), (2, 7), valid
    )
    flux = joint_segment_maps(
        torch.cat([q_txt, q_img], 2), torch.cat([k_txt, k_img], 2), (7, 19), (0, 7), (2, 7), valid
    )
    torch.testing.assert_close(sd3[0], flux[0]) and torch.testing.assert_close(sd3[1], flux[1])
    torch.testing.assert_close(sd3[0].sum(-1), torch.ones(2, 12))
    assert sd3[0][0, :, 4].abs().max() == 0 and sd3[2] < 1e-6  # padding gets nothing; rows of the softmax sum to 1


def test_bf16_capture_on_cpu_passes_the_row_sum_guard_and_returns_cpu_float32(family_paths, tmp_path, outputs):
    out = run_pipeline(
        compose_cfg(
            [
                "model=hub",
                f"model.path={family_paths['sd']}",
                "model.dtype=bfloat16",
                "features=[shapes_net]",
                "dataset=shapes",
                "mode=[attention]",
                "sampler.num_inference_steps=3",
                "mode.attention.steps=[0,2]",
                "mode.attention.num_prompts=2",
                "mode.attention.num_reference=2",
            ],
            outputs,
        ),
        tmp_path / "run",
    )
    assert out.status == "FINISHED", out.error
    r = out.results
    assert 0 < r["attention/bos_share"] < 1 and 0 <= r["attention/entropy_late"] <= 1
    maps = np.load(tmp_path / "run" / "tables" / "attention_maps.npz")
    assert np.isfinite(maps["maps_0000"].astype(np.float32)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family, dtype", [("sdxl", "float16"), ("sd3", "bfloat16"), ("flux", "bfloat16")])
def test_attention_mode_on_cuda_in_half_precision(family, dtype, family_paths, tmp_path, outputs):
    """The stage finishes on CUDA in fp16/bf16: maps and images come back to the CPU, the row-sum guard holds."""
    out = _run(family_paths[family], tmp_path, outputs, [f"model.dtype={dtype}", "model.device=cuda"])
    assert out.status == "FINISHED", out.error
    assert np.isfinite(
        np.load(tmp_path / "run" / "tables" / "attention_maps.npz")["maps_0000"].astype(np.float32)
    ).all()


def test_snapshots_count_solver_steps_not_denoiser_calls(sd):
    """Heun calls the UNet twice per step: snapshot step s averages both calls of solver step s."""
    from diffusers import HeunDiscreteScheduler

    model = ModelAdapter(sd)
    h, w = model.native_size()
    heun = HeunDiscreteScheduler.from_config(sd.scheduler.config)
    calls = denoiser_call_steps(model, heun, 3, h, w)
    assert calls == [0, 0, 1, 1, 2]
    cond = model.condition(1, 1.0, h, w, prompts=PROMPTS[:1])
    with capture(model, h, w, {1, 2}, calls) as by_step:
        sample(model, heun, cond, generators(0, [0]), 3, h, w)
    with capture(model, h, w, set(range(5))) as by_call:  # no mapping: one snapshot per call
        sample(model, heun, cond, generators(0, [0]), 3, h, w)
    assert sorted(by_step.snapshots()) == [1, 2]
    per_call = by_call.snapshots()
    torch.testing.assert_close(by_step.snapshots()[1], (per_call[2] + per_call[3]) / 2, atol=1e-6, rtol=0)
    torch.testing.assert_close(by_step.snapshots()[2], per_call[4], atol=1e-6, rtol=0)


def test_memory_does_not_grow_with_steps(sd):
    model = ModelAdapter(sd)
    h, w = model.native_size()
    cond = model.condition(2, 5.0, h, w, prompts=PROMPTS)
    sizes = []
    for steps in (3, 9):
        with capture(model, h, w, {1, 2}, cfg=True) as cap:
            sample(model, sd.scheduler, cond, generators(0, [0, 1]), steps, h, w)
        sizes.append(cap.nbytes)
    assert sizes[0] == sizes[1]


def test_conditional_half_is_kept_under_cfg(sd):
    model = ModelAdapter(sd)
    h, w = model.native_size()
    x = torch.randn(2, *model.latent_shape(h, w), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with capture(model, h, w, {0}, cfg=True) as with_cfg:
            model.denoise(x, torch.tensor(500), model.condition(2, 5.0, h, w, prompts=PROMPTS), sd.scheduler)
        with capture(model, h, w, {0}, cfg=False) as cond_only:
            model.denoise(x, torch.tensor(500), model.condition(2, 1.0, h, w, prompts=PROMPTS), sd.scheduler)
    torch.testing.assert_close(with_cfg.snapshots()[0], cond_only.snapshots()[0], atol=1e-5, rtol=0)


def test_token_positions_with_and_without_a_start_token(sd):
    clip = prompt_tokens(sd.tokenizer, "a red circle")
    assert clip.words == ["a", "red", "circle"] and clip.positions == [[1], [2], [3]] and clip.start_token
    assert clip.num_tokens == 5 and not clip.truncated
    assert prompt_tokens(sd.tokenizer, "a zebu circle").positions[1:] == [[2, 3, 4, 5], [6]]  # spelled out
    long = prompt_tokens(sd.tokenizer, " ".join(["red"] * 30))  # the tokenizer's limit is 16
    assert long.truncated and len(long.words) == 14 and long.positions[-1] == [14] and long.num_tokens == 16
    t5 = prompt_tokens(_t5_tokenizer(), "a red circle", 120)  # T5: no start token, word i at position i
    assert t5.positions == [[0], [1], [2]] and not t5.start_token and t5.num_tokens == 4
    t5_long = prompt_tokens(_t5_tokenizer(), " ".join(["red"] * 30), 8)
    assert t5_long.truncated and t5_long.positions[-1] == [6]  # slot 7 is </s>


def test_sd2_style_linear_projection_unet_is_captured():
    unet = UNet2DConditionModel(
        sample_size=(6, 10),
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_dim=24,
        attention_head_dim=(2, 4),
        norm_num_groups=4,
        use_linear_projection=True,
        upcast_attention=True,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    x, t, text = torch.randn(2, 4, 6, 10), torch.tensor(10), torch.randn(2, 7, 24)
    plain = unet(x, t, encoder_hidden_states=text).sample
    layout = AttentionLayout("cross", tuple(cross_attention_layers(unet)), (6, 10), None, 7, (0, 7))
    with AttentionCapture(unet, layout, (6, 10), {0}) as cap:
        captured = unet(x, t, encoder_hidden_states=text).sample
    assert torch.allclose(plain, captured, atol=1e-5)
    assert set(cap.sums["probs"]) == {(6, 10), (3, 5)} and cap.aggregate().shape == (2, 7, 6, 10)
    assert layer_grid(4 * 3, (7, 5)) == (4, 3)  # odd sizes: padded convs round up
    assert spatial_entropy(torch.ones(4, 4)) == pytest.approx(1.0)


def _tags(out, outputs):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{outputs.resolve() / 'mlflow.db'}").get_run(out.run_id).data.tags


def _run(path, tmp_path, outputs, extra=()):
    size = ["sampler.height=32", "sampler.width=32"] if "flux" in str(path) else []
    cfg = compose_cfg(
        [
            "model=hub",
            "features=[shapes_net]",
            "dataset=shapes",
            "dataset.size=32",
            f"model.path={path}",
            "mode=[attention]",
            "sampler.num_inference_steps=3",
            "mode.attention.steps=[0,2]",
            "sampler.batch_size=2",
            "mode.attention.num_prompts=2",
            "mode.attention.num_reference=2",
            *size,
            *extra,
        ],
        outputs,
    )
    return run_pipeline(cfg, tmp_path / "run")


@pytest.mark.parametrize("family", ["sdxl", "pixart", "sd3_no_t5", "flux"])
def test_mode_runs_on_every_text_family_with_its_keys(family, family_paths, tmp_path, outputs):
    out = _run(family_paths[family], tmp_path, outputs)
    assert out.status == "FINISHED", out.error
    r = out.results
    assert r["attention/num_prompts"] == 2 and r["attention/num_scored"] >= 1 and "attention/miou" in r
    assert r["attention/num_reference_scored"] >= 1 and 0 <= r["attention/miou_reference"] <= 1
    joint, start = family in ("sd3_no_t5", "flux"), family in ("sdxl", "sd3_no_t5")
    assert ("attention/text_share" in r) == joint and ("attention/bos_share" in r) == start
    if not start:
        assert "start token" in _tags(out, outputs)["skipped.attention/bos_share"]
    maps = np.load(tmp_path / "run" / "tables" / "attention_maps.npz")
    assert maps["maps_0000"].shape[1:] == tuple(maps["latent_hw"])  # latent resolution, not image


@pytest.mark.parametrize("family, kind", [("dit", "class-conditional"), ("ddpm", "unconditional")])
def test_models_without_text_are_refused_before_any_work(family, kind, family_paths, tmp_path, outputs):
    cfg = compose_cfg(
        [
            "model=hub",
            "features=[shapes_net]",
            "dataset=shapes",
            f"model.path={family_paths[family]}",
            "mode=[attention,schedule]",
        ],
        outputs,
    )
    with pytest.raises(UserError, match=rf"needs a text-conditioned model: \w+Pipeline \({family}\) is {kind}"):
        run_pipeline(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "plots").exists()  # refused from model_index.json: nothing ran


def test_sd3_with_t5_maps_the_t5_segment_and_draws_its_overlays(family_paths, tmp_path, outputs):
    """SD3 with T5 through the mode (in-process: the command line is family-agnostic, tests/test_cli.py): the maps come
    from the T5 segment (no start token), output-space concept maps beside them, overlays drawn."""
    out = _run(family_paths["sd3"], tmp_path, outputs, ["mode.attention.figures=1", "mode.attention.num_reference=0"])
    assert out.status == "FINISHED", out.error
    r = out.results
    assert 0 < r["attention/text_share"] < 1 and "attention/bos_share" not in r  # T5 segment: no start token
    assert r["attention/num_concepts"] >= 1 and "attention/miou_output" in r
    for plot in ("attention_overlay_0", "attention_concepts_0", "attention_miou_layer_step"):
        assert (tmp_path / "run" / "plots" / f"{plot}.png").is_file(), plot


def test_folder_without_masks_reports_maps_and_skips_iou_with_tags(family_paths, tmp_path, outputs):
    from PIL import Image

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
    (root / "captions.jsonl").write_text(
        "".join(json.dumps({"file": f"{i}.png", "caption": PROMPTS[i]}) + "\n" for i in range(2))
    )
    cfg = compose_cfg(
        [
            "model=hub",
            f"model.path={family_paths['sd']}",
            "dataset=folder",
            f"dataset.root={root}",
            "features=[shapes_net]",
            "mode=[attention]",
            "sampler.num_inference_steps=2",
            "mode.attention.steps=[0,1]",
            "mode.attention.num_prompts=2",
        ],
        outputs,
    )
    out = run_pipeline(cfg, tmp_path / "run")
    assert out.status == "FINISHED", out.error
    assert "attention/bos_share" in out.results and "attention/entropy_late" in out.results
    assert not any(k.startswith("attention/miou") for k in out.results)
    tags = _tags(out, outputs)
    assert "skipped.attention/miou" in tags and "objects.jsonl" in tags["skipped.attention/miou_reference"]


def test_real_images_with_masks_localise_on_shapes_sd(tmp_path, outputs):
    """DAAM's real-image protocol on an exported shapes folder (masks/ + objects.jsonl): shapes_sd's maps of the
    reference images' own captions find the painted objects."""
    from pipeline.data.shapes import ShapesDataset, export

    export(ShapesDataset("test", 24), tmp_path / "folder")
    cfg = compose_cfg(
        [
            "model=shapes_sd",
            "dataset=folder",
            f"dataset.root={tmp_path / 'folder'}",
            "mode=[attention]",
            "mode.attention.num_prompts=4",
            "mode.attention.num_reference=24",
            "sampler.num_inference_steps=10",
            "mode.attention.steps=[1,8]",
        ],
        outputs,
    )
    out = run_pipeline(cfg, tmp_path / "run")
    assert out.status == "FINISHED", out.error
    r = out.results
    assert r["attention/num_reference_scored"] >= 30 and r["attention/miou_reference"] >= 0.4
    tags = _tags(out, outputs)
    assert "skipped.attention/miou" in tags  # generated images of a folder: no segmentation of them
    # zero-shot segmentation (mean-value threshold): the three numbers with bootstrap intervals; a UNet has no
    # output-space maps, said by a tag
    for key in ("seg_accuracy", "seg_miou", "seg_map"):
        low, value, high = (r[f"attention/{key}{s}"] for s in ("_ci_low", "", "_ci_high"))
        assert 0 <= low <= value <= high <= 1, key
    assert r["attention/seg_map"] > 0.5 and r["attention/seg_miou"] > 0.5, r  # the objects are found
    assert "separate text" in tags["skipped.attention/miou_output"]


def test_segmentation_scores_follow_the_mean_threshold_and_sklearn_average_precision():
    from pipeline.modes.attention.scoring import average_precision, segmentation_scores

    # distinct thresholds 0.9 (P 1, R 1/2) and 0.8 (P 2/3, R 1): AP = 1/2 + 1/2 · 2/3 (no interpolation)
    assert average_precision(np.array([0.9, 0.8, 0.8, 0.3]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    mask = np.zeros((8, 8), bool)
    mask[2:5, 1:4] = True
    perfect = segmentation_scores(torch.from_numpy(mask.astype(np.float32)), mask)
    assert perfect == (1.0, 1.0, 1.0)
    acc, miou, ap = segmentation_scores(torch.from_numpy((~mask).astype(np.float32)), mask)  # everything wrong
    assert acc == 0.0 and miou == 0.0 and ap == pytest.approx(mask.mean())


def test_each_captioned_object_is_scored_with_its_own_words():
    """Both objects of a two-object caption are found (not only the first), also with a repeated colour."""
    from pipeline.data.ground_truth import ObjectTruth, object_word_positions

    words = "a yellow triangle on the left and a yellow circle on the right".split()
    objects = [ObjectTruth(("yellow", "triangle"), "left"), ObjectTruth(("yellow", "circle"), "right")]
    assert object_word_positions(words, objects) == [[1, 2], [8, 9]]
    assert object_word_positions(words[:6], objects) == [[1, 2], None]  # truncated prompt: the second is not scored


def test_attention_overlays_have_one_colour_bar_on_a_fixed_scale():
    from pipeline.modes.attention.plots import overlay_figure, resolution_figure

    image = np.zeros((16, 16, 3), dtype=np.uint8)
    maps = torch.rand(2, 16, 16) * 1e-3  # raw attention: drawn min-max normalised on 0..1, as scored
    fig = overlay_figure(image, ["red", "circle"], {2: maps}, maps, "a red circle", 0.4)
    assert len(fig.axes) == 2 * 3 + 1 and "τ = 0.4" in fig.axes[-1].get_ylabel()  # the colour bar
    assert fig.axes[1].images[-1].get_clim() == (0.0, 1.0)
    res = resolution_figure(image, ["red", "circle"], {(8, 8): maps, (2, 2): maps}, "a red circle", 0.4)
    assert len(res.axes) == 2 * 2 + 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("mode.attention.steps=[5,15]", r"mode.attention.steps=\[5, 15\]: .* 0..9"),
        ("mode.attention.step_range=[4,12]", r"mode.attention.step_range=\[4, 12\]: .*stop <= 10"),
        ("mode.attention.layers=[3,1]", r"mode.attention.layers=\[3, 1\]: expected \[start, stop\)"),
        ("mode.attention.maps=[probs,outputs]", r"mode.attention.maps=.*subset of \['probs', 'output'\]"),
        ("mode.attention.concepts=['red car']", r"mode.attention.concepts=.*single words"),
    ],
)
def test_attention_options_out_of_range_fail_before_any_work(override, message, tmp_path):
    cfg = compose_cfg(
        [
            "mode=[attention]",
            "sampler.num_inference_steps=10",
            "mode.attention.steps=[1,5]",
            override,
            "model=hub",
            "features=[shapes_net]",
            "dataset=shapes",
            "model.path=/nonexistent",
        ],
        tmp_path / "out",
    )
    with pytest.raises(UserError, match=message):
        run_pipeline(cfg, tmp_path / "run")


@pytest.mark.parametrize("family", ["sd3", "sd35", "flux"])
def test_concepts_leave_the_image_unchanged_and_follow_the_blocks_own_text_path(family, family_paths, tmp_path):
    """ConceptAttention: with concepts the generated image is identical (the image never sees them), output-space
    maps are a softmax over the concepts, the probability maps do not change; and one block's concept step equals
    that block's own forward with the concepts as its text stream (the image half of that call discarded)."""
    path = family_paths[family] if family in family_paths else tiny_family(family, tmp_path / family)
    model = ModelAdapter(_load(path))
    h, w = _size(model)
    cond = model.condition(2, 4.0, h, w, prompts=PROMPTS)
    words = ["circle", "square", "triangle"]
    with torch.no_grad():
        with capture(model, h, w, {1}, cfg=cond.cfg, prompts=PROMPTS) as plain:
            a = sample(model, model.pipe.scheduler, cond, generators(0, [0, 1]), 3, h, w)
        with capture(model, h, w, {1}, cfg=cond.cfg, prompts=PROMPTS, concepts=words) as cap:
            b = sample(model, model.pipe.scheduler, cond, generators(0, [0, 1]), 3, h, w)
    assert torch.equal(a, b)
    torch.testing.assert_close(cap.aggregate(), plain.aggregate(), atol=0, rtol=0)
    out = cap.aggregate("output")
    assert out.shape == (2, len(words), *model.latent_shape(h, w)[1:])
    torch.testing.assert_close(out.sum(1), torch.ones_like(out[:, 0]), atol=1e-5, rtol=0)
    # one block by hand: the block's own forward with encoder_hidden_states := the concept tokens
    layout = model.attention_layout(h, w)
    block = model.denoiser.get_submodule(layout.concepts.blocks[0])
    attn, g = block.attn, torch.Generator().manual_seed(0)
    dim = attn.query_dim if hasattr(attn, "query_dim") else attn.to_q.in_features
    x, c, temb = (torch.randn(*s, generator=g) for s in ((1, 16, dim), (1, len(words), dim), (1, dim)))
    with torch.no_grad():
        kw = {}
        if family == "flux":  # rotary over [concepts at text position 0; image tokens]
            ids = torch.cat([torch.zeros(len(words), 3), model.pipe._prepare_latent_image_ids(1, 4, 4, "cpu", x.dtype)])
            kw["image_rotary_emb"] = model.denoiser.pos_embed(ids)
        c_ref, _ = block(hidden_states=x, encoder_hidden_states=c, temb=temb, **kw)
        norm_x = block.norm1(x, emb=temb)[0]
        heads = attn.heads
        k, v = (p(norm_x).view(1, 16, heads, -1).transpose(1, 2) for p in (attn.to_k, attn.to_v))
        k = k if attn.norm_k is None else attn.norm_k(k)
        if family == "flux":
            from diffusers.models.embeddings import apply_rotary_emb

            cos, sin = kw["image_rotary_emb"]
            rot = (cos[len(words) :], sin[len(words) :])
            k = apply_rotary_emb(k.transpose(1, 2), rot, sequence_dim=1).transpose(1, 2)
        c_ours, o = layout.concepts.step(block, c, k, v, {"temb": temb})
        pre_only = getattr(block, "context_pre_only", False)
        norm_c = block.norm1_context(c, temb) if pre_only else block.norm1_context(c, emb=temb)[0]
        _, ctx = attn(hidden_states=norm_x, encoder_hidden_states=norm_c, **kw)  # the stock processor
    torch.testing.assert_close(ctx, o if pre_only else attn.to_add_out(o), atol=1e-5, rtol=1e-5)
    if not pre_only:
        torch.testing.assert_close(c_ours, c_ref, atol=1e-5, rtol=1e-5)


def test_layer_and_step_ranges_choose_what_the_headline_maps_average(family_paths):
    """``layers``/``steps`` select the average; the per (layer, step) records are kept whatever the selection."""
    model = ModelAdapter(_load(family_paths["flux"]))
    h, w = _size(model)
    cond = model.condition(1, 1.0, h, w, prompts=PROMPTS[:1])
    layout = model.attention_layout(h, w)
    kw = dict(prompts=PROMPTS[:1], keep=[[1, 2]])
    with torch.no_grad(), capture(model, h, w, {1}, layers=(1, 2), steps=(1, 2), **kw) as cap:
        sample(model, model.pipe.scheduler, cond, generators(0, [0]), 3, h, w)
    records = cap.by_layer_step()
    assert set(records) == {(name, step) for name in layout.layers for step in range(3)}
    only = records[(layout.layers[1], 1)]  # the one selected cell: its kept tokens are the headline's
    torch.testing.assert_close(cap.aggregate()[:, [1, 2]], only, atol=2e-3, rtol=0)  # float16 records
    torch.testing.assert_close(cap.snapshots()[1][:, [1, 2]], only, atol=2e-3, rtol=0)
