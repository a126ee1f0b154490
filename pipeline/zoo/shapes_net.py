"""shapes_net: a small CNN for the shapes domain — feature extractor (FID/KID/PR) and prompt-adherence judge.

For each half of the image (left, right) it predicts the shape and the colour of the object there, with
class 0 meaning "no object". Its penultimate activations (``features``) play the role Inception's pool
features play for natural images.

Stored as ``config.json`` + ``model.safetensors`` (float32).
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.shapes import DEFAULT_COLOURS, DEFAULT_SHAPES, SIDES, ShapeObject

__all__ = ["ShapesNetConfig", "ShapesNet", "Judgement", "labels_for", "compare", "to_tensor"]

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


@dataclass
class ShapesNetConfig:
    shapes: list[str] = field(default_factory=lambda: list(DEFAULT_SHAPES))
    colours: list[str] = field(default_factory=lambda: list(DEFAULT_COLOURS))
    image_size: int = 32  # inputs of another size are resized to this
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    feature_dim: int = 128


# per side: (shape, colour) of the object there, or None for an empty side
Judgement = dict[str, "tuple[str, str] | None"]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) or (H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"Expected uint8 images of shape (N, H, W, 3), got {tuple(x.shape)} {x.dtype}")
    return x.permute(0, 3, 1, 2).float() / 255.0


class ShapesNet(nn.Module):
    def __init__(self, config: ShapesNetConfig | None = None):
        super().__init__()
        self.config = config = config or ShapesNetConfig()
        layers, c_in = [], 3
        for c in config.channels:  # two 3x3 convs then a 2x downsample per stage
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1),
                nn.GroupNorm(8, c),
                nn.SiLU(),
                nn.Conv2d(c, c, 3, padding=1),
                nn.GroupNorm(8, c),
                nn.SiLU(),
                nn.MaxPool2d(2),
            ]
            c_in = c
        self.body = nn.Sequential(*layers)
        # keep a coarse spatial grid: left/right must stay distinguishable after pooling
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c_in * 16, config.feature_dim), nn.SiLU())
        n_shape, n_colour = len(config.shapes) + 1, len(config.colours) + 1  # + "no object"
        self.head = nn.Linear(config.feature_dim, len(SIDES) * (n_shape + n_colour))
        self._split = (n_shape, n_colour)

    # --- inference API -------------------------------------------------------------------------
    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected float images (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        p = next(self.parameters())
        images = images.to(device=p.device, dtype=p.dtype)
        s = self.config.image_size
        if images.shape[-2:] != (s, s):
            images = F.interpolate(images, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return images * 2 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) floats in [0, 1] -> (N, feature_dim) penultimate activations."""
        return self.embed(self.pool(self.body(self._prepare(images))))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per side: ``{"left_shape": (N, S+1), "left_colour": (N, C+1), "right_shape": ..., ...}``."""
        return self._heads(self.features(images))

    logits = forward

    def _heads(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        out, chunks = {}, self.head(feats).split([*self._split] * len(SIDES), dim=1)
        for k, side in enumerate(SIDES):
            out[f"{side}_shape"], out[f"{side}_colour"] = chunks[2 * k], chunks[2 * k + 1]
        return out

    @torch.no_grad()
    def judge(self, images: torch.Tensor | np.ndarray, batch_size: int = 256) -> list[Judgement]:
        """Per image, ``{"left": (shape, colour) or None, "right": ...}``; uint8 arrays are accepted too."""
        if isinstance(images, np.ndarray):
            images = to_tensor(images)
        was_training = self.training
        self.eval()
        out = []
        for i in range(0, len(images), batch_size):
            logits = self(images[i : i + batch_size])
            preds = {k: v.argmax(1).tolist() for k, v in logits.items()}
            for j in range(len(preds["left_shape"])):
                judgement = {}
                for side in SIDES:
                    s, c = preds[f"{side}_shape"][j], preds[f"{side}_colour"][j]
                    # presence is decided by the shape head; the colour head then picks among real colours
                    if s == 0:
                        judgement[side] = None
                    else:
                        if c == 0:
                            c = int(logits[f"{side}_colour"][j, 1:].argmax()) + 1
                        judgement[side] = (self.config.shapes[s - 1], self.config.colours[c - 1])
                out.append(judgement)
        self.train(was_training)
        return out

    # --- storage ------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | pathlib.Path, dtype: torch.dtype = torch.float32) -> pathlib.Path:
        from safetensors.torch import save_file

        path = pathlib.Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, path / WEIGHTS_NAME)
        return path

    @classmethod
    def from_pretrained(cls, path: str | pathlib.Path, device: str | torch.device = "cpu") -> "ShapesNet":
        from safetensors.torch import load_file

        path = pathlib.Path(path)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise FileNotFoundError(f"shapes_net: expected {path / name} (config.json + model.safetensors)")
        net = cls(ShapesNetConfig(**json.loads((path / CONFIG_NAME).read_text())))
        state = {k: v.float() for k, v in load_file(path / WEIGHTS_NAME).items()}
        net.load_state_dict(state)
        return net.to(device).eval()


def labels_for(
    objects: Sequence[ShapeObject] | Sequence[tuple[str, str, str]], config: ShapesNetConfig
) -> dict[str, int]:
    """Class targets per head for one image's objects (ShapeObjects or (colour, shape, side) triples)."""
    labels = {f"{side}_{head}": 0 for side in SIDES for head in ("shape", "colour")}
    for o in objects:
        colour, shape, side = (o.colour, o.shape, o.side) if isinstance(o, ShapeObject) else o
        labels[f"{side}_shape"] = config.shapes.index(shape) + 1
        labels[f"{side}_colour"] = config.colours.index(colour) + 1
    return labels


def compare(judgement: Judgement, objects: Sequence[ShapeObject] | Sequence[tuple[str, str, str]]) -> dict[str, bool]:
    """How a judgement matches the captioned objects ((colour, shape, side) triples or ShapeObjects).

    - ``colour`` / ``shape``: every captioned object's side has an object of that colour / shape;
    - ``correct``: shape AND colour of every captioned object found (the prompt-adherence criterion);
    - ``exact``: correct, and no object where the caption names none.
    """
    triples = [(o.colour, o.shape, o.side) if isinstance(o, ShapeObject) else tuple(o) for o in objects]
    found = {side: judgement.get(side) for side in SIDES}
    colour = all(found[side] is not None and found[side][1] == c for c, _s, side in triples)
    shape = all(found[side] is not None and found[side][0] == s for _c, s, side in triples)
    named = {side for *_, side in triples}
    extra = any(found[side] is not None for side in SIDES if side not in named)
    return {"colour": colour, "shape": shape, "correct": colour and shape, "exact": colour and shape and not extra}
