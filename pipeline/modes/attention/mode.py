"""The attention mode's ``mode.attention`` schema, its cross-key checks and registration (no stage import: the
config schema needs only this). Every default and its explanation is in ``conf/mode/attention.yaml``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from omegaconf import MISSING

from pipeline.config import bounded
from pipeline.core.registry import register_mode
from pipeline.errors import UserError
from pipeline.models.family import check_mode_support, classes_for, family_of_class, local_pipeline_class


@dataclass
class AttentionModeConfig:
    prompts: Optional[List[str]] = MISSING
    prompts_file: Optional[str] = MISSING
    num_prompts: int = bounded(ge=1)
    steps: List[int] = bounded(ge=0)
    threshold: float = bounded(gt=0, lt=1, note="a fraction of the map's maximum")
    height: Optional[int] = bounded(ge=1)
    width: Optional[int] = bounded(ge=1)
    figures: int = bounded(ge=0)
    num_reference: int = bounded(ge=0, note="0 turns the real-image protocol off")
    t: float = bounded(gt=0, lt=1, note="the real-image noise level as a fraction")
    maps: List[str] = MISSING
    layers: Optional[List[int]] = MISSING
    step_range: Optional[List[int]] = MISSING
    concepts: Optional[List[str]] = MISSING


MAP_KINDS = ("probs", "output")  # attention probabilities; ConceptAttention's output-space concept maps


def refuse_untexted(cls: str, fam) -> None:
    """A UserError: the attention mode needs a text-conditioned model (``fam`` is its family)."""
    kind = "class-conditional" if fam.conditioning == "class" else "unconditional"
    raise UserError(
        f"mode=[attention] needs a text-conditioned model: {cls} ({fam.name}) is {kind}, so there are no "
        f"prompt tokens to map; text-to-image families: {', '.join(classes_for('attention'))}"
    )


def validate(cfg) -> None:
    """Cross-key checks of ``mode.attention`` and the model's family (what it declares), before any stage runs."""
    cls = local_pipeline_class(cfg.model.path)
    fam = family_of_class(cls, "attention") if cls is not None else None
    if fam is not None and fam.conditioning != "text":
        refuse_untexted(cls, fam)
    check_mode_support(cfg.model.path, "attention")  # a text family that does not declare the mode
    a, n = cfg.mode.attention, int(cfg.sampler.num_inference_steps)
    bad = [s for s in a.steps if not 0 <= s < n]
    if bad or not a.steps:
        raise UserError(
            f"mode.attention.steps={list(a.steps)}: snapshot solver steps must be in 0..{n - 1} "
            f"(sampler.num_inference_steps={n}); e.g. {[round(f * (n - 1)) for f in (0.1, 0.3, 0.6, 0.9)]}"
        )
    if not 0 < a.threshold < 1:
        raise UserError(f"mode.attention.threshold={a.threshold}: expected a fraction of the map's maximum in (0, 1)")
    if not 0 < a.t < 1:
        raise UserError(f"mode.attention.t={a.t}: expected the real-image noise level as a fraction in (0, 1)")
    if a.step_range is not None and (len(a.step_range) != 2 or not 0 <= a.step_range[0] < a.step_range[1] <= n):
        raise UserError(
            f"mode.attention.step_range={list(a.step_range)}: expected [start, stop) with 0 <= start < stop <= {n} "
            "(sampler.num_inference_steps), e.g. [0, " + str(max(1, n // 2)) + "]; null: all steps"
        )
    if a.layers is not None and (len(a.layers) != 2 or not 0 <= a.layers[0] < a.layers[1]):
        raise UserError(
            f"mode.attention.layers={list(a.layers)}: expected [start, stop) indices into the recorded layers "
            "(forward order), e.g. [0, 4]; null: all layers"
        )
    bad_maps = [m for m in a.maps if m not in MAP_KINDS]
    if bad_maps or not a.maps:
        raise UserError(f"mode.attention.maps={list(a.maps)}: expected a non-empty subset of {list(MAP_KINDS)}")
    if a.concepts is not None and (not a.concepts or any(not str(c).strip() or " " in str(c) for c in a.concepts)):
        raise UserError(
            f"mode.attention.concepts={list(a.concepts)}: expected single words, e.g. [cat, sky, grass] (null: from "
            "the ground truth or the prompts)"
        )
    if a.num_reference < 0:
        raise UserError(
            f"mode.attention.num_reference={a.num_reference}: expected >= 0 (0 turns the real-image protocol off)"
        )


register_mode("attention", stages=["attention"], schema=AttentionModeConfig, validate=validate)
