"""The standard FID Inception-v3 (``inception-v3-compat``): the 2015-12-05 TensorFlow graph in PyTorch.

This is the network behind TF-FID, torch-fidelity, pytorch-fid and torchmetrics' FID/KID/IS, written from
its architecture description. It differs from a textbook / torchvision Inception-v3 in the TF-graph quirks
that the FID weights depend on:

* the pooling branch of every Mixed_5x / Mixed_6{b..e} / Mixed_7b block averages with
  ``count_include_pad=False`` (TF's average pool ignores padding);
* the pooling branch of the *last* block (Mixed_7c) is a 3×3 **max** pool, not an average pool;
* BatchNorm eps 1e-3, convolutions without bias; no auxiliary classifier;
* a 1008-way classifier (``fc``: 1000 ImageNet classes + 8 unused, index 0 = background);
* input 299×299, pixels p in 0..255 mapped to (p − 128) / 128 (what the TF graph does; torch-fidelity and
  torchmetrics do the same; pytorch-fid's 2·x − 1 on [0, 1] differs by < 0.01 at the top end).

Outputs (one forward pass): ``pool`` = 2048-d pool3 features (FID/KID/PR/DC) and ``logits`` = 1008
*unbiased* logits ``pool @ fc.weight.T`` — torch-fidelity's default IS feature ``logits_unbiased``, which
torchmetrics' InceptionScore uses too.

Weights: ``weights-inception-2015-12-05-6726825d.pth`` from torch-fidelity's GitHub release v0.2.0. Its
state dict uses the torchvision-style names below (``Mixed_5b.branch_pool.conv.weight``, ``fc.weight``
(1008, 2048), …; BatchNorm ``weight``/``bias``/``running_mean``/``running_var``, no ``num_batches_tracked``).
pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` uses the same names and loads too.

Note on resizing: torch-fidelity (and torchmetrics' FID with ``antialias=False``) resize with TF1's
bilinear (``features.inception.resize=bilinear_tf1`` here); ``bilinear`` is torch's half-pixel bilinear (pytorch-fid).
The two agree exactly only for 299×299 inputs.
"""

from __future__ import annotations

import logging
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UserError
from pipeline.features.base import FeatureExtractor, file_sha256, register_extractor

__all__ = [
    "FIDInceptionV3",
    "InceptionExtractor",
    "WEIGHTS_FILE",
    "WEIGHTS_URL",
    "default_weights_dir",
    "find_weights",
    "verify_weights",
    "PINNED_SHA256",
    "load_state_dict_file",
]

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
# the config key of the weights file, as the command line spells it (``features`` holds one block per extractor)
WEIGHTS_KEY = "features.inception.weights_path"
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"  # same tensors, same key names
# {file name: sha256 of the genuine file}. Only values computed from the real files go here — a wrong pin would
# refuse the genuine file for every user — so it stays empty until someone with network access computes them
# (`sha256sum weights-inception-2015-12-05-6726825d.pth`); an unpinned file's hash is logged on every load.
PINNED_SHA256: dict[str, str] = {}
INPUT_SIZE = 299
NUM_CLASSES = 1008


# ----------------------------------------------------------------------------------------------------------
# the network
# ----------------------------------------------------------------------------------------------------------
class _ConvBN(nn.Module):
    """conv (no bias) → BatchNorm(eps=1e-3) → ReLU; state-dict names ``conv.*`` and ``bn.*``."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    # TF averages over the valid (unpadded) pixels only
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _Mixed35(nn.Module):
    """35×35 block (Mixed_5b/c/d): 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg-pool→1×1."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 64, 1)
        self.branch5x5_1 = _ConvBN(c_in, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([a, b, c, d], 1)


class _Reduce35to17(nn.Module):
    """Grid reduction Mixed_6a: 3×3/2 | 1×1→3×3→3×3/2 | max-pool/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = _ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _Mixed17(nn.Module):
    """17×17 block (Mixed_6b..e) with factorised 7×7: 1×1 | 1×7→7×1 | 7×1→1×7→7×1→1×7 | avg-pool→1×1."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _ConvBN(c_in, 192, 1)
        self.branch7x7_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, **row)
        self.branch7x7_3 = _ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = _ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = _ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = _ConvBN(c7, 192, **row)
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([a, b, c, d], 1)


