"""Stage and mode registry.

A *stage* is a function ``fn(ctx, cfg) -> dict`` that declares the named artifacts it ``needs`` from the run
context and the ones it ``produces``. A *mode* is a named list of stages plus a structured-config schema for
its ``mode.<name>`` block. Adding a mode = one file in ``pipeline/stages/`` + one yaml in ``conf/mode/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Stage", "Mode", "stage", "register_mode", "STAGES", "MODES", "producer_of"]


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


def register_mode(name: str, stages: list[str] | tuple[str, ...], schema: type,
                  validate: Callable[[Any], None] | None = None) -> None:
    MODES[name] = Mode(name, tuple(stages), schema, validate)


def producer_of(artifact: str) -> Stage:
    for s in STAGES.values():
        if artifact in s.produces:
            return s
    raise KeyError(f"no registered stage produces artifact {artifact!r}")
