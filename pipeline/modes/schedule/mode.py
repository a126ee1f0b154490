"""The schedule mode's ``mode.schedule`` schema and registration (no stage import: the config schema needs only
this). Every default and its explanation is in ``conf/mode/schedule.yaml``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from omegaconf import MISSING

from pipeline.config import bounded
from pipeline.core.registry import register_mode
from pipeline.modes.schedule.schedules import NamedSchedule


@dataclass
class ScheduleModeConfig:
    compare: List[NamedSchedule] = MISSING
    strict: bool = MISSING
    height: Optional[int] = bounded(ge=1)
    width: Optional[int] = bounded(ge=1)


register_mode("schedule", stages=["schedule"], schema=ScheduleModeConfig)
