"""Stage and mode registry.

A *stage* is a function ``fn(ctx, cfg) -> dict`` that declares the named artifacts it ``needs`` from the run
context and the ones it ``produces``. A *mode* is a named list of stages plus a structured-config schema for
its ``mode.<name>`` block (and optional cross-key checks).

Every mode is one package ``pipeline/<M>/`` with the same rooms: ``mode.py`` (its schema, its checks and the
:func:`register_mode` call; light, no stage import), ``stage.py`` (its ``@stage`` functions), ``plots.py`` (its
figures) and its math in further modules. Stages several modes share are in the ``stages`` module of their room
(:data:`SHARED_STAGES`: ``pipeline/models/``, ``pipeline/data/``, ``pipeline/features/``).
:func:`load_modes` imports every ``mode.py`` (the config schema needs only these); :func:`load_stages` also
imports every ``stage.py`` (whoever runs stages calls it first). Adding a mode = one package ``pipeline/<M>/``
(mode.py, stage.py, plots.py, its math) + one yaml ``conf/mode/<M>.yaml`` (every default, with its comment) +
its name in :data:`MODE_PACKAGES`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "Stage",
    "Mode",
    "stage",
    "register_mode",
    "STAGES",
    "MODES",
    "MODE_PACKAGES",
    "SHARED_STAGES",
    "load_modes",
    "load_stages",
    "producer_of",
]

MODE_PACKAGES = ("schedule", "metrics", "attention", "latent")  # pipeline/<M>/, conf/mode/<M>.yaml
# stages several modes need, each in its room: scheduler config, sampler, model, extractors; reference, prompts;
# the reference features
SHARED_STAGES = ("pipeline.models.stages", "pipeline.data.stages", "pipeline.features.stages")


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[..., dict[str, Any]]
    needs: tuple[str, ...]
    produces: tuple[str, ...]


@dataclass(frozen=True)
class Mode:
    name: str
    stages: tuple[str, ...]
    schema: type  # dataclass validating conf/mode/<name>.yaml
    validate: Callable[[Any], None] | None = None  # cross-key checks, run before any stage (raise UserError)
    # stages that run only when the run's config asks for them (the schedule mode's trajectory part needs weights)
    optional: Callable[[Any], tuple[str, ...]] | None = None

    def stages_for(self, cfg: Any) -> tuple[str, ...]:
        """This mode's stages for run config ``cfg``: its own, then the optional ones the config asks for."""
        return self.stages + (tuple(self.optional(cfg)) if self.optional is not None else ())


STAGES: dict[str, Stage] = {}
MODES: dict[str, Mode] = {}


def stage(name: str, needs: tuple[str, ...] = (), produces: tuple[str, ...] = ()):
    """Register ``fn`` as stage ``name``."""

    def decorate(fn):
        if name in STAGES and STAGES[name].fn is not fn:
            raise ValueError(f"stage {name!r} registered twice")
        for artifact in produces:
            other = next((s for s in STAGES.values() if artifact in s.produces and s.name != name), None)
            if other is not None:
                raise ValueError(f"artifact {artifact!r} produced by both {other.name!r} and {name!r}")
        STAGES[name] = Stage(name, fn, tuple(needs), tuple(produces))
        return fn

    return decorate


def register_mode(
    name: str,
    stages: list[str] | tuple[str, ...],
    schema: type,
    validate: Callable[[Any], None] | None = None,
    optional: Callable[[Any], tuple[str, ...]] | None = None,
) -> None:
    MODES[name] = Mode(name, tuple(stages), schema, validate, optional)


def producer_of(artifact: str) -> Stage:
    for s in STAGES.values():
        if artifact in s.produces:
            return s
    raise KeyError(f"no registered stage produces artifact {artifact!r}")


_LOADED: set[str] = set()  # "modes", "stages": what load_modes / load_stages have registered


def _import_mode_module(name: str, room: str) -> None:
    importlib.import_module(f"pipeline.modes.{name}.{room}")


def load_modes() -> None:
    """Register every mode of :data:`MODE_PACKAGES` (imports ``pipeline.<M>.mode``; idempotent)."""
    if "modes" in _LOADED:
        return
    for name in MODE_PACKAGES:
        _import_mode_module(name, "mode")
    _LOADED.add("modes")


def load_stages() -> None:
    """Register every mode and every stage: the shared stages and each mode's ``pipeline.<M>.stage``
    (idempotent)."""
    if "stages" in _LOADED:
        return
    load_modes()
    for module in SHARED_STAGES:
        importlib.import_module(module)
    for name in MODE_PACKAGES:
        _import_mode_module(name, "stage")
    _LOADED.add("stages")
