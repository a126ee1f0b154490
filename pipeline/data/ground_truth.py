"""What a dataset knows beyond its images: the small ground-truth interface generic stages ask.

Only ``dataset=shapes`` has ground truth today (caption grammar, a trained judge of shape/colour/side); a folder of
real images has none, and scores that need it are skipped with a ``skipped.<key>`` tag naming the reason — never
computed from the shapes heuristics on images they were not made for.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, Sequence

import torch

__all__ = ["GroundTruth", "ShapesGroundTruth", "ground_truth"]


class GroundTruth(Protocol):
    name: str

    def parses(self, prompts: Sequence[str]) -> str | None:
        """None when every prompt is in the dataset's caption grammar, else the reason (naming a prompt)."""

    def adherence(self, images: torch.Tensor, prompts: Sequence[str]) -> list[dict[str, Any]]:
        """One row per image: what the judge saw, and ``correct`` (every captioned object drawn as captioned)."""


class ShapesGroundTruth:
    """Shapes captions ("a red circle on the left and ...") judged by the project's trained ShapesNet."""

    name = "shapes"

    def __init__(self, device: torch.device, judge=None):
        self.device = device
        self._judge = judge  # a ShapesNetExtractor already built for features=[shapes_net], if any

    def parses(self, prompts: Sequence[str]) -> str | None:
        from pipeline.data.shapes import parse_caption

        for p in dict.fromkeys(prompts):
            try:
                parse_caption(p)
            except ValueError as e:
                return str(e)
        return None

    def _judge_net(self):
        if self._judge is None:
            from pipeline.features.shapes_net import ShapesNetExtractor, _resolve

            self._judge = ShapesNetExtractor(_resolve(None), "bilinear", 256, self.device)
        return self._judge

    def adherence(self, images: torch.Tensor, prompts: Sequence[str]) -> list[dict[str, Any]]:
        from pipeline.data.shapes import parse_caption
        from pipeline.zoo.shapes_net import compare

        return [{"prompt": p, "judged": json.dumps(j), **compare(j, parse_caption(p))}
                for p, j in zip(prompts, self._judge_net().judge(images))]


def ground_truth(dataset_cfg: Any, device: torch.device, extractors: dict | None = None) -> GroundTruth | None:
    """The dataset's ground truth, or None when it has none (``dataset=folder``)."""
    kind = getattr(dataset_cfg.kind, "value", dataset_cfg.kind)
    if kind == "shapes":
        return ShapesGroundTruth(device, (extractors or {}).get("shapes_net"))
    return None
