"""Feature extractors: the interface, resizing, the FID Inception (random weights in the real file's layout),
CLIP and DINOv2 (tiny random-weight models saved locally). Offline; no downloaded weights."""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch
from conftest import features_cfg
from omegaconf import OmegaConf

from pipeline.errors import UserError
from pipeline.features import available_extractors, build_extractor, register_extractor, resize_images
from pipeline.features import base as features_base
from pipeline.features import inception as inc

pytestmark = pytest.mark.usefixtures("one_thread")


def images_u8(n=3, h=40, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------------------
# registry and input checks
# ----------------------------------------------------------------------------------------------------------
def test_unknown_extractor_lists_known_names():
    with pytest.raises(UserError, match="features.nope.name: unknown feature extractor 'nope'") as e:
        build_extractor(features_cfg(name="nope"), "cpu")
    for name in ("inception", "clip", "dinov2"):
        assert name in str(e.value)


def test_register_extractor_round_trip():
    class Mean(features_base.FeatureExtractor):
        name, weights_id, input_size, outputs = "test_mean", "none", 8, ("pool",)

        def __init__(self, cfg):
            self.resize, self.batch_size = cfg.resize.value, cfg.batch_size

        def _forward(self, pixels):
            return {"pool": pixels.mean(dim=(2, 3))}

    builder = register_extractor("test_mean")(lambda cfg, device: Mean(cfg))
    try:
        with pytest.raises(ValueError, match="registered twice"):
            register_extractor("test_mean")(lambda cfg, device: None)
        ext = build_extractor(features_cfg(name="test_mean", resize="nearest", batch_size=2), "cpu")
        assert "test_mean" in available_extractors()
        x = torch.full((5, 3, 16, 16), 255, dtype=torch.uint8)
        out = ext(x)
        assert set(out) == {"pool"} and out["pool"].shape == (5, 3) and out["pool"].dtype == torch.float32
        assert torch.equal(out["pool"], torch.ones(5, 3))  # uint8 255 -> 1.0, batched 2+2+1
        assert ext.describe()["resize"] == "nearest"
    finally:
        assert features_base._EXTRACTORS.pop("test_mean") is builder


@pytest.mark.parametrize(
    "bad, err",
    [
        (torch.zeros(2, 4, 8, 8), "Expected RGB images of shape"),
        (torch.zeros(3, 8, 8), "Expected RGB images of shape"),
        (torch.full((1, 3, 8, 8), 2.0), r"Expected float images in \[0, 1\]"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.int32), "Expected uint8"),
    ],
)
def test_input_checks(bad, err):
    with pytest.raises(ValueError, match=err):
        features_base._check_images(bad)
    with pytest.raises(TypeError, match="torch.Tensor"):
        features_base._check_images(bad.numpy())


