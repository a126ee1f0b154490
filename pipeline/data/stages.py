"""The data room's shared stages, produced once per run and used by every mode: ``reference`` (the run's reference
images, :class:`pipeline.data.reference.References`: each mode takes the first N it needs) and ``prompts`` (the
prompts of text-conditioned generation: ``mode.metrics.prompts_file`` or the reference captions)."""

from __future__ import annotations

import logging
from typing import Any

from pipeline.core.registry import stage
from pipeline.data.reference import References, ReferenceSet, read_prompts
from pipeline.errors import UserError

__all__ = ["reference_stage", "prompts_stage", "num_reference", "use_cache", "compared_reference"]

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
    ``mode.metrics.samples_per_prompt`` times (sample i gets prompt i // k; generation cycles through the list)."""
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
    k = int(m.samples_per_prompt) if m is not None else 1
    return {"prompts": [p for p in prompts for _ in range(k)]}
