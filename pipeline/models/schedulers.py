"""Build the configured sampler (a diffusers scheduler) from the model's own scheduler config.

Only the solver class and the keys the ``scheduler=`` option sets are overridden; ``timestep_spacing`` and
``steps_offset`` are always set explicitly so a solver sweep changes only the solver.
"""

from __future__ import annotations

from typing import Any

import diffusers
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from pipeline.errors import UserError


def scheduler_class(name: str) -> type:
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise UserError(f"scheduler.cls: {name!r} is not a diffusers scheduler class (e.g. DDIMScheduler)")
    return cls


def scheduler_overrides(sched_cfg: Any) -> dict[str, Any]:
    options = dict(sched_cfg.options or {})
    options["timestep_spacing"] = getattr(sched_cfg.timestep_spacing, "value", sched_cfg.timestep_spacing)
    options["steps_offset"] = int(sched_cfg.steps_offset)
    return options


def build_scheduler(base_config: dict[str, Any], sched_cfg: Any, source: str = "scheduler config"):
    """``<sched_cfg.cls>.from_config(base_config, **overrides)``; failures name the config's source."""
    cls = scheduler_class(sched_cfg.cls)
    try:
        return cls.from_config(base_config, **scheduler_overrides(sched_cfg))
    except Exception as e:  # bad beta_schedule, trained_betas of the wrong length, ...
        raise UserError(f"{source}: {sched_cfg.cls} could not be built from it: {type(e).__name__}: {e}") from e
