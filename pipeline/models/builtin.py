"""Built-in model directories and the OmegaConf resolvers that locate them from yaml.

``${builtin:sd15_scheduler}`` -> a scheduler-only directory shipped in this package;
``${zoo:shapes_sd}`` -> a model trained by the project (``pipeline.zoo.locate``);
``${zoo_checkpoints:shapes_sd}`` -> its checkpoint directories, comma-separated, in training order (a sweep list).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"


def builtin_path(name: str) -> str:
    path = BUILTIN_DIR / name
    if not path.is_dir():
        known = sorted(p.name for p in BUILTIN_DIR.iterdir() if p.is_dir())
        raise KeyError(f"unknown built-in model {name!r}; expected one of {known}")
    return str(path)


def zoo_path(name: str) -> str:
    from pipeline import zoo

    return str(zoo.locate(name))


def zoo_checkpoints(name: str) -> str:
    """Comma-separated checkpoint directories of a zoo model (final model last): a Hydra sweep list."""
    from pipeline import zoo

    return ",".join(str(p) for p in zoo.checkpoints(name))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("builtin"):
        OmegaConf.register_new_resolver("builtin", builtin_path)
    if not OmegaConf.has_resolver("zoo"):
        OmegaConf.register_new_resolver("zoo", zoo_path)
    if not OmegaConf.has_resolver("zoo_checkpoints"):
        OmegaConf.register_new_resolver("zoo_checkpoints", zoo_checkpoints)
