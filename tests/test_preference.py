"""Human-preference scorers (PickScore, HPS v2.1): the published formulas from the same weights, their exact
preprocessing, the softmax preference across candidates, and the offline / missing-package messages. Tiny
random-weight models in the real formats (tests/tiny/preference.py); offline. The HPS tests need open_clip (the
optional ``preference`` extra) and are skipped without it."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import features_cfg

from pipeline.errors import UserError
from pipeline.features import build_extractor
from pipeline.metrics.preference import (
    hps_scores,
    pairwise_preference,
    pickscore_scores,
    preference_probs,
    preference_scores,
)

PROMPTS = ["a red square", "b", "red red circle"]


pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_u8(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Images with image-like (smooth) content: random 8x-coarser colours, bilinearly upsampled."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(h // 8, 2), max(w // 8, 2), generator=g)
    return (F.interpolate(low, (h, w), mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------------------------------------
# the formulas
# ----------------------------------------------------------------------------------------------------------
def test_scores_are_scaled_cosines_of_the_pairs():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=1)
    assert torch.allclose(hps_scores(img, txt), cos, rtol=1e-12, atol=0)
    assert torch.allclose(pickscore_scores(img, txt, math.log(100.0)), 100 * cos, rtol=1e-12, atol=0)
    # scale-free in the embeddings' norms; negative cosines are kept (no clamp, unlike CLIP score)
    assert torch.allclose(preference_scores(3 * img, 0.5 * txt, 2.0), 2 * cos, rtol=1e-12, atol=0)
    assert hps_scores(img, -img).tolist() == pytest.approx([-1.0] * 5)
    with pytest.raises(ValueError, match="nonzero embeddings in `text_embeds`"):
        hps_scores(img, torch.zeros(5, 8))
    with pytest.raises(ValueError, match="same shape"):
        hps_scores(img, txt[:4])


def test_preference_is_a_softmax_across_candidates():
    scores = torch.tensor([21.3, 19.8, 22.1, 20.0])
    p = preference_probs(scores)
    assert p.dtype == torch.float64 and float(p.sum()) == pytest.approx(1.0, abs=1e-15)
    assert torch.allclose(p, torch.exp(scores.double()) / torch.exp(scores.double()).sum(), rtol=1e-12)
    perm = torch.tensor([2, 0, 3, 1])  # the candidates' order does not matter: probabilities permute with them
    assert torch.allclose(preference_probs(scores[perm]), p[perm], rtol=1e-14, atol=0)
    assert preference_probs([20.5, 20.5]).tolist() == [0.5, 0.5]  # equal scores: a coin flip
    assert preference_probs(torch.full((2, 3), 7.0)).tolist() == [[1 / 3] * 3] * 2  # per prompt (rows)
    # pairwise = the two-candidate softmax = logistic of the difference; symmetric
    a, b = torch.tensor([21.0, 20.0, 5.0]), torch.tensor([20.0, 20.0, 9.0])
    pw = pairwise_preference(a, b)
    assert torch.allclose(pw, torch.stack([preference_probs([x, y])[0] for x, y in zip(a, b)]), rtol=1e-12)
    assert torch.allclose(pw + pairwise_preference(b, a), torch.ones(3, dtype=torch.float64))
    assert pw[1] == 0.5
    with pytest.raises(ValueError, match="finite values in `scores`"):
        preference_probs([1.0, float("nan")])


# ----------------------------------------------------------------------------------------------------------
# PickScore
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pick_dir(tmp_path_factory):
    from tiny.preference import tiny_pickscore

    return tiny_pickscore(tmp_path_factory.mktemp("pickscore"))


@pytest.fixture(scope="module")
def pick(pick_dir):
    return build_extractor(features_cfg(name="pickscore", model=str(pick_dir), resize="bicubic_antialias"), "cpu")


def test_pickscore_is_the_models_logits_per_image(pick):
    """prompt_scores == CLIPModel(...).logits_per_image's diagonal (the model card's exp(logit_scale)·cos)."""
    x = smooth_u8(3, 32, 32)  # the model's size: no resize, so the reference takes the same pixels
    out = pick(x)
    assert set(out) == {"pool"} and out["pool"].shape == (3, 16)  # no image_embeds: not CLIP score's
    scores = pick.prompt_scores(out, x, PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (3,) and scores.device.type == "cpu"
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    enc = pick.tokenizer(PROMPTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        ref = pick.model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=(x / 255 - mean) / std
        ).logits_per_image.diagonal()
    assert rel_diff(scores, ref) <= 1e-5
    assert pick.logit_scale == pytest.approx(math.log(100.0), rel=1e-6) and pick.score_name == "pickscore"
    desc = pick.describe()
    assert (
        desc["name"] == "pickscore" and desc["model"] == str(pick.source) and desc["score_scale"] == pytest.approx(100)
    )
    with pytest.raises(ValueError, match="one prompt per image, got 2 prompts, 3 images"):
        pick.prompt_scores(out, x, PROMPTS[:2])


def test_pickscore_preprocessing_is_the_clip_processors(pick, pick_dir):
    """A non-square uint8 image: the pixels the model sees match transformers' CLIPImageProcessor (PIL bicubic,
    shortest side, centre crop) within PIL's uint8 rounding. Sizes where the long side scales to an integer:
    the processor truncates it (int), ``resize_images`` rounds."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(str(pick_dir))
    for h, w in ((40, 50), (45, 36)):
        x = smooth_u8(1, h, w, seed=h)
        seen = []
        forward = pick._forward
        pick._forward = lambda p: (seen.append(p), forward(p))[1]
        try:
            pool = pick(x)["pool"]
        finally:
            pick._forward = forward
        mine = (seen[0] - pick._mean) / pick._std
        ref = proc(images=[x[0].permute(1, 2, 0).numpy()], return_tensors="pt")["pixel_values"]
        assert mine.shape == ref.shape == (1, 3, 32, 32)
        assert float((mine - ref).abs().max()) < 0.03 and float((mine - ref).abs().mean()) < 0.008
        with torch.no_grad():
            e = pick.model.visual_projection(pick.model.vision_model(pixel_values=ref).pooler_output)
        assert float((pool - e).norm() / e.norm()) < 5e-3