class _Reduce17to8(nn.Module):
    """Grid reduction Mixed_7a: 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | max-pool/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(c_in, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = layer(b)
        return torch.cat([a, b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _Mixed8(nn.Module):
    """8×8 block (Mixed_7b/c) with split 1×3 / 3×1 heads; the pooling branch is ``pool`` ('avg' or 'max')."""

    def __init__(self, c_in: int, pool: str):
        super().__init__()
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.pool = pool
        self.branch1x1 = _ConvBN(c_in, 320, 1)
        self.branch3x3_1 = _ConvBN(c_in, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, **row)
        self.branch3x3_2b = _ConvBN(384, 384, **col)
        self.branch3x3dbl_1 = _ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, **row)
        self.branch3x3dbl_3b = _ConvBN(384, 384, **col)
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        # the TF graph's last block max-pools here (a quirk the FID weights were trained with)
        pooled = _avg_pool_tf(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([a, b, c, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """FID Inception-v3. ``forward(x)`` takes (N, 3, 299, 299) in [-1, 1]; returns ``(pool, logits_unbiased)``."""

    def __init__(self):
        super().__init__()
        # stem: 299 → 149 → 147 → 147 → (max-pool) 73 → 73 → 71 → (max-pool) 35
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        # 35×35
        self.Mixed_5b = _Mixed35(192, pool_features=32)
        self.Mixed_5c = _Mixed35(256, pool_features=64)
        self.Mixed_5d = _Mixed35(288, pool_features=64)
        # 17×17
        self.Mixed_6a = _Reduce35to17(288)
        self.Mixed_6b = _Mixed17(768, c7=128)
        self.Mixed_6c = _Mixed17(768, c7=160)
        self.Mixed_6d = _Mixed17(768, c7=160)
        self.Mixed_6e = _Mixed17(768, c7=192)
        # 8×8
        self.Mixed_7a = _Reduce17to8(768)
        self.Mixed_7b = _Mixed8(1280, pool="avg")
        self.Mixed_7c = _Mixed8(2048, pool="max")
        self.fc = nn.Linear(2048, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)  # global average pool: pool3, 2048-d
        logits_unbiased = pool @ self.fc.weight.T  # torch-fidelity's IS feature: no bias
        return pool, logits_unbiased


# ----------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------
def default_weights_dir() -> Path:
    """``$DIFFUSION_LENS_CACHE`` or ``~/.cache/diffusion-lens``."""
    return Path(os.environ.get("DIFFUSION_LENS_CACHE", "~/.cache/diffusion-lens")).expanduser()


def _candidates() -> list[Path]:
    hub = Path(torch.hub.get_dir()) / "checkpoints"  # where torch-fidelity / torchmetrics / pytorch-fid put it
    return [default_weights_dir() / WEIGHTS_FILE, hub / WEIGHTS_FILE, hub / PYTORCH_FID_FILE]


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("DIFFUSION_LENS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _missing_weights_message(reason: str) -> str:
    return (
        f"{WEIGHTS_KEY}: the FID Inception weights are needed ({reason}). Download "
        f"{WEIGHTS_FILE} from {WEIGHTS_URL} on a connected machine and either put it at "
        f"{default_weights_dir() / WEIGHTS_FILE} or pass {WEIGHTS_KEY}=/path/to/{WEIGHTS_FILE}"
    )


def verify_weights(path: Path, name: str | None = None) -> str:
    """sha256 of a weights file, checked against ``PINNED_SHA256[name]`` (``name``: the file name it stands for).
    A mismatch is a UserError naming the file and both hashes; an unpinned file's hash is logged."""
    name = name or path.name
    digest = file_sha256(path)
    pinned = PINNED_SHA256.get(name)
    if pinned is None:
        log.info("%s: sha256 %s (not pinned)", path, digest)
    elif digest != pinned:
        raise UserError(
            f"{WEIGHTS_KEY}: {str(path)!r} ({name}) has sha256 {digest}, but {name} is pinned to "
            f"{pinned}: the file is corrupt or not the genuine one; delete it and download it again from "
            f"{WEIGHTS_URL}"
        )
    return digest


