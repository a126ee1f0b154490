"""PickScore (Kirstain et al., NeurIPS 2023, "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image
Generation"): CLIP ViT-H/14 fine-tuned on human choices, through transformers ``CLIPModel``.

Score of an (image, prompt) pair, as the ``yuvalkirstain/PickScore_v1`` model card's inference snippet computes it:
``exp(logit_scale) · cos(E_I, E_T)`` on the projected image and text embeddings (``get_image_features`` /
``get_text_features``), both L2-normalised (``pipeline.metrics.preference.pickscore_scores``). PickScore_v1's
``exp(logit_scale)`` is 100, so scores read ≈ 18–24. The probability that people prefer one of K candidates for a
prompt is the softmax of their scores (``pipeline.metrics.preference.preference_probs``).

Preprocessing = the CLIP processor the snippet uses (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, a copy of which the
PickScore_v1 repo ships): shortest side to 224 with bicubic (PIL, ≈ ``bicubic_antialias``), centre crop, the
``preprocessor_config.json`` mean/std (OpenAI's) — :class:`~pipeline.features.clip.CLIPExtractor`'s own path.
Text: the repo's tokenizer, truncated at 77 tokens (``max_length=77, truncation=True`` in the snippet; each
truncation is logged and counted).

One image pass gives ``pool`` = the projected image embedding (not normalised): FD/KD/PR/DC on PickScore's space,
and the image half of the score — ``prompt_scores`` adds only a text pass. No ``image_embeds``: a preference
model's embedding is not CLIP score's.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from pipeline.features.base import PromptScorer, register_extractor
from pipeline.features.clip import CLIPExtractor
from pipeline.metrics.preference import pickscore_scores

__all__ = ["PickScoreExtractor", "PICKSCORE_MODEL", "PICKSCORE_PROCESSOR"]

log = logging.getLogger(__name__)

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # what the model card's snippet loads the processor from


class PickScoreExtractor(PromptScorer, CLIPExtractor):
    """``pool`` (N, 1024) per image batch; ``prompt_scores`` = PickScore per (image, prompt)."""

    name = "pickscore"
    score_name = "pickscore"
    outputs = ("pool",)

    def __init__(self, model: str = PICKSCORE_MODEL, **kwargs: Any):
        super().__init__(model, **kwargs)
        # the model's own temperature: PickScore_v1's exp(logit_scale) = 100
        self.logit_scale = float(self.model.logit_scale.detach().float().cpu())

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "score": "exp(logit_scale)*cos",
            "score_scale": round(math.exp(self.logit_scale), 6),
        }

    def _forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pool": super()._forward(pixels)["pool"]}

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        return self.text_embeds(prompts)

    def _scores(self, pool: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return pickscore_scores(pool, text, self.logit_scale)


@register_extractor("pickscore")
def build_pickscore(cfg: Any, device: torch.device) -> PickScoreExtractor:
    resize = getattr(cfg.resize, "value", cfg.resize)
    return PickScoreExtractor(
        cfg.model or PICKSCORE_MODEL,
        resize=resize,
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        device=device,
        key=f"features.{cfg.name}",
    )