def test_pickscore_offline_names_the_key_and_the_repo():
    with pytest.raises(UserError, match=r"features\.pickscore\.model: 'yuvalkirstain/PickScore_v1'.*huggingface-cli"):
        build_extractor(features_cfg(name="pickscore", model="yuvalkirstain/PickScore_v1"), "cpu")


# ----------------------------------------------------------------------------------------------------------
# HPS v2.1
# ----------------------------------------------------------------------------------------------------------
def test_hps_without_open_clip_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    with pytest.raises(
        UserError, match=r'features\.hpsv2: .*open-clip-torch.*pip install "diffusion-lens\[preference\]"'
    ):
        build_extractor(features_cfg(name="hpsv2", model="ViT-H-14", resize="bicubic_antialias"), "cpu")


def test_hps_checkpoint_is_read_tensors_only(tmp_path):
    """A pickle that would run code (any non-tensor object) is refused, never unpickled."""
    from pipeline.features.hpsv2 import load_hps_state_dict

    bad = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": _NotATensor()}, bad)
    with pytest.raises(UserError, match=r"features\.hpsv2\.weights_path: cannot read .*weights_only=True"):
        load_hps_state_dict(bad)
    good = tmp_path / "plain.pt"
    torch.save({"module.w": torch.ones(2, dtype=torch.float16)}, good)
    state = load_hps_state_dict(good)
    assert list(state) == ["w"] and state["w"].dtype == torch.float32


class _NotATensor:
    pass


def _open_clip():
    try:
        import open_clip
    except Exception as e:  # not installed, or a torchvision that cannot load against this torch
        pytest.skip(f"open_clip (the preference extra) does not import here: {type(e).__name__}: {str(e)[:80]}")
    return open_clip


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    _open_clip()
    from tiny.preference import tiny_hps

    return tiny_hps(tmp_path_factory.mktemp("hps"))


@pytest.fixture(scope="module")
def hps(hps_files):
    arch, checkpoint = hps_files
    cfg = features_cfg(name="hpsv2", model=str(arch), weights_path=str(checkpoint), resize="bicubic_antialias")
    return build_extractor(cfg, "cpu")


