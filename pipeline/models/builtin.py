"""Built-in model directories and the OmegaConf resolvers that locate them from yaml.

``${builtin:sd15_scheduler}`` -> a scheduler-only directory shipped in this package;
``${zoo:shapes_sd}`` -> a model trained by the project (``pipeline.zoo.locate``);
``${zoo_checkpoints:shapes_sd}`` -> its checkpoint directories, comma-separated, in training order (a sweep list);
``${family_solvers:${model.path}}`` -> the ``scheduler=`` options of that model's family, comma-separated (a sweep list;
``${family_solvers:${model.path},schedule}``: the smaller list of the schedule sweep);
``${schedule_zoo:${model.path},${scheduler.cls},${scheduler.family}}`` -> the ``sampler.sigmas`` values that solver
takes on that model, comma-separated (a sweep list; ``cls`` null: the model's own solver).
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


def _model_configs(model_path: str) -> tuple[dict, dict | None]:
    """(scheduler config, ``model_index.json`` or None) of the model at ``model_path``: no weights are read."""
    from pipeline.models.family import read_model_index
    from pipeline.models.loading import load_scheduler_config

    config, _ = load_scheduler_config(str(model_path))
    local = Path(str(model_path)).expanduser()
    return config, (read_model_index(local) if local.is_dir() else None)


SCHEDULE_SWEEP_DIFFUSION = ("ddim", "euler", "dpmpp_2m", "unipc")


def family_solvers(model_path: str, which: str = "all") -> str:
    """The solver options that fit the model at ``model_path``, comma-separated (a Hydra sweep list), read from its
    ``model_index.json`` and scheduler config (no weights): flow models flow_euler, flow_heun, flow_dpmpp_2m,
    flow_unipc (no flow_heun with a resolution-dependent shift); the others ddim, pndm, euler, euler_ancestral,
    heun, dpmpp_2m, unipc. ``which="schedule"``: the schedule sweep's list (diffusion: ddim, euler, dpmpp_2m, unipc;
    flow: all of them, which visit the same σ's by construction, flow_heun twice per step)."""
    from pipeline.models.schedulers import is_flow_model, solvers_for

    if which not in ("all", "schedule"):
        raise ValueError(f"family_solvers: second argument {which!r}; expected 'all' or 'schedule'")
    config, model_index = _model_configs(model_path)
    solvers = solvers_for(config, model_index)
    if which == "schedule" and not is_flow_model(config, model_index):
        solvers = SCHEDULE_SWEEP_DIFFUSION
    return ",".join(solvers)


def schedule_zoo(model_path: str, cls: str | None = None, family: str | None = None) -> str:
    """The ``sampler.sigmas`` options (default, karras, exponential, beta, ays) that the solver ``cls`` of scheduler
    family ``family`` (None: the model's own solver, ``scheduler=native``) takes on the model at ``model_path``,
    comma-separated (a Hydra sweep list), read from its scheduler config and ``model_index.json`` only (no weights):
    the ones :func:`pipeline.models.schedulers.build_scheduler` would not refuse."""
    from pipeline.models.schedulers import zoo_sigmas_for

    config, model_index = _model_configs(model_path)
    cls = None if cls in (None, "", "None", "null") else str(cls)
    family = "native" if family in (None, "", "None", "null") else str(getattr(family, "value", family))
    return ",".join(zoo_sigmas_for(config, model_index, cls, family))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("builtin"):
        OmegaConf.register_new_resolver("builtin", builtin_path)
    if not OmegaConf.has_resolver("zoo"):
        OmegaConf.register_new_resolver("zoo", zoo_path)
    if not OmegaConf.has_resolver("zoo_checkpoints"):
        OmegaConf.register_new_resolver("zoo_checkpoints", zoo_checkpoints)
    if not OmegaConf.has_resolver("family_solvers"):
        OmegaConf.register_new_resolver("family_solvers", family_solvers)
    if not OmegaConf.has_resolver("schedule_zoo"):
        OmegaConf.register_new_resolver("schedule_zoo", schedule_zoo)
