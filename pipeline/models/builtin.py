"""Built-in model directories and the OmegaConf resolvers that locate them from yaml.

``${builtin:sd15_scheduler}`` -> a scheduler-only directory shipped in this package;
``${zoo:shapes_sd}`` -> a model trained by the project (``pipeline.zoo.locate``);
``${zoo_checkpoints:shapes_sd}`` -> its checkpoint directories, comma-separated, in training order (a sweep list);
``${family_solvers:${model.path}}`` -> the ``scheduler=`` options of that model's family, comma-separated (a sweep list;
``${family_solvers:${model.path},schedule}``: the smaller list of the schedule sweep).
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


SCHEDULE_SWEEP_DIFFUSION = ("ddim", "euler", "dpmpp_2m", "unipc")


def family_solvers(model_path: str, which: str = "all") -> str:
    """The solver options that fit the model at ``model_path``, comma-separated (a Hydra sweep list), read from its
    ``model_index.json`` and scheduler config (no weights): flow models flow_euler, flow_heun, flow_dpmpp_2m,
    flow_unipc (no flow_heun with a resolution-dependent shift); the others ddim, pndm, euler, euler_ancestral,
    heun, dpmpp_2m, unipc. ``which="schedule"``: the schedule sweep's list (diffusion: ddim, euler, dpmpp_2m, unipc;
    flow: all of them, which visit the same σ's by construction, flow_heun twice per step)."""
    from pipeline.models.family import read_model_index
    from pipeline.models.loading import load_scheduler_config
    from pipeline.models.schedulers import is_flow_model, solvers_for

    if which not in ("all", "schedule"):
        raise ValueError(f"family_solvers: second argument {which!r}; expected 'all' or 'schedule'")
    config, _ = load_scheduler_config(str(model_path))
    local = Path(str(model_path)).expanduser()
    model_index = read_model_index(local) if local.is_dir() else None
    solvers = solvers_for(config, model_index)
    if which == "schedule" and not is_flow_model(config, model_index):
        solvers = SCHEDULE_SWEEP_DIFFUSION
    return ",".join(solvers)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("builtin"):
        OmegaConf.register_new_resolver("builtin", builtin_path)
    if not OmegaConf.has_resolver("zoo"):
        OmegaConf.register_new_resolver("zoo", zoo_path)
    if not OmegaConf.has_resolver("zoo_checkpoints"):
        OmegaConf.register_new_resolver("zoo_checkpoints", zoo_checkpoints)
    if not OmegaConf.has_resolver("family_solvers"):
        OmegaConf.register_new_resolver("family_solvers", family_solvers)