def _download(url: str, dst: Path, timeout: float = 20.0) -> None:
    """Download to a per-process ``.part`` file, verify it against the pin, then rename: neither a partial nor a
    mismatching download is ever left in place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(f"{dst.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
            shutil.copyfileobj(response, f)
        verify_weights(part, dst.name)
        os.replace(part, dst)  # atomic: a half-downloaded file never sits at dst
    finally:
        part.unlink(missing_ok=True)


def find_weights(weights_path: str | None, download: bool | None = None) -> Path:
    """The weights file: ``weights_path`` if given, else a cached copy, else a download (when online)."""
    if weights_path:
        p = Path(weights_path).expanduser()
        if not p.is_file():
            raise UserError(
                f"{WEIGHTS_KEY}: {str(p)!r} does not exist or is not a file; "
                + _missing_weights_message("no file at that path")
            )
        verify_weights(p)
        return p
    for p in _candidates():
        if p.is_file():
            verify_weights(p, WEIGHTS_FILE)  # torch-fidelity's and pytorch-fid's copies hold the same tensors
            return p
    download = (not _offline()) if download is None else download
    if not download:
        raise UserError(_missing_weights_message("offline and no cached copy"))
    dst = default_weights_dir() / WEIGHTS_FILE
    log.info("downloading %s to %s", WEIGHTS_URL, dst)
    try:
        _download(WEIGHTS_URL, dst)
    except UserError:
        raise
    except Exception as e:  # no network, proxy, HTTP error: the same fix
        raise UserError(_missing_weights_message(f"download failed: {type(e).__name__}: {e}")) from e
    return dst


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """``.safetensors`` or a tensors-only ``.pth`` (``torch.load(weights_only=True)``: no code runs)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"{WEIGHTS_KEY}: cannot read {str(path)!r} as a state dict (.pth or .safetensors): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(state, dict):
        raise UserError(f"{WEIGHTS_KEY}: {str(path)!r} holds a {type(state).__name__}, expected a state dict")
    return state


# ----------------------------------------------------------------------------------------------------------
# the extractor
# ----------------------------------------------------------------------------------------------------------
class InceptionExtractor(FeatureExtractor):
    """``pool`` (N, 2048) and ``logits`` (N, 1008, unbiased) from one forward pass of the FID Inception."""

    name = "inception"
    outputs = ("pool", "logits")
    input_size = INPUT_SIZE
    pixel_scale = 255.0  # the graph maps 0..255 with (p - 128) / 128

    def __init__(
        self,
        weights_path: str | Path,
        resize: str = "bilinear",
        batch_size: int = 64,
        device: str | torch.device = "cpu",
    ):
        path = Path(weights_path)
        self.net = FIDInceptionV3()
        state = {k: v for k, v in load_state_dict_file(path).items() if not k.endswith("num_batches_tracked")}
        missing, unexpected = _key_mismatch(self.net, state)
        if missing or unexpected:
            raise UserError(
                f"{WEIGHTS_KEY}: {str(path)!r} is not an FID Inception-v3 state dict "
                f"({WEIGHTS_FILE} layout): {len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
            )
        try:
            self.net.load_state_dict(state, strict=False)  # num_batches_tracked is not in the file
        except RuntimeError as e:  # shape mismatch
            raise UserError(f"{WEIGHTS_KEY}: {str(path)!r}: {e}") from e
        self.device = torch.device(device)
        self.net.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.weights_path = path
        self.weights_id = file_sha256(path)[:12]
        self.resize = resize
        self.batch_size = int(batch_size)

    def _forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        pool, logits = self.net((pixels - 128.0) / 128.0)
        return {"pool": pool, "logits": logits}


def _key_mismatch(net: nn.Module, state: dict[str, Any]) -> tuple[list[str], list[str]]:
    expected = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    return sorted(expected - state.keys()), sorted(state.keys() - expected)


@register_extractor("inception")
def build_inception(cfg: Any, device: torch.device) -> InceptionExtractor:
    size = getattr(cfg, "image_size", None)
    if size is not None and int(size) != INPUT_SIZE:
        key = f"features.{cfg.name}"
        raise UserError(
            f"{key}.image_size: the FID Inception takes {INPUT_SIZE}×{INPUT_SIZE} inputs, got {size}; "
            f"leave it null ({key}.image_size=null: images of any size are resized per {key}.resize)"
        )
    resize = getattr(cfg.resize, "value", cfg.resize)
    return InceptionExtractor(find_weights(cfg.weights_path), resize=resize, batch_size=cfg.batch_size, device=device)
