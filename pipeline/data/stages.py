"""The data room's shared stages, produced once per run and used by every mode: ``reference`` (the run's reference
images, :class:`pipeline.data.reference.References`: each mode takes the first N it needs) and ``prompts`` (the
prompts of text-conditioned generation: ``mode.metrics.prompts_file`` or the reference captions)."""

from __future__ import annotations

import logging
from typing import Any

from pipeline.core.metric_keys import PROMPT_PROTOCOL_TAG
from pipeline.core.registry import stage
from pipeline.data.reference import References, ReferenceSet, read_prompts
from pipeline.errors import UserError

__all__ = [
    "reference_stage",
    "prompts_stage",
    "num_reference",
    "use_cache",
    "compared_reference",
    "samples_per_prompt",
    "PER_PROMPT_SAMPLES",
]

log = logging.getLogger(__name__)


def _metrics(cfg) -> Any:
    """The ``mode.metrics`` block when the metrics mode is selected, else None."""
    return cfg.mode.get("metrics") if cfg.get("mode") is not None else None


def num_reference(cfg) -> int:
    """Real images the generated ones are compared against: ``mode.metrics.num_reference``, default
    ``dataset.num_images``."""
    m = _metrics(cfg)
    return int(m.num_reference if m is not None and m.num_reference is not None else cfg.dataset.num_images)


def use_cache(cfg) -> bool:
    """Whether reference checks and features are cached on disk (``mode.metrics.cache``; default true)."""
    m = _metrics(cfg)
    return bool(m.cache) if m is not None else True


# GenEval (Ghosh et al. 2023) and T2I-CompBench (Huang et al. 2023) score 4 images per prompt
PER_PROMPT_SAMPLES = 4


def samples_per_prompt(cfg, num_prompts: int) -> tuple[int, str]:
    """``(k, protocol)``: how many consecutive samples each prompt gets, and the sentence a run logs about it.

    ``mode.metrics.samples_per_prompt`` set: that k. Otherwise k = 4 (the GenEval / T2I-CompBench convention) when
    ``mode.metrics.per_prompt=true`` asks for per-prompt statistics, else k = 1: one image per caption, the COCO-style
    FID / CMMD convention — FD over N images of N distinct prompts is not the FD over N/4 prompts × 4 (on the shapes
    model 65.3 vs 312.9 at N = 256). With fewer prompts than N the prompts cycle, either way. Modes other than
    metrics: k = 1."""
    m = _metrics(cfg)
    if m is None:
        return 1, "one image per prompt"
    n = int(m.num_samples)
    if m.samples_per_prompt is not None:
        k, why = int(m.samples_per_prompt), "mode.metrics.samples_per_prompt"
    elif m.per_prompt:
        k, why = PER_PROMPT_SAMPLES, "per-prompt statistics (mode.metrics.per_prompt=true; GenEval/T2I-CompBench: 4)"
    else:
        k, why = 1, "one image per caption, the COCO-style FID/CMMD convention"
    distinct = -(-n // k)  # prompts the N samples draw
    cycle = f"; {num_prompts} prompts for {distinct} draws: they cycle" if num_prompts < distinct else ""
    return k, f"{k} sample{'s' if k > 1 else ''} per prompt ({why}){cycle}"


@stage("reference", produces=("reference",))
def reference_stage(ctx, cfg):
    """The run's reference images (:class:`pipeline.data.reference.References`: one dataset object per process and
    dataset config; a folder unchanged since its last check is not decoded)."""
    return {"reference": References(cfg.dataset, cache_dir=cfg.paths.cache if use_cache(cfg) else None)}


def compared_reference(ctx, cfg) -> ReferenceSet:
    """The reference set generated images are compared against (:func:`num_reference` images), its skipped files
    and malformed captions lines tagged."""
    ref = ctx.get("reference").first(num_reference(cfg))
    if ref.num_skipped:
        ctx.tag("reference.num_skipped", ref.num_skipped)
    if ref.num_bad_caption_lines:  # malformed captions.jsonl lines, skipped like unreadable images
        ctx.tag("reference.num_bad_caption_lines", ref.num_bad_caption_lines)
    return ref


@stage("prompts", needs=("model", "reference"), produces=("prompts",))
def prompts_stage(ctx, cfg):
    """Prompts for text-conditioned models: ``mode.metrics.prompts_file`` or the reference captions, each repeated
    k times (:func:`samples_per_prompt`; sample i gets prompt i // k; generation cycles through the list). The
    protocol is logged and tagged ``metrics.prompt_protocol``."""
    if not ctx.get("model").text:
        return {"prompts": None}
    m = _metrics(cfg)
    if m is not None and m.prompts_file:
        prompts = read_prompts(m.prompts_file)
    else:
        prompts = compared_reference(ctx, cfg).captions
        if not prompts or any(c is None for c in prompts):
            raise UserError(
                f"dataset {cfg.dataset.name!r} has no caption for every image; a text-to-image model "
                "needs prompts: set mode.metrics.prompts_file=FILE or add captions.jsonl to the folder"
            )
    k, protocol = samples_per_prompt(cfg, len(prompts))
    if m is not None:
        log.info("prompts: %s", protocol)
        ctx.tag(PROMPT_PROTOCOL_TAG, protocol)
    return {"prompts": [p for p in prompts for _ in range(k)]}
