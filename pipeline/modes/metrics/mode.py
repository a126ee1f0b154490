"""The metrics mode's ``mode.metrics`` schema, its cross-key checks and registration (no stage import: the config
schema needs only this). Every default and its explanation is in ``conf/mode/metrics.yaml``; :func:`validate` runs in
the runner's preflight, before any MLflow run or work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from omegaconf import MISSING

from pipeline.config import bounded
from pipeline.core.registry import register_mode
from pipeline.data.ground_truth import no_judge
from pipeline.data.reference import missing_root
from pipeline.data.stages import num_reference
from pipeline.errors import UserError
from pipeline.models.family import check_mode_support


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
    samples_per_prompt: Optional[int] = bounded(ge=1, note="null = 1, or 4 with per_prompt=true")
    per_prompt: bool = MISSING
    ci_subsets: int = bounded(ge=2, note="replicates for an interval")
    ci_bootstrap: int = bounded(ge=2, note="replicates for an interval")
    worst_prompts: int = bounded(ge=0, note="0 = no worst-prompts figure")
    cost: bool = MISSING


def validate(cfg) -> None:
    """Cross-key checks of ``mode.metrics``, the dataset and the model's class, before any MLflow run or work (the
    single-key ranges are the schema's)."""
    m = cfg.mode.metrics
    k_max = max(m.pr_k, m.dc_k)
    for key, n in (("mode.metrics.num_samples", m.num_samples), ("mode.metrics.num_reference", num_reference(cfg))):
        if n < k_max + 1:
            raise UserError(
                f"{key}={n}: precision/recall (k={m.pr_k}) and density/coverage (k={m.dc_k}) need at "
                f"least k+1 = {k_max + 1} samples"
            )
    if m.judge not in ("auto", "on", "off"):
        raise UserError(f"mode.metrics.judge={m.judge!r}; expected auto, on or off")
    if missing_root(cfg.dataset):  # the metrics mode compares against the dataset's reference images
        raise UserError(missing_root(cfg.dataset))
    if m.judge == "on" and no_judge(cfg.dataset, "judge prompt adherence with"):
        raise UserError(
            f"mode.metrics.judge=on: {no_judge(cfg.dataset, 'judge prompt adherence with')}; set "
            "mode.metrics.judge=auto or off"
        )
    check_mode_support(cfg.model.path, "metrics")  # a class the adapter cannot drive: refused before any work


register_mode("metrics", stages=["metrics_check", "metrics"], schema=MetricsModeConfig, validate=validate)