# ----------------------------------------------------------------------------------------------------------
# resizing
# ----------------------------------------------------------------------------------------------------------
def test_resize_closed_forms():
    row = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2).expand(1, 1, 2, 2).contiguous()
    # upsample 2 -> 4 along width; TF1 samples src = dst * in/out = 0, .5, 1, 1.5 (edge-clamped);
    # torch's half-pixel bilinear samples src = (dst + .5) * in/out - .5 = -.25, .25, .75, 1.25 (clamped)
    tf1 = resize_images(row, 4, "bilinear_tf1")[0, 0, 0]
    half_pixel = resize_images(row, 4, "bilinear")[0, 0, 0]
    assert torch.allclose(tf1, torch.tensor([0.0, 0.5, 1.0, 1.0]))
    assert torch.allclose(half_pixel, torch.tensor([0.0, 0.25, 0.75, 1.0]))
    assert torch.equal(resize_images(row, 4, "nearest")[0, 0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("mode", features_base.RESIZE_MODES)
def test_resize_modes_shape_range_identity(mode):
    x = torch.rand(2, 3, 13, 17, generator=torch.Generator().manual_seed(1))
    out = resize_images(x, 29, mode)
    assert out.shape == (2, 3, 29, 29)
    if mode == "bicubic_tf2":  # TF2 does not clamp (CMMD's embeddings see the overshoot): neither do we
        assert -0.3 < out.min() < 0 or 1 < out.max() < 1.3
    else:
        assert out.min() >= 0 and out.max() <= 1  # bicubic overshoot is clamped
    square = x[..., :13, :13]
    assert resize_images(square, 13, mode) is square  # already the right size: untouched
    # one image's result does not depend on the rest of the batch
    assert torch.allclose(resize_images(x[:1], 29, mode), out[:1], atol=1e-6)


def test_resize_center_crop_keeps_the_middle():
    x = torch.zeros(1, 1, 8, 16)
    x[..., 4:12] = 1.0  # the central 8x8 square is white, the sides black
    out = resize_images(x, 4, "nearest", center_crop=True)
    assert out.shape == (1, 1, 4, 4) and torch.equal(out, torch.ones_like(out))
    stretched = resize_images(x, 4, "nearest")
    assert stretched.mean() == 0.5


def test_unknown_resize_mode():
    with pytest.raises(ValueError, match="features.resize: 'lanczos'"):
        resize_images(torch.zeros(1, 3, 4, 4), 8, "lanczos")


# ----------------------------------------------------------------------------------------------------------
# FID Inception
# ----------------------------------------------------------------------------------------------------------
# Names and shapes of tensors in weights-inception-2015-12-05-6726825d.pth, from torch-fidelity's
# utils/util_convert_inception_weights.py (TF graph name -> PyTorch key) and FeatureExtractorInceptionV3.
KNOWN_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch_pool.bn.running_mean": (64,),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch3x3dbl_1.conv.weight": (448, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.bias": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
NUM_CONV_BN = 94  # 5 stem + 3x7 (5b-d) + 4 (6a) + 4x10 (6b-e) + 6 (7a) + 2x9 (7b, 7c)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A random-weight state dict saved like the real file: no num_batches_tracked, non-trivial BN stats."""
    torch.manual_seed(0)
    net = inc.FIDInceptionV3()
    state = {}
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith("running_mean"):
            v = torch.randn_like(v) * 0.1
        elif k.endswith("running_var"):
            v = torch.rand_like(v) + 0.5
        state[k] = v.clone()
    path = tmp_path_factory.mktemp("inception") / inc.WEIGHTS_FILE
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def inception(inception_file):
    path, _ = inception_file
    return build_extractor(features_cfg(name="inception", weights_path=str(path), batch_size=2), "cpu")


def test_inception_state_dict_layout_matches_real_file(inception_file):
    _, state = inception_file
    assert len(state) == NUM_CONV_BN * 5 + 2  # conv.weight + 4 BN tensors each, fc.weight, fc.bias
    for key, shape in KNOWN_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert not any("AuxLogits" in k or "num_batches_tracked" in k for k in state)


def test_inception_outputs_and_determinism(inception, inception_file):
    path, state = inception_file
    x = images_u8(3, 64, 64)
    out = inception(x)
    assert set(out) == {"pool", "logits"}
    assert out["pool"].shape == (3, 2048) and out["logits"].shape == (3, 1008)
    assert out["pool"].dtype == torch.float32 and torch.isfinite(out["pool"]).all()
    assert (out["pool"] >= 0).all()  # average of ReLU outputs
    # IS logits are torch-fidelity's logits_unbiased: no fc bias
    assert torch.allclose(out["logits"], out["pool"] @ state["fc.weight"].T, rtol=1e-4, atol=1e-4)
    # deterministic, and independent of batch composition (batch_size=2 splits 3 images 2+1)
    again = inception(x)
    assert torch.equal(out["pool"], again["pool"])
    alone = inception(x[2:])
    assert torch.allclose(alone["pool"], out["pool"][2:], rtol=1e-4, atol=1e-5)
    # float [0, 1] input == uint8 / 255
    as_float = inception(x[:1].float() / 255)
    assert torch.allclose(as_float["pool"], out["pool"][:1], rtol=1e-4, atol=1e-5)
    # identity for caches and scores
    assert inception.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert inception.describe() == {
        "name": "inception",
        "weights_id": inception.weights_id,
        "resize": "bilinear",
        "input_size": 299,
        "center_crop": False,
    }


def test_inception_block_shapes(inception):
    seen = {}

    def hook(name):
        def record(module, inputs, output):
            seen[name] = tuple(output.shape)

        return record

    names = ("Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c")
    hooks = [getattr(inception.net, name).register_forward_hook(hook(name)) for name in names]
    try:
        inception(images_u8(1, 299, 299))
    finally:
        for h in hooks:
            h.remove()
    assert seen == {
        "Conv2d_4a_3x3": (1, 192, 71, 71),
        "Mixed_5d": (1, 288, 35, 35),
        "Mixed_6e": (1, 768, 17, 17),
        "Mixed_7c": (1, 2048, 8, 8),
    }
    assert inception.net.Mixed_7b.pool == "avg" and inception.net.Mixed_7c.pool == "max"


def test_inception_safetensors_and_resize_mode(inception_file, inception, tmp_path):
    from safetensors.torch import save_file

    _, state = inception_file
    path = tmp_path / "inception.safetensors"
    save_file(state, str(path))
    ext = build_extractor(features_cfg(name="inception", weights_path=str(path), resize="bicubic_antialias"), "cpu")
    assert ext.resize == "bicubic_antialias" and ext.weights_id != inception.weights_id
    x = images_u8(1, 64, 64)
    assert not torch.allclose(ext(x)["pool"], inception(x)["pool"])  # the mode changes the features
    x299 = images_u8(1, 299, 299)
    assert torch.allclose(ext(x299)["pool"], inception(x299)["pool"], atol=1e-5)  # ...unless no resize happens


def test_inception_missing_weights_messages(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(UserError, match="features.inception.weights_path") as e:
        build_extractor(features_cfg(name="inception", weights_path=str(missing)), "cpu")
    assert str(missing) in str(e.value) and inc.WEIGHTS_FILE in str(e.value)

    # no path, nothing cached, offline: says which file, from where, to put where
    monkeypatch.setenv("DIFFUSION_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        build_extractor(features_cfg(name="inception"), "cpu")
    msg = str(e.value)
    assert inc.WEIGHTS_URL in msg and str(tmp_path / "cache" / inc.WEIGHTS_FILE) in msg
    assert "features.inception.weights_path=" in msg and "offline" in msg

    # online but unreachable: the same instructions, with the reason
    monkeypatch.setattr(inc, "WEIGHTS_URL", "http://127.0.0.1:9/weights.pth")
    with pytest.raises(UserError, match="download failed") as e:
        inc.find_weights(None, download=True)
    assert not (tmp_path / "cache" / inc.WEIGHTS_FILE).exists()


def test_inception_cached_copy_is_found(inception_file, tmp_path, monkeypatch):
    path, _ = inception_file
    monkeypatch.setenv("DIFFUSION_LENS_CACHE", str(tmp_path))
    (tmp_path / inc.WEIGHTS_FILE).symlink_to(path)
    assert inc.find_weights(None, download=False) == tmp_path / inc.WEIGHTS_FILE


def test_inception_weights_are_verified_against_the_pin_table(inception_file, tmp_path, monkeypatch, caplog):
    """A pinned hash refuses a corrupt copy (cached or downloaded), naming the file and both hashes, and never leaves
    a partial or mismatching download in place; an unpinned file's hash is logged."""
    import logging

    path, _ = inception_file
    genuine = inc.file_sha256(path)
    monkeypatch.setenv("DIFFUSION_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    bad = inc.file_sha256(corrupt)
    monkeypatch.setattr(inc, "PINNED_SHA256", {inc.WEIGHTS_FILE: genuine})
    # a download that does not match the pin: refused, nothing left at the destination
    monkeypatch.setattr(inc, "WEIGHTS_URL", corrupt.as_uri())
    with pytest.raises(UserError) as e:
        inc.find_weights(None, download=True)
    assert inc.WEIGHTS_FILE in str(e.value) and genuine in str(e.value) and bad in str(e.value)
    assert not list((tmp_path / "cache").iterdir())
    # the genuine file downloads and is kept
    monkeypatch.setattr(inc, "WEIGHTS_URL", path.as_uri())
    assert inc.find_weights(None, download=True) == tmp_path / "cache" / inc.WEIGHTS_FILE
    # a corrupted cached copy is refused too
    (tmp_path / "cache" / inc.WEIGHTS_FILE).write_bytes(corrupt.read_bytes())
    with pytest.raises(UserError, match=bad):
        inc.find_weights(None, download=False)
    # unpinned: loads, and its hash is logged
    monkeypatch.setattr(inc, "PINNED_SHA256", {})
    with caplog.at_level(logging.INFO, logger=inc.__name__):
        inc.find_weights(str(corrupt))
    assert bad in caplog.text and "not pinned" in caplog.text


def test_inception_rejects_other_state_dicts(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"layer.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(UserError, match="not an FID Inception-v3 state dict.*missing keys"):
        build_extractor(features_cfg(name="inception", weights_path=str(path)), "cpu")
    with pytest.raises(UserError, match="features.inception.image_size"):
        build_extractor(features_cfg(name="inception", weights_path=str(path), image_size=224), "cpu")


# ----------------------------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------------------------
TINY_CONTEXT = 16


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from tiny import tiny_clip

    return tiny_clip(tmp_path_factory.mktemp("clip"), TINY_CONTEXT)


@pytest.fixture(scope="module")
def clip(clip_dir):
    return build_extractor(
        features_cfg(name="clip", model=str(clip_dir), resize="bicubic_antialias", batch_size=2), "cpu"
    )


def test_clip_image_embeds_match_the_model(clip):
    x = images_u8(3, 32, 32)
    out = clip(x)
    assert set(out) == {"pool", "image_embeds"}
    assert out["image_embeds"].shape == (3, 16) and torch.equal(out["pool"], out["image_embeds"])
    # own torch preprocessing == CLIP's image path on explicitly normalised pixels
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        pooled = clip.model.vision_model(pixel_values=(x.float() / 255 - mean) / std).pooler_output
        expected = clip.model.visual_projection(pooled)
    assert torch.allclose(out["image_embeds"], expected, atol=1e-5)
    assert torch.equal(clip(x)["pool"], out["pool"])  # deterministic
    # other sizes go through resize + centre crop
    assert clip(images_u8(2, 40, 56))["pool"].shape == (2, 16)
    assert clip.input_size == 32 and clip.describe()["model"] == clip.source and len(clip.weights_id) == 12


def test_clip336_is_cmmds_embedding_whole_image_tf2_bicubic_normalised(clip_dir):
    from pipeline.features.base import resize_images

    ex = build_extractor(features_cfg(name="clip336", model=str(clip_dir), resize="bicubic_tf2", batch_size=2), "cpu")
    x = images_u8(2, 40, 56)  # not square: stretched to 32 × 32, never cropped
    out = ex(x)
    assert torch.equal(out["pool"], out["image_embeds"]) and torch.allclose(out["pool"].norm(dim=1), torch.ones(2))
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    pixels = resize_images(x.float() / 255, 32, "bicubic_tf2")
    with torch.no_grad():
        e = ex.model.visual_projection(ex.model.vision_model(pixel_values=(pixels - mean) / std).pooler_output)
    assert torch.allclose(out["pool"], e / e.norm(dim=1, keepdim=True), atol=1e-5)
    assert ex.describe()["center_crop"] is False and ex.describe()["resize"] == "bicubic_tf2"
    # TF2 bicubic keeps a constant image constant (taps outside the image dropped and renormalised)
    assert torch.allclose(resize_images(torch.full((1, 3, 5, 7), 0.3), 11, "bicubic_tf2"), torch.tensor(0.3))


def test_clip_text_embeds_and_truncation(clip, caplog):
    short = ["a red square", "b"]
    emb = clip.text_embeds(short)
    assert emb.shape == (2, 16) and emb.dtype == torch.float32
    assert clip.num_truncated == 0
    assert torch.allclose(clip.text_embeds(short[:1]), emb[:1], atol=1e-5)  # padding does not change it

    long_prompt = "x" * (2 * TINY_CONTEXT)  # one token per letter: far beyond the tiny context
    with caplog.at_level(logging.WARNING):
        emb = clip.text_embeds([long_prompt, "a red square"])
    assert emb.shape == (2, 16) and torch.isfinite(emb).all()
    assert clip.num_truncated == 1 and clip.count_truncated([long_prompt, "b"]) == [0]
    assert "1 of 2 prompts exceed 16 tokens" in caplog.text
    # the Hugging Face tokenizer keeps end-of-text when truncating (CLIP pools at that token)
    ids = clip.tokenizer([long_prompt], truncation=True, max_length=clip.max_text_tokens)["input_ids"][0]
    assert len(ids) == TINY_CONTEXT and ids[-1] == clip.tokenizer.eos_token_id


def test_hub_id_offline_names_the_key(tmp_path):
    with pytest.raises(UserError, match="features.clip.model: 'no-such-org/no-such-clip'.*HF_HUB_OFFLINE"):
        build_extractor(features_cfg(name="clip", model="no-such-org/no-such-clip"), "cpu")
    with pytest.raises(UserError, match="features.dinov2.model: .* is not a model directory"):
        build_extractor(features_cfg(name="dinov2", model=str(tmp_path / "missing" / "dir")), "cpu")
    with pytest.raises(UserError, match="features.dinov2.model: no \\*.safetensors weights"):
        build_extractor(features_cfg(name="dinov2", model=str(tmp_path)), "cpu")


# ----------------------------------------------------------------------------------------------------------
# DINOv2
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2
    )
    path = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(config).save_pretrained(path)
    return path


def test_dinov2_pool_is_the_normalised_cls_token(dinov2_dir):
    ext = build_extractor(
        features_cfg(name="dinov2", model=str(dinov2_dir), image_size=16, batch_size=2, resize="bicubic_antialias"),
        "cpu",
    )
    x = images_u8(3, 20, 20)
    out = ext(x)
    assert set(out) == {"pool"} and out["pool"].shape == (3, 32)
    assert torch.equal(ext(x)["pool"], out["pool"])
    pixels = resize_images(x.float() / 255, 16, "bicubic_antialias")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = ext.model(pixel_values=(pixels - mean) / std).last_hidden_state
    assert torch.allclose(out["pool"], hidden[:, 0], atol=1e-5)  # last_hidden_state is post-LayerNorm
    with pytest.raises(UserError, match="features.dinov2.image_size: 20 is not a multiple"):
        build_extractor(features_cfg(name="dinov2", model=str(dinov2_dir), image_size=20), "cpu")


# ----------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["inception", "clip", "dinov2"])
def test_feature_configs_compose(name):
    from conftest import compose_cfg

    cfg = compose_cfg([f"features=[{name}]"]).features[name]
    assert cfg.name == name and name in available_extractors()
    assert cfg.resize.value in features_base.RESIZE_MODES


# ----------------------------------------------------------------------------------------------------------
# every override a message suggests is one the command line accepts (issue 24)
# ----------------------------------------------------------------------------------------------------------
def _suggested_overrides(message: str) -> list[str]:
    """``features.<name>.<field>=VALUE`` and ``features=[...]`` overrides a message suggests."""
    import re

    return re.findall(r"(?<![\w.])(features\.[\w.]+=[^\s;,():]+|features=\[[\w,]+\])", message)


def test_every_suggested_features_override_composes(tmp_path, monkeypatch, caplog, clip_dir, dinov2_dir):
    """Each override a features message suggests, fed back with the options of the run that got the message,
    composes through the CLI's own checks and sets that key (``features.weights_path=…`` did not: features holds
    one block per extractor)."""
    from pipeline.config import compose_config

    monkeypatch.setenv("DIFFUSION_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = ["model=hub", f"model.path={tmp_path}"]  # model=hub selects features=[inception]
    cases = [  # (options of the run, how the message arises)
        (hub, lambda: build_extractor(features_cfg(name="inception"), "cpu")),  # offline, no cached weights
        (hub, lambda: build_extractor(features_cfg(name="inception", weights_path=str(tmp_path / "no.pth")), "cpu")),
        (
            hub,
            lambda: build_extractor(
                features_cfg(name="inception", weights_path=str(tmp_path / "no.pth"), image_size=224), "cpu"
            ),
        ),
        (["features=[clip]"], lambda: build_extractor(features_cfg(name="clip", model="no-such-org/clip"), "cpu")),
        (
            ["features=[dinov2]"],
            lambda: build_extractor(features_cfg(name="dinov2", model=str(dinov2_dir), image_size=20), "cpu"),
        ),
        ([], lambda: build_extractor(features_cfg(name="nope"), "cpu")),
    ]
    messages = []
    for options, make in cases:
        with pytest.raises(UserError) as e:
            make()
        messages.append((options, str(e.value)))
    with caplog.at_level(logging.WARNING, logger="pipeline.features.clip"):  # a warning suggests one too
        build_extractor(features_cfg(name="clip", model=str(clip_dir), image_size=24), "cpu")
    messages.append((["features=[clip]"], caplog.text))
    for options, message in messages:
        suggested = _suggested_overrides(message)
        assert suggested, message
        for override in suggested:
            cfg = compose_config([*options, override])
            key, value = override.split("=", 1)
            if key != "features":
                got = OmegaConf.select(cfg, key)
                assert ("null" if got is None else str(got)) == value, (override, message)
    assert "features.inception.weights_path=/path/to/" in messages[0][1]
    with pytest.raises(UserError, match="did you mean features.inception.weights_path"):
        compose_config([*hub, "features.weights_path=/path/to/w.pth"])  # what the message used to suggest
