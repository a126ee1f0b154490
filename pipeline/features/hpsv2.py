"""HPS v2.1 (Wu et al. 2023, "Human Preference Score v2"; github.com/tgxs002/HPSv2): OpenCLIP ViT-H/14 fine-tuned on
HPD v2 human choices, through ``open-clip-torch`` (optional: ``pip install "diffusion-lens[preference]"``).

Score of an (image, prompt) pair, as ``hpsv2/img_score.py`` computes it: the diagonal of
``image_features @ text_features.T`` on the model's L2-normalised features — ``cos(E_I, E_T)``, no logit scale
(``pipeline.metrics.preference.hps_scores``; scores read ≈ 0.2–0.35).

Preprocessing = HPSv2's ``preprocess_val``. ``img_score.py`` builds it with ``light_augmentation=True``, which in
HPSv2's open_clip fork (``hpsv2/src/open_clip/factory.py``, hpsv2 1.2.0) is ``image_transform(224, is_train=False,
resize_longest_max=True)``: ``ToTensor`` first, then ``ResizeMaxSize`` — the *longest* side to 224 (``round`` of the
other side), bicubic on the float tensor (torchvision ≥ 0.17: antialiased, not clamped), zero padding centred
(``pad // 2`` before) to 224 × 224 — then OpenAI's mean/std. Not open_clip 3.3's default transform (shortest side
+ centre crop): for square images the two agree; for others HPS letterboxes and open_clip crops. Here:
``features.hpsv2.resize`` (default ``bicubic_antialias``, torchvision's tensor resize; torchvision < 0.17, HPSv2's
own 2023 environment, resized without antialias: ``bicubic``); a non-square image whose longest side is already
224 is padded here (HPSv2 leaves it unpadded and its ViT then fails).

Text: open_clip's tokenizer for the architecture (SimpleTokenizer, lower-cased, 77 tokens; longer prompts are cut
and end with end-of-text, as HPSv2's ``tokenize``); truncations are logged and counted in ``num_truncated``.

Weights: ``HPS_v2.1_compressed.pt`` from the hub repo ``xswu/HPSv2`` (a ``{"state_dict": …}`` checkpoint for
open_clip ViT-H-14), read with ``torch.load(weights_only=True)`` only — no code in the pickle runs — or a
``.safetensors`` file with the same tensors. ``features.hpsv2.weights_path=FILE``; otherwise the file is looked for
in ``$DIFFUSION_LENS_CACHE`` (``~/.cache/diffusion-lens``), ``$HPS_ROOT`` (``~/.cache/hpsv2``) and the Hugging Face
cache, then downloaded from the hub when online. The architecture is built with ``pretrained=None`` (no
download); ``features.hpsv2.model`` names it (default ``ViT-H-14``; a directory holding an ``open_clip_config.json``
also works, e.g. for tests).

One image pass gives ``pool`` = the projected image embedding (``encode_image``, not normalised): FD/KD/PR/DC on
HPS's space, and the image half of the score — ``prompt_scores`` adds only a text pass.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.features.base import (
    FeatureExtractor,
    PromptScorer,
    files_id,
    register_extractor,
    to_pixels,
)
from pipeline.features.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from pipeline.metrics.preference import hps_scores

__all__ = [
    "HPSv2Extractor",
    "HPS_ARCH",
    "HPS_HUB_REPO",
    "HPS_WEIGHTS_FILE",
    "find_hps_weights",
    "letterbox",
    "load_hps_state_dict",
]

log = logging.getLogger(__name__)

HPS_ARCH = "ViT-H-14"
HPS_HUB_REPO = "xswu/HPSv2"
HPS_WEIGHTS_FILE = "HPS_v2.1_compressed.pt"
INSTALL_HINT = 'pip install "diffusion-lens[preference]"'
# torch interpolate modes the letterbox resize can use (the TF emulations resize to squares only)
_LETTERBOX_MODES = ("bicubic_antialias", "bicubic", "bilinear_antialias", "bilinear", "nearest")


# ----------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------
def _default_dirs() -> list[Path]:
    return [
        Path(os.environ.get("DIFFUSION_LENS_CACHE", "~/.cache/diffusion-lens")).expanduser(),
        Path(os.environ.get("HPS_ROOT", "~/.cache/hpsv2")).expanduser(),  # where the hpsv2 package keeps it
    ]


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("DIFFUSION_LENS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _missing_message(key: str, reason: str) -> str:
    where = _default_dirs()[0] / HPS_WEIGHTS_FILE
    return (
        f"{key}: the HPS v2.1 weights {HPS_WEIGHTS_FILE} are needed ({reason}). On a connected machine run "
        f"`huggingface-cli download {HPS_HUB_REPO} {HPS_WEIGHTS_FILE} --local-dir DIR`, then either put the file at "
        f"{where} or pass {key}=/path/to/{HPS_WEIGHTS_FILE} (a .safetensors file with the same tensors works too)"
    )


def find_hps_weights(weights_path: str | None, key: str = "features.hpsv2.weights_path") -> Path:
    """The checkpoint: ``weights_path`` if given, else a cached copy, else a hub download (when online)."""
    if weights_path:
        p = Path(weights_path).expanduser()
        if not p.is_file():
            raise UserError(_missing_message(key, f"{str(p)!r} does not exist or is not a file"))
        return p
    for d in _default_dirs():
        if (d / HPS_WEIGHTS_FILE).is_file():
            return d / HPS_WEIGHTS_FILE
    offline = _offline()
    try:
        from huggingface_hub import hf_hub_download

        # the hub cache first; a download only when online
        return Path(hf_hub_download(HPS_HUB_REPO, HPS_WEIGHTS_FILE, local_files_only=offline))
    except Exception as e:  # offline and not cached, no network, HTTP error: the same fix
        reason = "offline and no cached copy" if offline else f"download failed: {type(e).__name__}"
        raise UserError(_missing_message(key, reason)) from e


def load_hps_state_dict(path: Path, key: str = "features.hpsv2.weights_path") -> dict[str, torch.Tensor]:
    """An open_clip state dict from ``.safetensors`` or a tensors-only ``.pt`` (``torch.load(weights_only=True)``),
    unwrapped from HPSv2's ``{"state_dict": …}`` and from a ``module.`` (DDP) prefix; tensors as float32."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"{key}: cannot read {str(path)!r} as a tensors-only checkpoint (.pt read with weights_only=True, or "
            f".safetensors): {type(e).__name__}: {e}"
        ) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(
            f"{key}: {str(path)!r} holds no state dict of tensors (expected HPSv2's {{'state_dict': …}} checkpoint)"
        )
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


