"""The built-in shapes-domain extractor (``features=shapes_net``): the zoo's ShapesNet in the one-pass interface.

``pool`` = its penultimate activations (the role Inception's pool3 plays for natural images). ``logits`` =
log-probabilities of the *joint* label (left shape, left colour, right shape, right colour): the network has
four heads, so the joint distribution is taken as their product, giving one categorical for the Inception
Score (a sharp, diverse set of scenes scores high, as IS intends). The same network is the prompt judge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline import zoo
from pipeline.errors import UserError
from pipeline.features.base import FeatureExtractor, files_id, register_extractor
from pipeline.zoo.shapes_net import ShapesNet

__all__ = ["ShapesNetExtractor", "joint_log_probs"]


def joint_log_probs(heads: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, ∏ head sizes) log-probabilities of the product of the heads' softmaxes."""
    joint = None
    for key in sorted(heads):
        lp = torch.log_softmax(heads[key].double(), dim=1)
        joint = lp if joint is None else (joint[:, :, None] + lp[:, None, :]).reshape(len(lp), -1)
    return joint.float()


class ShapesNetExtractor(FeatureExtractor):
    name = "shapes_net"
    outputs = ("pool", "logits")

    def __init__(self, path: Path, resize: str, batch_size: int, device: torch.device):
        self.net = ShapesNet.from_pretrained(path, device=device).float().eval()
        self.path = path
        self.input_size = int(self.net.config.image_size)
        self.resize, self.batch_size, self.device = resize, int(batch_size), device
        self.weights_id = files_id(sorted(path.glob("*.safetensors")))

    def _forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.net.features(pixels)
        return {"pool": feats, "logits": joint_log_probs(self.net._heads(feats))}

    def judge(self, images: torch.Tensor) -> list:
        """Per image ``{"left": (shape, colour) | None, "right": ...}`` (uint8 or [0, 1] float NCHW)."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images
        return self.net.judge(x)


def _resolve(model: str | None, key: str = "features.shapes_net.model") -> Path:
    """The network's directory: ``model`` (a directory or a zoo name; None: the zoo's shapes_net); ``key``: the
    config key named by errors."""
    name = model or "shapes_net"
    if Path(name).is_dir():
        return Path(name)
    try:
        return zoo.locate(name)
    except (KeyError, FileNotFoundError) as e:
        raise UserError(f"{key}: {e}") from e


@register_extractor("shapes_net")
def build_shapes_net(cfg: Any, device: torch.device) -> ShapesNetExtractor:
    resize = getattr(cfg.resize, "value", cfg.resize)
    return ShapesNetExtractor(_resolve(cfg.model, f"features.{cfg.name}.model"), resize, cfg.batch_size, device)
