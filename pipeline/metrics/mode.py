"""The metrics mode's ``mode.metrics`` schema and registration (no stage import: the config schema needs only
this). Every default and its explanation is in ``conf/mode/metrics.yaml``; the checks that need no model run in
the ``metrics_check`` stage (``pipeline.metrics.stage``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from omegaconf import MISSING

from pipeline.registry import register_mode


@dataclass
class MetricsModeConfig:
    num_samples: int = MISSING
    num_reference: Optional[int] = MISSING
    batch_size: Optional[int] = MISSING
    prompts_file: Optional[str] = MISSING
    kid_subsets: int = MISSING
    kid_subset_size: int = MISSING
    is_splits: int = MISSING
    pr_k: int = MISSING
    dc_k: int = MISSING
    judge: str = MISSING
    class_ids: Optional[List[int]] = MISSING
    save_images: bool = MISSING
    cache: bool = MISSING
    grid: int = MISSING
    samples_per_prompt: int = MISSING
    ci_subsets: int = MISSING
    ci_bootstrap: int = MISSING
    worst_prompts: int = MISSING


register_mode("metrics", stages=["metrics_check", "metrics"], schema=MetricsModeConfig)