# ----------------------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------------------
def letterbox(x: torch.Tensor, size: int, mode: str = "bicubic_antialias") -> torch.Tensor:
    """HPSv2's ``ResizeMaxSize``: float (N, C, H, W) → (N, C, size, size); longest side to ``size`` (the other
    ``round(side · size / longest)``, Python's round as HPSv2), ``mode`` (``F.interpolate``, align_corners=False, not
    clamped — torchvision's resize of a float tensor), then zero padding, ``pad // 2`` on the top / left."""
    if mode not in _LETTERBOX_MODES:
        raise ValueError(f"letterbox: {mode!r} is not a resize mode here; expected one of {list(_LETTERBOX_MODES)}")
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    if (new_h, new_w) != (h, w):
        base, _, aa = mode.partition("_")
        if base == "nearest":
            x = F.interpolate(x, size=(new_h, new_w), mode="nearest")
        else:
            x = F.interpolate(x, size=(new_h, new_w), mode=base, align_corners=False, antialias=bool(aa))
    pad_h, pad_w = size - new_h, size - new_w
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return x


# ----------------------------------------------------------------------------------------------------------
# the extractor
# ----------------------------------------------------------------------------------------------------------
def _import_open_clip(key: str):
    try:
        import open_clip
    except Exception as e:  # ImportError, or torchvision failing to load its ops against this torch
        raise UserError(
            f"{key}: HPS v2.1 runs through open-clip-torch (with torchvision), which did not import "
            f"[{type(e).__name__}: {e}]. Install the optional scorers: {INSTALL_HINT} (torchvision must match "
            f"the installed torch)"
        ) from e
    return open_clip


def _model_name(model: str | None, open_clip: Any, key: str) -> str:
    """An open_clip architecture name, or ``local-dir:DIR`` for a directory holding ``open_clip_config.json``."""
    model = model or HPS_ARCH
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "open_clip_config.json").is_file():
            raise UserError(f"{key}: {str(p)!r} is a directory without open_clip_config.json; expected {HPS_ARCH!r}")
        return f"local-dir:{p}"
    if model not in open_clip.list_models():
        raise UserError(
            f"{key}: {model!r} is not an open_clip architecture; HPS v2.1 is {HPS_ARCH!r} "
            f"({key}={HPS_ARCH}, or a directory with an open_clip_config.json)"
        )
    return model


class _DropRandomInitNotice(logging.Filter):
    """open_clip warns (on the root logger) that the model it built has random weights: here they are replaced
    by the HPS checkpoint right after, so the notice would only mislead."""

    NOTICES = ("No pretrained weights loaded", "Local config loaded, but no CLIP weights")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICES)


@contextlib.contextmanager
def _quiet_random_init():
    root, notice = logging.getLogger(), _DropRandomInitNotice()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


