"""Stages shared by several modes: reading the model's scheduler config and building the configured sampler."""

from __future__ import annotations

import logging

from pipeline.models.loading import load_scheduler_config
from pipeline.models.schedulers import build_scheduler
from pipeline.registry import stage

log = logging.getLogger(__name__)


@stage("scheduler_config", produces=("scheduler_config",))
def scheduler_config_stage(ctx, cfg):
    """Only ``scheduler/scheduler_config.json`` of ``model.path``: no weights are read."""
    config, source = load_scheduler_config(cfg.model.path)
    log.info("scheduler config %s (%s)", source, config.get("_class_name", "?"))
    return {"scheduler_config": {"config": config, "source": source}}


@stage("sampler", needs=("scheduler_config",), produces=("sampler",))
def sampler_stage(ctx, cfg):
    """The ``scheduler=`` solver built ``from_config`` of the model's own scheduler config."""
    sc = ctx.get("scheduler_config")
    sampler = build_scheduler(sc["config"], cfg.scheduler, source=sc["source"])
    ctx.tag("sampler.class", type(sampler).__name__)
    return {"sampler": sampler}
