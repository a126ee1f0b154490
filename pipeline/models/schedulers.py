"""Build the configured sampler (a diffusers scheduler) from the model's own scheduler config, and set its
timesteps the way the model family's own pipeline does.

Every ``scheduler=`` option (conf/scheduler/*.yaml, :class:`pipeline.config.SchedulerConfig`) says what it solves:

=========  =================================================================================================
native     the model's scheduler config untouched (class and every key, ``timestep_spacing`` and ``steps_offset``
           included); the default. Keys the option (or a preset, e.g. ``zero_snr``) sets still apply.
diffusion  a DDPM-family solver (ε / v / x₀ on a β schedule): ``<cls>.from_config(model's config, **overrides)``;
           ``timestep_spacing`` and ``steps_offset`` pinned so a solver sweep changes only the solver
flow       a rectified-flow solver (velocity on σ ∈ [0, 1]): FlowMatch* classes, or DPM-Solver++ / UniPC with
           ``use_flow_sigmas``, ``flow_shift`` = the model's ``shift`` and its dynamic-shift keys copied
=========  =================================================================================================

A model is *flow* when its scheduler config's class is ``FlowMatch*`` or its ``model_index.json`` names a flow family
(:mod:`pipeline.models.family`). A diffusion option on a flow model, a flow option on a diffusion model and a
static-shift-only solver on a resolution-dependent-shift model are refused in :func:`build_scheduler`, which the
``sampler`` stage calls before any weights are loaded.

Notation (code name -> paper name), flow models:
    sigma           σ ∈ [0, 1]: x_σ = (1 − σ) x₀ + σ ε   (rectified flow; timestep = σ · num_train_timesteps)
    shift           s: σ(u) = s·u / (1 + (s − 1)·u) over uniform time u (SD3, static)
    mu              μ: σ(u) = e^μ / (e^μ + 1/u − 1) (Flux, resolution-dependent: μ linear in the image token count)
"""

from __future__ import annotations

import inspect
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from pipeline.errors import UserError
from pipeline.models.families import FAMILIES, FamilyDriver
from pipeline.models.families.base import driver_named
from pipeline.models.family import family_in_index
from pipeline.models.flow_shift import calculate_shift, uses_dynamic_shift

__all__ = [
    "DIFFUSION_SOLVERS",
    "FLOW_SOLVERS",
    "STATIC_SHIFT_ONLY",
    "build_scheduler",
    "scheduler_class",
    "scheduler_overrides",
    "is_flow_model",
    "native_flow_sigmas",
    "uses_dynamic_shift",
    "solvers_for",
    "calculate_shift",
    "flow_mu",
    "flow_pipeline_kwargs",
    "flow_shift",
    "set_flow_timesteps",
    "set_flow_timesteps_as",
]

# the sweep lists of ${family_solvers:...} (pipeline/models/builtin.py), in sweep order; tests check them against
# the `family:` of conf/scheduler/*.yaml
DIFFUSION_SOLVERS = ("ddim", "pndm", "euler", "euler_ancestral", "heun", "dpmpp_2m", "unipc")
FLOW_SOLVERS = ("flow_euler", "flow_heun", "flow_dpmpp_2m", "flow_unipc")
STATIC_SHIFT_ONLY = ("flow_heun",)  # FlowMatchHeunDiscreteScheduler has no use_dynamic_shifting / mu

