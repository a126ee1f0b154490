"""DINOv2 (transformers ``Dinov2Model``): features for FD_DINOv2 (Stein et al. 2023, dgm-eval).

``pool`` is the CLS token after the final LayerNorm (``pooler_output``) — what dgm-eval's DINOv2 encoder
returns (the torch-hub model's ``forward`` = ``x_norm_clstoken``), so FD_DINOv2 values are comparable with
that code base. Mean-pooled patch tokens would be the other common choice; they are not used here.

Preprocessing follows dgm-eval: stretch to 224×224 (``features.dinov2.image_size``, default 224; dgm-eval uses
bicubic, ≈ ``bicubic_antialias``), then ImageNet mean/std (from ``preprocessor_config.json`` when present).
Dinov2Model interpolates its position embeddings (pretrained at 518) to any multiple of the patch size.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.features.base import FeatureExtractor, load_hf_model, read_preprocessor_config, register_extractor

__all__ = ["DINOv2Extractor", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224


class DINOv2Extractor(FeatureExtractor):
    """``pool`` (N, hidden_size): the normalised CLS token."""

    name = "dinov2"
    outputs = ("pool",)

    def __init__(
        self,
        model: str,
        resize: str = "bicubic_antialias",
        image_size: int | None = None,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        key: str = "features.dinov2",
    ):
        """``key``: this block's config key (``features.<name>``), named by errors."""
        from transformers import Dinov2Model

        self.model, self.model_dir, self.weights_id = load_hf_model(Dinov2Model, model, f"{key}.model")
        self.source = model
        self.device = torch.device(device)
        self.model.to(self.device)
        self.input_size = int(image_size or DEFAULT_SIZE)
        patch = int(self.model.config.patch_size)
        if self.input_size % patch:
            raise UserError(
                f"{key}.image_size: {self.input_size} is not a multiple of the DINOv2 patch size "
                f"{patch} (e.g. {key}.image_size={patch * round(self.input_size / patch) or patch})"
            )
        pre = read_preprocessor_config(self.model_dir, f"{key}.model")
        self._mean = torch.tensor(pre.get("image_mean", IMAGENET_MEAN), device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(pre.get("image_std", IMAGENET_STD), device=self.device).view(1, 3, 1, 1)
        self.resize = resize
        self.batch_size = int(batch_size)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": self.source}

    def _forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(pixel_values=(pixels - self._mean) / self._std)
        return {"pool": out.pooler_output}


@register_extractor("dinov2")
def build_dinov2(cfg: Any, device: torch.device) -> DINOv2Extractor:
    resize = getattr(cfg.resize, "value", cfg.resize)
    return DINOv2Extractor(
        cfg.model,
        resize=resize,
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        device=device,
        key=f"features.{cfg.name}",
    )
