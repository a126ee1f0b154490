"""The feature-extractor interface, the registry, and the helpers every extractor shares.

One extractor = one network behind one forward pass. ``extractor(images)`` takes a batch of RGB images —
uint8 ``(N, 3, H, W)`` in 0..255 or float in [0, 1], any H, W — and returns *everything* that pass serves:

=================  ========  ====================================================================
key                shape     used for
=================  ========  ====================================================================
``pool``           (N, D)    FD / KD / precision-recall / density-coverage
``logits``         (N, C)    Inception Score (only networks with a classifier)
``image_embeds``   (N, E)    CLIP score (CLIP only)
=================  ========  ====================================================================

Outputs are float32 on the CPU (they are accumulated across batches). Resizing to the network's input size
happens inside, with an explicit mode (``resize``) that is recorded with every score; an extractor is also
described by ``name``, ``weights_id`` (short content hash of its weights, for cache keys) and ``input_size``.

New extractors register a builder ``(features_cfg, device) -> FeatureExtractor`` with
``@register_extractor("name")`` in a module of this package; the package imports every module in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import pkgutil
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F

from pipeline.errors import UserError

__all__ = [
    "FeatureExtractor",
    "PromptScorer",
    "ResizeModeName",
    "RESIZE_MODES",
    "register_extractor",
    "build_extractor",
    "available_extractors",
    "resize_images",
    "to_pixels",
    "file_sha256",
    "files_id",
    "resolve_hf_model_dir",
    "load_hf_model",
    "read_preprocessor_config",
    "resolve_device",
]

log = logging.getLogger(__name__)

ResizeModeName = Literal[
    "bilinear", "bilinear_antialias", "bicubic", "bicubic_antialias", "nearest", "bilinear_tf1", "bicubic_tf2"
]
RESIZE_MODES: tuple[str, ...] = (
    "bilinear",
    "bilinear_antialias",
    "bicubic",
    "bicubic_antialias",
    "nearest",
    "bilinear_tf1",
    "bicubic_tf2",
)


# ----------------------------------------------------------------------------------------------------------
# the interface
# ----------------------------------------------------------------------------------------------------------
class FeatureExtractor(ABC):
    """Base class: input checks, batching, resizing and fp32 live here; subclasses write ``_forward``.

    Subclasses set ``name``, ``weights_id``, ``resize``, ``input_size`` (``int`` = square side),
    ``outputs`` (keys ``__call__`` returns), ``batch_size`` and ``device``, and implement
    ``_forward(pixels) -> dict`` on float32 images in [0, ``pixel_scale``] already resized to ``input_size``.
    """

    name: str
    weights_id: str
    resize: str
    input_size: int
    outputs: tuple[str, ...]
    batch_size: int = 64
    device: torch.device = torch.device("cpu")
    # True: shortest side to input_size, then centre crop (CLIP's own preprocessing geometry);
    # False: stretch to input_size x input_size (torch-fidelity's Inception, dgm-eval's DINOv2).
    center_crop: bool = False
    # 255: uint8 inputs stay exact integers through the resize (torch-fidelity's Inception works on 0..255)
    pixel_scale: float = 1.0

    @abstractmethod
    def _forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(n, 3, S, S) float32 in [0, ``pixel_scale``] on ``self.device`` -> outputs on any device."""

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = _check_images(images)
        chunks: dict[str, list[torch.Tensor]] = {k: [] for k in self.outputs}
        # no_grad, not inference_mode: callers may update the returned features in place
        with torch.no_grad(), _strict_fp32(self.device):
            for start in range(0, images.shape[0], self.batch_size):
                x = to_pixels(images[start : start + self.batch_size].to(self.device), scale=self.pixel_scale)
                out = self._forward(self._geometry(x))
                for k in self.outputs:
                    chunks[k].append(out[k].float().cpu())
        return {k: torch.cat(v) if v else torch.empty(0) for k, v in chunks.items()}

    def _geometry(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float pixels (n, 3, H, W) -> (n, 3, S, S) at ``input_size``: stretched, or shortest side + centre crop
        (``center_crop``); an extractor with another geometry (HPS's letterbox) overrides this."""
        return resize_images(pixels, self.input_size, self.resize, self.center_crop, (0.0, self.pixel_scale))

    def describe(self) -> dict[str, Any]:
        """What identifies these features: log it with every score and put it in cache keys."""
        return {
            "name": self.name,
            "weights_id": self.weights_id,
            "resize": self.resize,
            "input_size": self.input_size,
            "center_crop": self.center_crop,
        }

    def __repr__(self) -> str:
        desc = ", ".join(f"{k}={v!r}" for k, v in self.describe().items())
        return f"{type(self).__name__}({desc}, outputs={self.outputs})"


class PromptScorer:
    """The part of the extractor interface a human-preference scorer adds (``features=[pickscore]``, ``[hpsv2]``): the
    metrics stage logs ``metrics/<score_name>`` from :meth:`prompt_scores` of every generated batch. Subclasses give
    ``_text_features(prompts)`` and ``_scores(image_pool, text) -> (N,)`` (the published formula); the image side is
    the ``pool`` of the same batch's extractor outputs, so scoring adds only a text pass."""

    score_name: str

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def _scores(self, pool: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prompt_scores(self, outputs: dict[str, torch.Tensor], images: torch.Tensor, prompts: Sequence[str]):
        """The score of each image with its prompt, float32 (N,) on the CPU. ``outputs``: what ``self(images)``
        returned for these images."""
        pool = check_score_inputs(outputs, images, prompts, self.name)
        if not len(prompts):
            return torch.empty(0, dtype=torch.float32)
        return self._scores(pool, self._text_features(list(prompts))).float().cpu()


def check_score_inputs(outputs: dict[str, torch.Tensor], images: torch.Tensor, prompts: Sequence[str], name: str):
    """``outputs["pool"]``, after checking it pairs row for row with ``prompts`` (and ``images``)."""
    if "pool" not in outputs:
        raise KeyError(
            f"{name}.prompt_scores: expected the outputs of {name}(images) (a 'pool' entry), got {sorted(outputs)}"
        )
    pool = outputs["pool"]
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name}.prompt_scores: expected a list of prompt strings, one per image")
    n_images = images.shape[0] if images is not None else pool.shape[0]
    if not (pool.shape[0] == len(prompts) == n_images):
        raise ValueError(
            f"{name}.prompt_scores: expected one prompt per image, got {len(prompts)} prompts, {n_images} images "
            f"and {pool.shape[0]} embeddings"
        )
    return pool


def _check_images(images: Any) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"Expected images as a torch.Tensor (N, 3, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"Expected RGB images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"Expected uint8 (0..255) or float ([0, 1]) images, got dtype {images.dtype}")
    if images.is_floating_point() and images.numel():
        # NaN images are the metrics stage's business (counted and excluded); ignore them here
        finite = images[torch.isfinite(images)]
        if finite.numel() and (finite.min() < -1e-3 or finite.max() > 1 + 1e-3):
            raise ValueError(
                f"Expected float images in [0, 1], got values in [{finite.min().item():.3g}, "
                f"{finite.max().item():.3g}] (0..255 floats? pass uint8 or divide by 255)"
            )
    return images


@contextlib.contextmanager
def _strict_fp32(device: torch.device):
    """Disable TF32 for the duration of a forward pass on CUDA.

    cuDNN convolutions use TF32 by default on Ampere+ (10-bit mantissa), which makes features depend on the
    batch composition; FD/KD are sensitive to that. Restores the caller's settings afterwards.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9 API
        saved = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved
    else:
        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------------------
# pixels and resizing
# ----------------------------------------------------------------------------------------------------------
def to_pixels(images: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """uint8 0..255 or float [0, 1] -> float32 in [0, ``scale``].

    ``scale=255`` keeps uint8 values exact (torch-fidelity's Inception works on 0..255 floats).
    """
    if images.dtype == torch.uint8:
        x = images.float()
        return x if scale == 255.0 else x * (scale / 255.0)
    x = images.float()
    return x if scale == 1.0 else x * scale


def resize_images(
    images: torch.Tensor,
    size: int,
    mode: str,
    center_crop: bool = False,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Resize float (N, C, H, W) to (N, C, size, size) with an explicit ``mode``.

    * ``bilinear``: ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` (pytorch-fid;
      torchmetrics' FID with ``antialias=False`` and torch-fidelity use ``bilinear_tf1`` instead);
    * ``bilinear_antialias`` / ``bicubic_antialias``: the same with ``antialias=True`` (close to PIL; the
      antialias filter only matters when downsampling);
    * ``bicubic`` (no antialias), ``nearest``;
    * ``bilinear_tf1``: TensorFlow 1.x ``resize_bilinear(align_corners=False)``, the exact TF-FID /
      torch-fidelity resize: source = dest · in/out (no half-pixel shift), edge-clamped.
    * ``bicubic_tf2``: TensorFlow 2 ``tf.image.resize(method="bicubic", antialias=False)`` (CMMD's embedding
      code): Keys cubic with a = −0.5, half-pixel centres, taps outside the image dropped and the rest renormalised;
      not clamped (TF does not clamp either).

    Bicubic can overshoot; its output is clamped to ``value_range`` so pixels stay pixels (as PIL does). With
    ``center_crop`` the shortest side goes to ``size`` and the centre square is kept (CLIP's geometry);
    otherwise non-square images are stretched. Input already at the target size is returned unchanged.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"features.resize: {mode!r} is not a resize mode; expected one of {list(RESIZE_MODES)}")
    h, w = images.shape[-2:]
    if center_crop and h != w:
        short = min(h, w)
        # the long side truncated, as CLIP's processor (transformers' get_resize_output_image_size) and torchvision do
        target = (int(h * size / short), int(w * size / short))
        out = _resize(images, target, mode, value_range) if target != (h, w) else images
        top, left = (out.shape[-2] - size) // 2, (out.shape[-1] - size) // 2
        return out[..., top : top + size, left : left + size]
    if (h, w) == (size, size):
        return images
    return _resize(images, (size, size), mode, value_range)


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str, value_range: tuple[float, float]) -> torch.Tensor:
    if mode == "bilinear_tf1":
        return _resize_bilinear_tf1(x, size)
    if mode == "bicubic_tf2":
        return _resize_bicubic_tf2(x, size)
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    base, _, aa = mode.partition("_")
    out = F.interpolate(x, size=size, mode=base, align_corners=False, antialias=bool(aa))
    if base == "bicubic":
        out = out.clamp(*value_range)  # a fixed range, not the batch's min/max: images stay independent
    return out


def _keys_cubic_matrix(n_in: int, n_out: int, device: torch.device, a: float = -0.5) -> torch.Tensor:
    """(n_out, n_in) weights of TF2's half-pixel bicubic along one axis: source = (dest + ½)·in/out − ½, four taps
    around it with the Keys kernel, out-of-range taps dropped and the row renormalised to sum 1."""
    src = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
    base = src.floor()
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for tap in (-1, 0, 1, 2):
        idx = base + tap
        t = (src - idx).abs()
        w = torch.where(
            t <= 1,
            (a + 2) * t**3 - (a + 3) * t**2 + 1,
            torch.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, torch.zeros_like(t)),
        )
        inside = (idx >= 0) & (idx < n_in)
        rows = torch.arange(n_out)[inside]
        m.index_put_((rows, idx[inside].long()), w[inside], accumulate=True)
    return (m / m.sum(dim=1, keepdim=True)).to(device=device, dtype=torch.float32)


def _resize_bicubic_tf2(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF2 ``tf.image.resize(bicubic, antialias=False)``: separable Keys (a = −0.5) weights as two matmuls."""
    wh = _keys_cubic_matrix(x.shape[-2], size[0], x.device)
    ww = _keys_cubic_matrix(x.shape[-1], size[1], x.device)
    return torch.einsum("oh,nchw,pw->ncop", wh, x.float(), ww)


def _resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 ``resize_bilinear(align_corners=False, half_pixel_centers=False)``: src = dst · (in / out)."""

    def axis(n_in: int, n_out: int):
        src = torch.arange(n_out, dtype=torch.float32, device=x.device) * (n_in / n_out)
        lo = src.floor().long().clamp_max(n_in - 1)
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    (y0, y1, dy), (x0, x1, dx) = axis(x.shape[-2], size[0]), axis(x.shape[-1], size[1])
    top = x[..., y0, :]
    bottom = x[..., y1, :]
    rows = top + (bottom - top) * dy[:, None]
    left, right = rows[..., x0], rows[..., x1]
    return left + (right - left) * dx


# ----------------------------------------------------------------------------------------------------------
# weights identity and model resolution
# ----------------------------------------------------------------------------------------------------------
_HASH_MEMO: dict[tuple[str, int, int], str] = {}
_SHA256_BLOB = re.compile(r"^[0-9a-f]{64}$")


def file_sha256(path: str | os.PathLike) -> str:
    """Full sha256 hex of a file's content (memoised per path, size and mtime within the process)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASH_MEMO[key] = h.hexdigest()
    return _HASH_MEMO[key]


def files_id(paths: Iterable[str | os.PathLike], length: int = 12) -> str:
    """Short content hash of several weight files (order-independent).

    Files in a Hugging Face cache are symlinks to ``blobs/<sha256>``: that name *is* the content hash, so
    multi-GB checkpoints are not re-read.
    """
    digests = []
    for path in sorted(Path(p) for p in paths):
        target = path.resolve()
        digest = target.name if path.is_symlink() and _SHA256_BLOB.match(target.name) else file_sha256(target)
        digests.append(f"{path.name}:{digest}")
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:length]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$|^[A-Za-z0-9][\w.\-]*$")


def resolve_hf_model_dir(model: str | None, key: str, allow_patterns=None) -> Path:
    """A local directory for a hub id or local dir; offline and not cached -> ``UserError`` naming ``key`` (the
    config key as the command line spells it, ``features.<name>.model``: messages suggest ``key=DIR``)."""
    if not model:
        raise UserError(f"{key}: not set; expected a Hugging Face hub id or a local model directory")
    p = Path(model).expanduser()
    if p.is_dir():
        return p.resolve()
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if p.exists() or looks_like_path or not _HUB_ID.match(model):
        raise UserError(f"{key}: {model!r} is not a model directory (expected a local directory or a hub id)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=allow_patterns))
    except Exception as e:  # offline, unknown or gated repo: the same fix for the user
        raise UserError(
            f"{key}: {model!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"(offline: HF_HUB_OFFLINE=1 or no network). On a connected machine run "
            f"`huggingface-cli download {model} --local-dir DIR`, copy DIR here and set {key}=DIR "
            f"[{type(e).__name__}]"
        ) from e


# files an extractor needs from a hub repo: configs, tokenizer, safetensors weights (never pickles)
_HF_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]


def load_hf_model(model_cls: Any, model: str | None, key: str) -> tuple[Any, Path, str]:
    """``model_cls.from_pretrained`` on a hub id or local dir, safetensors only, fp32, eval mode.

    Returns ``(model, model_dir, weights_id)``; every failure is a ``UserError`` naming ``key``.
    """
    model_dir = resolve_hf_model_dir(model, key, allow_patterns=_HF_PATTERNS)
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
        extra = f" (found pickled {pickled}: convert them to safetensors)" if pickled else ""
        raise UserError(f"{key}: no *.safetensors weights in {str(model_dir)!r}{extra}")
    try:
        net = model_cls.from_pretrained(str(model_dir), use_safetensors=True)
    except Exception as e:
        raise UserError(
            f"{key}: cannot load a {model_cls.__name__} from {str(model_dir)!r}: {type(e).__name__}: {e}"
        ) from e
    # fp16 checkpoints are upcast: features are extracted in fp32
    net = net.to(torch.float32).eval().requires_grad_(False)
    return net, model_dir, files_id(weights)


def read_preprocessor_config(model_dir: Path, key: str) -> dict[str, Any]:
    """``preprocessor_config.json`` as a dict ({} when absent) — read directly, so no image processor (and no
    torchvision / PIL pipeline) is involved: preprocessing is done in torch by the extractor. ``key``: the model's
    config key (``features.<name>.model``), named by errors."""
    import json

    path = model_dir / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{key}: {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise UserError(f"{key}: {str(path)!r} holds a JSON {type(config).__name__}; expected a JSON object")
    return config


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------
Builder = Callable[[Any, torch.device], FeatureExtractor]
_EXTRACTORS: dict[str, Builder] = {}


def register_extractor(name: str) -> Callable[[Builder], Builder]:
    """Register ``builder(features_cfg, device) -> FeatureExtractor`` under ``features.name == name``."""

    def decorate(builder: Builder) -> Builder:
        if name in _EXTRACTORS and _EXTRACTORS[name] is not builder:
            raise ValueError(f"feature extractor {name!r} registered twice")
        _EXTRACTORS[name] = builder
        return builder

    return decorate


def available_extractors() -> list[str]:
    return sorted(_EXTRACTORS)


def register_all() -> None:
    """Import every module of ``pipeline/features/``, so each ``@register_extractor`` builder is available (plugins
    are found by listing the package, as the modes are: adding an extractor edits no list)."""
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"pipeline.features.{module.name}")


def build_extractor(features_cfg: Any, device: str | torch.device | None = None) -> FeatureExtractor:
    """Build the extractor named by ``features_cfg.name`` on ``device`` (``None``/``"auto"``: CUDA if present).
    Messages name the block's fields as the command line spells them, ``features.<name>.<field>`` (``features``
    holds one block per extractor, each shipped block under its extractor's name)."""
    register_all()

    name = features_cfg.name
    prefix = f"features.{name}"
    if name not in _EXTRACTORS:
        raise UserError(
            f"{prefix}.name: unknown feature extractor {name!r}; expected one of {available_extractors()}"
            " (extractors are picked with e.g. features=[shapes_net])"
        )
    resize = getattr(features_cfg.resize, "value", features_cfg.resize)
    if resize not in RESIZE_MODES:
        raise UserError(f"{prefix}.resize: {resize!r} is not a resize mode; expected one of {list(RESIZE_MODES)}")
    if features_cfg.batch_size is None or int(features_cfg.batch_size) < 1:
        raise UserError(f"{prefix}.batch_size: expected a positive integer, got {features_cfg.batch_size!r}")
    size = getattr(features_cfg, "image_size", None)
    if size is not None and int(size) < 1:
        raise UserError(f"{prefix}.image_size: expected a positive integer or null, got {size!r}")
    extractor = _EXTRACTORS[name](features_cfg, resolve_device(device))
    log.info("feature extractor %r", extractor)
    return extractor