# the model's flow keys a flow solver takes (where its class has them) and carries in its config (``_flow_reference``),
# so that set_flow_timesteps can rebuild the model's own FlowMatchEuler schedule from the sampler alone
_FLOW_KEYS = (
    "num_train_timesteps",
    "shift",
    "use_dynamic_shifting",
    "base_shift",
    "max_shift",
    "base_image_seq_len",
    "max_image_seq_len",
    "time_shift_type",
    "shift_terminal",
    "invert_sigmas",
)


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def _init_params(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def scheduler_class(name: str) -> type:
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise UserError(f"scheduler.cls: {name!r} is not a diffusers scheduler class (e.g. DDIMScheduler)")
    return cls


def scheduler_overrides(sched_cfg: Any) -> dict[str, Any]:
    """The option's ``options`` plus ``timestep_spacing`` / ``steps_offset`` where set (None keeps the model's)."""
    options = dict(sched_cfg.options or {})
    if sched_cfg.timestep_spacing is not None:
        options["timestep_spacing"] = _value(sched_cfg.timestep_spacing)
    if sched_cfg.steps_offset is not None:
        options["steps_offset"] = int(sched_cfg.steps_offset)
    return options


# ---------------------------------------------------------------------------------------------- what the model is
def native_flow_sigmas(scheduler_config: dict[str, Any]) -> bool:
    """The model's own flow solver is not FlowMatch* but DPM-Solver / UniPC on ``use_flow_sigmas`` (Sana): its
    shift is ``flow_shift`` and its σ's are that solver's own discretisation (``set_timesteps(N)``), which the
    FlowMatchEuler reference of the flow_* options does not rebuild. False for those options' samplers
    (``_flow_reference``)."""
    return (
        bool(scheduler_config.get("use_flow_sigmas"))
        and not str(scheduler_config.get("_class_name") or "").startswith("FlowMatch")
        and "_flow_reference" not in scheduler_config
    )


def is_flow_model(scheduler_config: dict[str, Any], model_index: dict | None = None) -> bool:
    """A ``FlowMatch*`` scheduler config (or a solver on flow σ's, :func:`native_flow_sigmas`), or a pipeline class
    of a flow family in ``model_index.json``."""
    if str(scheduler_config.get("_class_name") or "").startswith("FlowMatch") or native_flow_sigmas(scheduler_config):
        return True
    family = family_in_index(model_index)
    return bool(family is not None and family.flow)


def solvers_for(scheduler_config: dict[str, Any], model_index: dict | None = None) -> tuple[str, ...]:
    """The solver options of this model's family (no ``native``, no ``ddpm``): the sweep list of
    ``${family_solvers:...}``."""
    if not is_flow_model(scheduler_config, model_index):
        return DIFFUSION_SOLVERS
    if native_flow_sigmas(scheduler_config):
        return ()  # only its own solver visits its σ's (see _check_fits)
    if uses_dynamic_shift(scheduler_config):
        return tuple(s for s in FLOW_SOLVERS if s not in STATIC_SHIFT_ONLY)
    return FLOW_SOLVERS


def _model_desc(scheduler_config: dict[str, Any], model_index: dict | None) -> str:
    pipeline = (model_index or {}).get("_class_name")
    return f"{scheduler_config.get('_class_name', '?')}" + (f", {pipeline}" if pipeline else "")


def _check_fits(
    name: str, family: str, cls: type, base_config: dict[str, Any], model_index: dict | None, source: str
) -> None:
    """Refuse a solver that cannot drive this model, naming the option and the ones that fit."""
    flow = is_flow_model(base_config, model_index)
    fits = ", ".join(("native",) + solvers_for(base_config, model_index))
    if family not in ("native", "diffusion", "flow"):
        raise UserError(f"scheduler.family: {family!r} for scheduler={name}; expected native, diffusion or flow")
    if flow and family == "diffusion":
        raise UserError(
            f"scheduler={name}: a DDPM-family solver ({cls.__name__} on a β schedule), but the model is a "
            f"rectified-flow model ({_model_desc(base_config, model_index)}; {source}); options that fit: {fits}"
        )
    if not flow and family == "flow":
        raise UserError(
            f"scheduler={name}: a rectified-flow solver, but the model is a diffusion model "
            f"({_model_desc(base_config, model_index)}; {source}); options that fit: {fits}"
        )
    if family == "flow" and native_flow_sigmas(base_config):
        raise UserError(
            f"scheduler={name}: the model's own solver is {base_config.get('_class_name')} on flow sigmas "
            f"(use_flow_sigmas, flow_shift {base_config.get('flow_shift', 1.0)}; "
            f"{_model_desc(base_config, model_index)}; {source}); the flow_* options rebuild a model's σ's from "
            f"a FlowMatchEuler schedule, which would not be the ones this model samples with; options that fit: {fits}"
        )
    if (
        flow
        and family == "flow"
        and uses_dynamic_shift(base_config)
        and "use_dynamic_shifting" not in _init_params(cls)
    ):
        raise UserError(
            f"scheduler={name}: {cls.__name__} takes a static shift only, but the model's scheduler uses a "
            f"resolution-dependent shift (use_dynamic_shifting: true, as Flux-dev; {source}); options that fit: {fits}"
        )


def _flow_overrides(base_config: dict[str, Any], cls: type) -> dict[str, Any]:
    """The model's flow keys ``cls`` takes, and its ``shift`` as ``flow_shift`` (DPM-Solver / UniPC): ``from_config``
    would silently ignore ``shift``, a key those classes do not take."""
    params = _init_params(cls)
    out = {k: base_config[k] for k in _FLOW_KEYS if k in base_config and k in params}
    if "flow_shift" in params:
        out["flow_shift"] = float(base_config.get("shift", 1.0))
    return out


def build_scheduler(
    base_config: dict[str, Any], sched_cfg: Any, source: str = "scheduler config", model_index: dict | None = None
):
    """The ``scheduler=`` option built from the model's scheduler config (``model_index``: the model's
    ``model_index.json`` when there is one). Refusals and build failures are UserErrors naming the option / source."""
    name = sched_cfg.name
    family = str(_value(getattr(sched_cfg, "family", None) or "diffusion"))
    cls_name = sched_cfg.cls or base_config.get("_class_name")
    if not cls_name:
        raise UserError(
            f"scheduler={name}: {source} has no _class_name, so there is no native solver to keep; "
            "choose one, e.g. scheduler=ddim"
        )
    cls = scheduler_class(cls_name)
    _check_fits(name, family, cls, base_config, model_index, source)
    overrides = scheduler_overrides(sched_cfg)
    reference = None
    if family == "flow":
        # the model's FlowMatch keys travel in the sampler's own config (it *is* its config, copies keep them) under
        # one private key; keys the class does not take are not passed (from_config would keep them and every copy
        # would warn about them)
        reference = {k: base_config[k] for k in _FLOW_KEYS if k in base_config}
        params = _init_params(cls)
        base_config = {k: v for k, v in base_config.items() if k in params or k.startswith("_")}
        overrides = {**_flow_overrides(reference, cls), **overrides}
    try:
        sampler = cls.from_config(base_config, **overrides)
    except Exception as e:  # bad beta_schedule, trained_betas of the wrong length, ...
        raise UserError(f"{source}: {cls_name} could not be built from it: {type(e).__name__}: {e}") from e
    if reference is not None:
        sampler.register_to_config(_flow_reference=reference)
    return sampler


# ---------------------------------------------------------------------------------------------- flow timesteps
def _flow_driver(family_name: str | None, strict: bool = True) -> type[FamilyDriver]:
    """The driver whose flow conventions apply: the flow family's, or (None: a scheduler-only directory) the
    scheduler's own defaults. ``strict``: any other name is a ValueError."""
    driver = driver_named(family_name)
    if driver is not None and driver.family.flow:
        return driver
    if strict and family_name is not None:
        flow = sorted(f.name for f in FAMILIES.values() if f.flow)
        raise ValueError(f"family_name: expected one of {flow} or None (the flow families), got {family_name!r}")
    return FamilyDriver


def flow_mu(config: Any, image_seq_len: int | None, family_name: str | None) -> float | None:
    """μ the family's pipeline passes for ``image_seq_len`` image tokens; None on a static-shift model."""
    return _flow_driver(family_name, strict=False).flow_mu(config, image_seq_len)


def flow_pipeline_kwargs(
    config: Any, num_inference_steps: int, image_seq_len: int | None, family_name: str | None
) -> dict[str, Any]:
    """The family pipeline's ``retrieve_timesteps`` arguments besides the device, for a scheduler with ``config``
    (:meth:`FamilyDriver.flow_timestep_kwargs`); ``family_name`` None (a scheduler-only directory): the scheduler's
    own default."""
    return _flow_driver(family_name).flow_timestep_kwargs(config, num_inference_steps, image_seq_len)


def _reference(sampler) -> Any:
    """A fresh FlowMatchEulerDiscreteScheduler of the model's schedule, from the flow keys the sampler carries."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = sampler.config.get("_flow_reference")  # set by build_scheduler for the flow_* options
    if config is None:  # a FlowMatch scheduler of the model's own (scheduler=native)
        params = _init_params(FlowMatchEulerDiscreteScheduler)
        config = {k: v for k, v in dict(sampler.config).items() if k in params}
        if native_flow_sigmas(sampler.config):  # DPM-Solver / UniPC on flow σ's (Sana): the shift is flow_shift
            config["shift"] = float(sampler.config.get("flow_shift", 1.0))
    return FlowMatchEulerDiscreteScheduler.from_config(dict(config))


def flow_shift(
    sampler,
    image_seq_len: int | None = None,
    family_name: str | None = None,
    mu: float | None = None,
    num_inference_steps: int | None = None,
) -> float:
    """The shift s of σ(u) = s·u / (1 + (s − 1)·u) the sampler's model samples with: its static ``shift``, or at
    ``image_seq_len`` tokens (or the given ``mu``) e^μ (μ for ``time_shift_type: linear``). With
    ``num_inference_steps``, a dynamic shift's μ is the one the family's pipeline passes at that many steps (FLUX.2's
    empirical μ depends on them)."""
    ref = _reference(sampler)
    if mu is None and num_inference_steps is not None and uses_dynamic_shift(ref.config):
        driver = _flow_driver(family_name, strict=False)
        mu = driver.flow_timestep_kwargs(ref.config, num_inference_steps, image_seq_len).get("mu")
    mu = flow_mu(ref.config, image_seq_len, family_name) if mu is None else mu
    if mu is None:
        return float(ref.config.shift)
    return float(np.exp(mu)) if ref.config.time_shift_type == "exponential" else float(mu)


def set_flow_timesteps(
    sampler,
    num_inference_steps: int,
    device: str | torch.device | None = None,
    image_seq_len: int | None = None,
    family_name: str | None = None,
) -> None:
    """``sampler.set_timesteps`` for a flow model, exactly as the family's pipeline (``"sd3"`` / ``"flux"``) calls it on
    its FlowMatchEulerDiscreteScheduler: static shift, or μ from ``image_seq_len`` image tokens (Flux: 2×2-packed
    latent tokens; SD3: latent patches).

    Every flow solver then visits the same σ's, and evaluates the model at the same float timesteps σ·T, as that
    call: FlowMatchEuler is called directly; FlowMatchHeun, DPM-Solver++ and UniPC are reset by their own
    ``set_timesteps`` and given those σ's (laid out as they lay out their own). Their own discretisations differ:
    DPM-Solver's flow σ's start at shift(1 − 1/T), UniPC's at 1 − 1e-6 and on Flux without the pipeline's
    ``linspace(1, 1/N, N)``, FlowMatchHeun takes no σ's on Flux; DPM-Solver and UniPC round timesteps to integers."""
    kwargs = flow_pipeline_kwargs(_reference(sampler).config, num_inference_steps, image_seq_len, family_name)
    set_flow_timesteps_as(sampler, kwargs, device)


def set_flow_timesteps_as(sampler, kwargs: dict[str, Any], device: str | torch.device | None = None) -> None:
    """:func:`set_flow_timesteps` with the pipeline's ``set_timesteps`` arguments given (e.g. recorded from a
    native pipeline's own call): FlowMatchEuler takes them as they are, any other flow solver the σ's they make."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(sampler, FlowMatchEulerDiscreteScheduler) or native_flow_sigmas(sampler.config):
        sampler.set_timesteps(device=device, **kwargs)  # the model's own solver, called as its pipeline calls it
        return
    ref = _reference(sampler)
    ref.set_timesteps(device=device, **kwargs)
    _install_sigmas(sampler, ref.sigmas[:-1], device, kwargs.get("mu"))


def _install_sigmas(sampler, sigmas: torch.Tensor, device, mu: float | None) -> None:
    """Reset ``sampler`` with its own ``set_timesteps``, then give it ``sigmas`` (N, without the terminal 0) and
    the float timesteps σ·T."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler

    n = len(sigmas)
    T = int(sampler.config.num_train_timesteps)
    sigmas = sigmas.detach().to("cpu", torch.float32)
    timesteps = sigmas * T
    if isinstance(sampler, FlowMatchHeunDiscreteScheduler):
        sampler.set_timesteps(n, device=device)  # clears dt / prev_derivative / step index
        sampler.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]).to(device)
        s = torch.cat([sigmas, torch.zeros(1)])
        sampler.sigmas = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]]).to(device)
    elif isinstance(sampler, (DPMSolverMultistepScheduler, UniPCMultistepScheduler)):
        if not sampler.config.get("use_flow_sigmas", False):
            raise UserError(
                f"scheduler.options: {type(sampler).__name__} on a flow model needs use_flow_sigmas: true "
                "and prediction_type: flow_prediction (as scheduler=flow_dpmpp_2m / flow_unipc set)"
            )
        # DPM-Solver gets no mu (it would rewrite config.flow_shift); UniPC requires it with use_dynamic_shifting
        takes_mu = isinstance(sampler, UniPCMultistepScheduler) and uses_dynamic_shift(sampler.config)
        sampler.set_timesteps(n, device=device, **({"mu": mu} if takes_mu else {}))  # clears the multistep history
        sampler.sigmas = torch.cat([sigmas, torch.zeros(1)])  # kept on the CPU, as they keep theirs
        sampler.timesteps = timesteps.to(device)
    else:
        raise UserError(
            f"scheduler.cls: {type(sampler).__name__} is not a flow solver this project can drive; "
            "expected FlowMatchEulerDiscrete / FlowMatchHeunDiscrete, or DPMSolverMultistep / "
            "UniPCMultistep with use_flow_sigmas"
        )
