"""The schedule mode's ``mode.schedule`` schema and registration (no stage import: the config schema needs only
this). Every default and its explanation is in ``conf/mode/schedule.yaml``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from omegaconf import MISSING

from pipeline.config import bounded, group_options
from pipeline.core.registry import register_mode
from pipeline.errors import UserError
from pipeline.modes.schedule.schedules import NamedSchedule


@dataclass
class ScheduleModeConfig:
    compare: List[NamedSchedule] = MISSING
    strict: bool = MISSING
    height: Optional[int] = bounded(ge=1)
    width: Optional[int] = bounded(ge=1)
    # the trajectory part (pipeline/modes/schedule/trajectory.py): error against a reference solution
    trajectory: bool = MISSING
    trajectory_samples: int = bounded(ge=2, note="K conditions × one seed each; ≥ 2 for an interval")
    solvers: List[str] = MISSING
    step_counts: List[int] = MISSING
    reference_solver: Optional[str] = MISSING
    reference_steps: int = bounded(ge=2)
    reference_max_steps: int = bounded(ge=2)
    step_shares: bool = MISSING


def validate(cfg) -> None:
    """The study's option names and step counts, before any work."""
    m = cfg.mode.schedule
    if not m.trajectory:
        return
    options = group_options("scheduler")
    for key, names in (
        ("solvers", list(m.solvers or [])),
        ("reference_solver", [m.reference_solver] if m.reference_solver else []),
    ):
        bad = [n for n in names if str(n) not in options]
        if bad:
            raise UserError(f"mode.schedule.{key}: {bad} not a scheduler option; expected some of {options}")
    counts = [int(s) for s in (m.step_counts or [])]
    if any(s < 1 for s in counts) or len(set(counts)) != len(counts):
        raise UserError(f"mode.schedule.step_counts: {counts}; expected distinct step counts ≥ 1")
    from pipeline.modes.schedule.trajectory import check_study_solvers  # torch and diffusers: only when asked

    check_study_solvers(cfg)
    if int(m.reference_steps) <= max(counts or [int(cfg.sampler.num_inference_steps)]):
        raise UserError(
            f"mode.schedule.reference_steps={m.reference_steps} is not above the study's largest step count "
            f"{max(counts or [int(cfg.sampler.num_inference_steps)])}; a reference must be finer than what it judges"
        )


def optional_stages(cfg) -> tuple[str, ...]:
    m = cfg.mode.get("schedule") if cfg.get("mode") is not None else None
    return ("trajectory",) if m is not None and m.get("trajectory") else ()


register_mode("schedule", stages=["schedule"], schema=ScheduleModeConfig, validate=validate, optional=optional_stages)
