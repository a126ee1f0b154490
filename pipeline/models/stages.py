"""Stages shared by several modes: the model's scheduler config, the configured sampler, the loaded pipeline, the
adapter that drives it (``model``) and the feature extractors. A mode's own stages are in
``pipeline/<mode>/stage.py``."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import to_plain
from pipeline.core.registry import stage
from pipeline.errors import UserError
from pipeline.features import build_extractor
from pipeline.models.adapter import ModelAdapter
from pipeline.models.family import read_model_index
from pipeline.models.generation import check_eta
from pipeline.models.loading import load_pipeline, load_scheduler_config, resolve_device, resolve_dtype
from pipeline.models.schedulers import build_scheduler, stride_mismatch, zero_snr_warning

log = logging.getLogger(__name__)

# One loaded pipeline per process: jobs of a sweep that share model path/dtype/device reuse it (the basic
# launcher runs jobs in one process); a different model replaces it, so a checkpoint sweep holds one at a time.
_PIPE_CACHE: dict[tuple, object] = {}
_EXTRACTOR_CACHE: dict[tuple, object] = {}


def read_scheduler_setup(cfg) -> dict:
    """Only ``scheduler/scheduler_config.json`` (and, in a local pipeline directory, ``model_index.json``) of
    ``model.path``: no weights are read."""
    config, source = load_scheduler_config(cfg.model.path)
    local = Path(str(cfg.model.path)).expanduser()
    model_index = read_model_index(local) if local.is_dir() else None
    return {"config": config, "source": source, "model_index": model_index}


def make_sampler(cfg, setup: dict):
    """The ``scheduler=`` solver built ``from_config`` of the model's own scheduler config, with the ``sampler.*``
    schedule-zoo keys; a solver that does not fit the model (DDPM-family on a flow model, or the reverse), a zoo
    key it cannot take or an η it would ignore is a UserError."""
    sampler = build_scheduler(
        setup["config"],
        cfg.scheduler,
        source=setup["source"],
        model_index=setup.get("model_index"),
        sampler_cfg=cfg.sampler,  # the schedule zoo: sampler.sigmas / timestep_spacing / zero_terminal_snr / flow_shift
    )
    check_eta(sampler, float(cfg.sampler.eta))  # an η the solver would ignore is an error, not a silent label
    return sampler


def check_model(cfg) -> None:
    """The model checks that read no weights, for :func:`pipeline.run.runner.preflight` (before any MLflow run): the
    device exists, the model's scheduler config and index load, the configured solver fits the model."""

    resolve_device(cfg.model.device)
    make_sampler(cfg, read_scheduler_setup(cfg))


@stage("scheduler_config", produces=("scheduler_config",))
def scheduler_config_stage(ctx, cfg):
    """:func:`read_scheduler_setup`: no weights are read."""
    return {"scheduler_config": read_scheduler_setup(cfg)}


@stage("sampler", needs=("scheduler_config",), produces=("sampler",))
def sampler_stage(ctx, cfg):
    """:func:`make_sampler`, before any weights are loaded."""
    sc = ctx.get("scheduler_config")
    sampler = make_sampler(cfg, sc)
    ctx.tag("sampler.class", type(sampler).__name__)
    warning = zero_snr_warning(sc["config"], cfg.sampler)
    if warning is not None:  # Lin et al.: a model not trained with zero terminal SNR is sampled off-distribution
        log.warning(warning)
        ctx.tag("sampler.zero_terminal_snr", "off-distribution: the model was not trained with zero terminal SNR")
    mismatch = stride_mismatch(sampler, int(cfg.sampler.num_inference_steps))
    if mismatch is not None:
        log.warning("sampler: %s", mismatch)
        ctx.tag("sampler.stride_mismatch", mismatch)
    # the solver used, then the config it was built from (whose class is the model's own scheduler)
    log.info(
        "solver %s (scheduler=%s) from scheduler config %s (the model's %s)",
        type(sampler).__name__,
        cfg.scheduler.name,
        sc["source"],
        sc["config"].get("_class_name", "?"),
    )
    return {"sampler": sampler}


@stage("pipe", needs=("sampler",), produces=("pipe",))  # the solver is checked against the model before the weights
def pipe_stage(ctx, cfg):
    """The diffusers pipeline of ``model.path`` (weights), cached per process."""
    pipe, hit = cached_pipe(cfg.model, ctx.device)
    ctx.tag("model_cache", "hit" if hit else "miss")
    log.info("model cache %s for %s", "hit" if hit else "miss", cfg.model.path)
    return {"pipe": pipe}


def cached_pipe(m, device) -> tuple[object, bool]:
    """(the pipeline of model config ``m`` on ``device``, whether it was already loaded in this process)."""
    key = (str(m.path), str(resolve_dtype(m.dtype)), str(device), m.variant, m.revision, bool(m.allow_pickle))
    hit = key in _PIPE_CACHE
    if not hit:
        _PIPE_CACHE.clear()
        _PIPE_CACHE[key] = load_pipeline(m, device)
    return _PIPE_CACHE[key], hit


@stage("model", needs=("pipe",), produces=("model",))
def model_stage(ctx, cfg):
    """The loaded pipeline behind the one adapter every stage drives it through (``pipeline.models.adapter``)."""

    model = ModelAdapter(ctx.get("pipe"))
    ctx.tag("model.family", model.name)
    ctx.tag("generation.path", "native_call" if model.native else "adapter")
    return {"model": model}


@stage("extractors", produces=("extractors",))
def extractors_stage(ctx, cfg):
    """Every ``features=[...]`` extractor, in order (the first is primary), cached per process."""

    extractors = {}
    for name, fcfg in cfg.features.items():
        key = (name, repr(sorted(to_plain(fcfg).items())), str(ctx.device))
        if key not in _EXTRACTOR_CACHE:
            _EXTRACTOR_CACHE[key] = build_extractor(fcfg, ctx.device)
        extractors[name] = _EXTRACTOR_CACHE[key]
        ctx.tag(f"features.{name}", repr(extractors[name].describe()))
    if not extractors:
        raise UserError("features: no feature extractor selected; expected e.g. features=[shapes_net]")
    return {"extractors": extractors}