def _hps_reference_pixels(x_u8: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2's preprocess_val (hpsv2 1.2.0, light_augmentation=True) with torchvision on a PIL image: ToTensor,
    ResizeMaxSize(size) (longest side, bicubic, zero pad centred), Normalize(OpenAI mean/std)."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    img = Image.fromarray(x_u8.permute(1, 2, 0).numpy())
    t = TF.to_tensor(img)
    h, w = t.shape[1:]
    scale = size / float(max(h, w))
    new = tuple(round(d * scale) for d in (h, w))
    t = TF.resize(t, list(new), TF.InterpolationMode.BICUBIC)
    pad_h, pad_w = size - new[0], size - new[1]
    t = TF.pad(t, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(t, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])


def test_hps_is_img_scores_formula_with_its_preprocessing(hps, hps_files):
    """prompt_scores on non-square images == HPSv2's img_score.py: the checkpoint loaded by open_clip itself,
    HPSv2's letterbox preprocessing (torchvision), diag(image_features @ text_features.T) of the normalised
    features."""
    open_clip = _open_clip()
    arch, checkpoint = hps_files
    x = torch.cat([smooth_u8(1, 40, 56, seed=1), smooth_u8(1, 40, 56, seed=2), smooth_u8(1, 40, 56, seed=3)])
    out = hps(x)
    assert set(out) == {"pool"} and out["pool"].shape == (3, 16) and hps.score_name == "hpsv2"
    scores = hps.prompt_scores(out, x, PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (3,)

    ref_pixels = torch.stack([_hps_reference_pixels(img, 32) for img in x])
    assert torch.allclose(hps.preprocess(x), ref_pixels, atol=1e-5)  # the letterbox, exactly
    tall = smooth_u8(1, 56, 24, seed=4)  # the other orientation, odd padding
    assert torch.allclose(hps.preprocess(tall), _hps_reference_pixels(tall[0], 32)[None], atol=1e-5)

    ref_model = open_clip.create_model(f"local-dir:{arch}", pretrained=None, load_weights=False, output_dict=True)
    open_clip.load_checkpoint(ref_model, str(checkpoint))
    ref_model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{arch}")
    with torch.no_grad():
        o = ref_model(ref_pixels, tokenizer(PROMPTS))
        ref = torch.diagonal(o["image_features"] @ o["text_features"].T)
    assert rel_diff(scores, ref) <= 1e-5
    # the same tensors from .safetensors give the same scores
    cfg = features_cfg(
        name="hpsv2",
        model=str(arch),
        weights_path=str(checkpoint.with_suffix(".safetensors")),
        resize="bicubic_antialias",
    )
    other = build_extractor(cfg, "cpu")
    assert torch.equal(other.prompt_scores(other(x), x, PROMPTS), scores)
    assert hps.describe()["weights"] == "HPS_v2.1_compressed.pt" and len(hps.weights_id) == 12


def test_hps_missing_weights_names_the_key_and_the_file(hps_files, tmp_path, monkeypatch):
    arch, _ = hps_files
    missing = tmp_path / "nowhere" / "HPS_v2.1_compressed.pt"
    cfg = features_cfg(name="hpsv2", model=str(arch), weights_path=str(missing), resize="bicubic_antialias")
    with pytest.raises(
        UserError, match=r"features\.hpsv2\.weights_path: the HPS v2\.1 weights HPS_v2\.1_compressed\.pt"
    ):
        build_extractor(cfg, "cpu")
    # nothing set, offline, no copy anywhere: where to put it and the key to set
    for var, sub in (("DIFFUSION_LENS_CACHE", "dl"), ("HPS_ROOT", "hps"), ("HF_HOME", "hf")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = features_cfg(name="hpsv2", model=str(arch), resize="bicubic_antialias")
    with pytest.raises(UserError, match=r"offline and no cached copy.*huggingface-cli download xswu/HPSv2") as e:
        build_extractor(cfg, "cpu")
    assert f"{tmp_path / 'dl' / 'HPS_v2.1_compressed.pt'}" in str(e.value)
    assert "features.hpsv2.weights_path=/path/to/HPS_v2.1_compressed.pt" in str(e.value)