class HPSv2Extractor(PromptScorer, FeatureExtractor):
    """``pool`` (N, 1024) per image batch; ``prompt_scores`` = HPS v2.1 per (image, prompt)."""

    name = "hpsv2"
    score_name = "hpsv2"
    outputs = ("pool",)
    center_crop = False  # letterboxed instead (see the module docstring)

    def __init__(
        self,
        model: str | None = HPS_ARCH,
        weights_path: str | Path | None = None,
        resize: str = "bicubic_antialias",
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        key: str = "features.hpsv2",
    ):
        if resize not in _LETTERBOX_MODES:
            raise UserError(
                f"{key}.resize: {resize!r} cannot letterbox (HPSv2 resizes the longest side); expected one of "
                f"{list(_LETTERBOX_MODES)} (HPSv2 with torchvision >= 0.17: bicubic_antialias)"
            )
        open_clip = _import_open_clip(key)
        self.source = model or HPS_ARCH
        arch = _model_name(model, open_clip, f"{key}.model")
        path = find_hps_weights(None if weights_path is None else str(weights_path), f"{key}.weights_path")
        try:  # the architecture only: pretrained=None / load_weights=False never download
            with _quiet_random_init():
                net = open_clip.create_model(arch, pretrained=None, load_weights=False, precision="fp32", device="cpu")
        except Exception as e:
            raise UserError(f"{key}.model: cannot build open_clip {arch!r}: {type(e).__name__}: {e}") from e
        state = load_hps_state_dict(path, f"{key}.weights_path")
        if "logit_scale" in state and state["logit_scale"].ndim != net.logit_scale.ndim:
            state["logit_scale"] = state["logit_scale"].reshape(net.logit_scale.shape)
        expected = set(net.state_dict())
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise UserError(
                f"{key}.weights_path: {str(path)!r} is not an open_clip {self.source} checkpoint "
                f"({HPS_WEIGHTS_FILE} layout): {len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
            )
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:  # shape mismatch: another architecture's checkpoint
            raise UserError(f"{key}.weights_path: {str(path)!r} does not fit {self.source}: {e}") from e
        self.device = torch.device(device)
        self.model = net.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.context_length = int(getattr(self.tokenizer, "context_length", 77))
        size = net.visual.image_size
        self.input_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        mean = getattr(net.visual, "image_mean", None) or OPENAI_CLIP_MEAN
        std = getattr(net.visual, "image_std", None) or OPENAI_CLIP_STD
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.weights_path = path
        self.weights_id = files_id([path])
        self.resize = resize
        self.batch_size = int(batch_size)
        self.num_truncated = 0

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "model": self.source,
            "weights": self.weights_path.name,
            "geometry": "letterbox",
            "score": "cos",
        }

    def _geometry(self, pixels: torch.Tensor) -> torch.Tensor:
        # HPSv2's light_augmentation: the longest side to the input size, zero padding to a square (no crop)
        return letterbox(pixels, self.input_size, self.resize)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 / [0, 1] (N, 3, H, W) → the normalised (N, 3, S, S) pixels HPSv2's ``preprocess_val`` gives."""
        return self._normalise(self._geometry(to_pixels(images.to(self.device))))

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self._mean) / self._std

    def _forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pool": self.model.encode_image(self._normalise(pixels))}

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, E) projected text features (``encode_text``, float32, CPU, not normalised); warns on truncation."""
        prompts = list(prompts)
        encode = getattr(self.tokenizer, "encode", None)
        if encode is not None:  # SimpleTokenizer: + start and end of text
            long = [p for p in prompts if len(encode(p)) + 2 > self.context_length]
            if long:
                self.num_truncated += len(long)
                log.warning(
                    "HPS text limit: %d of %d prompts exceed %d tokens and were truncated (their score ignores the "
                    "cut words), e.g. %r",
                    len(long),
                    len(prompts),
                    self.context_length,
                    long[0][:120],
                )
        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                tokens = self.tokenizer(prompts[start : start + self.batch_size]).to(self.device)
                out.append(self.model.encode_text(tokens).float().cpu())
        return torch.cat(out) if out else torch.empty(0, int(self.model.text_projection.shape[-1]))

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        return self.text_features(prompts)

    def _scores(self, pool: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return hps_scores(pool, text)


@register_extractor("hpsv2")
def build_hpsv2(cfg: Any, device: torch.device) -> HPSv2Extractor:
    key = f"features.{cfg.name}"
    size = getattr(cfg, "image_size", None)
    if size is not None:
        raise UserError(f"{key}.image_size: HPS v2.1 takes the model's own size (224); leave it null, got {size}")
    resize = getattr(cfg.resize, "value", cfg.resize)
    return HPSv2Extractor(
        cfg.model, weights_path=cfg.weights_path, resize=resize, batch_size=cfg.batch_size, device=device, key=key
    )
