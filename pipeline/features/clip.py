"""CLIP (transformers ``CLIPModel``): image embeddings for FD_CLIP and CLIP score, text embeddings for prompts.

One image pass yields ``image_embeds`` — the projected image embedding (``visual_projection`` of the
post-LayerNorm CLS token, *not* L2-normalised; ``pipeline.metrics.clip_score`` normalises) — and ``pool``,
the same tensor, for FD/KD/PR/DC on CLIP features (torch-fidelity's ``clip-*`` extractors also use the
projected embedding; dgm-eval uses the pre-projection one).

Preprocessing is done in torch so uint8 batches go straight in: shortest side to the model's image size with
``features.<name>.resize`` (CLIP's own processor: PIL bicubic ≈ ``bicubic_antialias``), centre crop, then the
model's mean/std (``preprocessor_config.json``, else OpenAI's constants).

Text: CLIP's context is 77 tokens. Longer prompts are truncated — the Hugging Face tokenizer keeps the
end-of-text token (OpenAI's ``clip.tokenize(truncate=True)`` drops it), but the cut words no longer count.
Every truncation is logged as a warning and counted in ``num_truncated`` (cumulative over calls).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from pipeline.errors import UserError
from pipeline.features.base import FeatureExtractor, load_hf_model, read_preprocessor_config, register_extractor

__all__ = ["CLIPExtractor", "CLIP336Extractor", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]

log = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPExtractor(FeatureExtractor):
    """``image_embeds`` / ``pool`` (N, E) per image batch; ``text_embeds(prompts)`` (N, E)."""

    name = "clip"
    outputs = ("pool", "image_embeds")
    center_crop = True

    def __init__(
        self,
        model: str,
        resize: str = "bicubic_antialias",
        image_size: int | None = None,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        key: str | None = None,
    ):
        """``key``: this block's config key, ``features.<name>`` (default ``features.<self.name>``), named by errors."""
        from transformers import AutoTokenizer, CLIPModel

        key = key or f"features.{self.name}"
        self.model, self.model_dir, self.weights_id = load_hf_model(CLIPModel, model, f"{key}.model")
        self.source = model
        self.device = torch.device(device)
        self.model.to(self.device)
        self.tokenizer = _load_tokenizer(AutoTokenizer, self.model_dir, f"{key}.model")

        native = int(self.model.config.vision_config.image_size)
        self.input_size = int(image_size or native)
        # another size works only by interpolating the position embeddings: allowed, but no longer "CLIP"
        self._interpolate_pos = self.input_size != native
        if self._interpolate_pos:
            log.warning(
                "%s.image_size=%d differs from the CLIP model's %d: position embeddings are "
                "interpolated (%s.image_size=null uses the model's)",
                key,
                self.input_size,
                native,
                key,
            )
        pre = read_preprocessor_config(self.model_dir, f"{key}.model")
        self._mean = torch.tensor(
            pre.get("image_mean", OPENAI_CLIP_MEAN), dtype=torch.float32, device=self.device
        ).view(1, 3, 1, 1)
        self._std = torch.tensor(pre.get("image_std", OPENAI_CLIP_STD), dtype=torch.float32, device=self.device).view(
            1, 3, 1, 1
        )
        self.resize = resize
        self.batch_size = int(batch_size)
        self.max_text_tokens = min(
            int(self.tokenizer.model_max_length), int(self.model.config.text_config.max_position_embeddings)
        )
        self.num_truncated = 0

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": self.source}

    def _forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (pixels - self._mean) / self._std
        extra = {"interpolate_pos_encoding": True} if self._interpolate_pos else {}
        vision = self.model.vision_model(pixel_values=x, **extra)
        embeds = self.model.visual_projection(vision.pooler_output)
        return {"pool": embeds, "image_embeds": embeds}

    def count_truncated(self, prompts: Sequence[str]) -> list[int]:
        """Indices of prompts longer than the text context (special tokens included)."""
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), truncation=False)["input_ids"]]
        return [i for i, n in enumerate(lengths) if n > self.max_text_tokens]

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, E) projected text embeddings (float32, CPU, not normalised); warns on truncated prompts."""
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("Expected a list of prompt strings")
        truncated = self.count_truncated(prompts)
        if truncated:
            self.num_truncated += len(truncated)
            log.warning(
                "CLIP text limit: %d of %d prompts exceed %d tokens and were truncated (their CLIP score "
                "ignores the cut words), e.g. %r",
                len(truncated),
                len(prompts),
                self.max_text_tokens,
                prompts[truncated[0]][:120],
            )
        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                enc = self.tokenizer(
                    prompts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_text_tokens,
                    return_tensors="pt",
                ).to(self.device)
                text = self.model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                out.append(self.model.text_projection(text.pooler_output).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.model.config.projection_dim)


class CLIP336Extractor(CLIPExtractor):
    """CMMD's embedding (Jayasumana et al., google-research/cmmd ``embedding.py``): CLIP ViT-L/14@336, the *whole*
    image resized to 336 × 336 with TF2 bicubic without antialias (``bicubic_tf2``; no centre crop, so non-square
    images are stretched), CLIP's mean/std, ``image_embeds`` L2-normalised. ``pool`` is the same normalised
    embedding (CMMD's kernel works on it; FD on it is FD_CLIP336)."""

    name = "clip336"
    center_crop = False

    def _forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        embeds = super()._forward(pixels)["image_embeds"]
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return {"pool": embeds, "image_embeds": embeds}


@register_extractor("clip336")
def build_clip336(cfg: Any, device: torch.device) -> CLIP336Extractor:
    resize = getattr(cfg.resize, "value", cfg.resize)
    return CLIP336Extractor(
        cfg.model,
        resize=resize,
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        device=device,
        key=f"features.{cfg.name}",
    )


def _load_tokenizer(auto_cls: Any, model_dir: Path, key: str):
    try:
        return auto_cls.from_pretrained(str(model_dir))
    except Exception as e:
        raise UserError(
            f"{key}: no usable CLIP tokenizer in {str(model_dir)!r} (expected "
            f"tokenizer.json or vocab.json + merges.txt): {type(e).__name__}: {e}"
        ) from e


@register_extractor("clip")
def build_clip(cfg: Any, device: torch.device) -> CLIPExtractor:
    resize = getattr(cfg.resize, "value", cfg.resize)
    return CLIPExtractor(
        cfg.model,
        resize=resize,
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        device=device,
        key=f"features.{cfg.name}",
    )
