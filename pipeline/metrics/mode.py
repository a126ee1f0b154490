"""The metrics mode's ``mode.metrics`` schema and registration (no stage import: the config schema needs only
this). Every default and its explanation is in ``conf/mode/metrics.yaml``; the checks that need no model run in
the ``metrics_check`` stage (``pipeline.metrics.stage``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from omegaconf import MISSING

from pipeline.config import bounded
from pipeline.registry import register_mode


@dataclass
class MetricsModeConfig:
    num_samples: int = bounded(ge=1)
    num_reference: Optional[int] = bounded(ge=1)
    batch_size: Optional[int] = bounded(ge=1)
    prompts_file: Optional[str] = MISSING
    kid_subsets: int = bounded(ge=1)
    kid_subset_size: int = bounded(ge=2)
    is_splits: int = bounded(ge=1)
    pr_k: int = bounded(ge=1)
    dc_k: int = bounded(ge=1)
    judge: str = MISSING
    class_ids: Optional[List[int]] = bounded(ge=0)
    save_images: bool = MISSING
    cache: bool = MISSING
    grid: int = bounded(ge=1)
    samples_per_prompt: int = bounded(ge=1)
    ci_subsets: int = bounded(ge=2, note="replicates for an interval")
    ci_bootstrap: int = bounded(ge=2, note="replicates for an interval")
    worst_prompts: int = bounded(ge=0, note="0 = no worst-prompts figure")


register_mode("metrics", stages=["metrics_check", "metrics"], schema=MetricsModeConfig)
