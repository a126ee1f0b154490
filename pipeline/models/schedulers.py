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

The schedule zoo (``sampler.sigmas`` / ``timestep_spacing`` / ``zero_terminal_snr`` / ``flow_shift``,
:class:`pipeline.config.SamplerConfig`) is applied in :func:`build_scheduler` too (refusals name the key, the
value, why and what fits), and carried in the sampler's own config, so copies (``type(s).from_config(s.config)``)
keep it; AYS is applied where timesteps are set, by :func:`set_diffusion_timesteps` (every non-flow
``set_timesteps`` goes through it).

Notation (code name -> paper name), flow models:
    sigma           σ ∈ [0, 1]: x_σ = (1 − σ) x₀ + σ ε   (rectified flow; timestep = σ · num_train_timesteps)
    shift           s: σ(u) = s·u / (1 + (s − 1)·u) over uniform time u (SD3, static)
    mu              μ: σ(u) = e^μ / (e^μ + 1/u − 1) (Flux, resolution-dependent: μ linear in the image token count)
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from omegaconf import OmegaConf

from pipeline.errors import UserError
from pipeline.models.families import FAMILIES, FamilyDriver
from pipeline.models.families.base import driver_named
from pipeline.models.family import family_in_index
from pipeline.models.flow_shift import calculate_shift, uses_dynamic_shift

log = logging.getLogger(__name__)

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
    "SIGMA_KEYS",
    "SIGMA_OPTIONS",
    "AYS_LISTS",
    "ays_sigmas",
    "sigma_to_timestep",
    "set_diffusion_timesteps",
    "zoo_options",
    "zoo_sigmas_for",
    "zero_snr_warning",
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


# ---------------------------------------------------------------------------------------------- the schedule zoo
# sampler.sigmas -> the diffusers config key of the solver class (on flow models: of the FlowMatchEuler reference)
SIGMA_KEYS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}
# Align Your Steps (Sabour et al. 2024): family -> the diffusers.schedulers.AysSchedules list of its 10 steps' σ's
AYS_LISTS = {"sd": "StableDiffusionSigmas", "sdxl": "StableDiffusionXLSigmas"}
# the values of pipeline.config.SigmaSchedule, in its order (tests check they are the same; pipeline.config is not
# imported here: it registers the resolvers, which import this module)
SIGMA_OPTIONS = ("default", *SIGMA_KEYS, "ays")
_CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # pipeline.config.CONF_DIR
_NO_ZOO = {"sigmas": "default", "timestep_spacing": None, "zero_terminal_snr": False, "flow_shift": None}


def zoo_options(sampler_cfg: Any) -> dict[str, Any]:
    """The schedule-zoo keys of a ``sampler`` block as plain values (None, or a block without them, e.g. an older
    saved config: the defaults, which change nothing)."""
    if sampler_cfg is None:
        return dict(_NO_ZOO)
    get = sampler_cfg.get if isinstance(sampler_cfg, dict) else lambda k, d: getattr(sampler_cfg, k, d)
    spacing, shift = get("timestep_spacing", None), get("flow_shift", None)
    return {
        "sigmas": str(_value(get("sigmas", None) or "default")),
        "timestep_spacing": None if spacing is None else str(_value(spacing)),
        "zero_terminal_snr": bool(get("zero_terminal_snr", False)),
        "flow_shift": None if shift is None else float(shift),
    }


def _scheduler_options() -> list[tuple[str, str, str]]:
    """(name, family, class name) of every conf/scheduler option with a class (for the refusals' "what fits")."""
    out = []
    for path in sorted((_CONF_DIR / "scheduler").glob("*.yaml")):
        opt = OmegaConf.load(path)
        if opt.get("cls"):
            out.append((str(opt.get("name", path.stem)), str(opt.get("family", "diffusion")), str(opt.cls)))
    return out


def _options_where(test, family: str = "diffusion") -> str:
    """The scheduler= options of ``family`` whose class passes ``test(cls)``, as ``name (Class)``."""
    fits = [f"{n} ({c})" for n, f, c in _scheduler_options() if f == family and test(scheduler_class(c))]
    return "scheduler=" + ", ".join(fits) if fits else "no scheduler= option"


def _ays_route(cls: type) -> str | None:
    """How ``cls.set_timesteps`` takes a custom schedule: ``"sigmas"`` (EulerDiscrete: the σ's themselves),
    ``"timesteps"`` (t(σ), :func:`sigma_to_timestep`), or None (neither: DDIM, PNDM, Euler-ancestral; UniPC takes
    ``sigmas`` only with ``use_flow_sigmas``, i.e. on flow models)."""
    takes = set(inspect.signature(cls.set_timesteps).parameters)
    if "sigmas" in takes and "use_flow_sigmas" not in _init_params(cls):
        return "sigmas"
    return "timesteps" if "timesteps" in takes else None


def ays_sigmas(listed: Any, num_inference_steps: int) -> np.ndarray:
    """The N + 1 σ's (terminal 0 last) of an AYS list's non-zero σ's ``listed`` (σ_max first) at N steps: the list
    itself at its own length, else log σ interpolated linearly over linspace(0, 1, len) at linspace(0, 1, N) — the
    AYS paper's ``loglinear_interp`` (Sabour et al. 2024, the step counts its lists do not give)."""
    listed = np.asarray(listed, dtype=np.float64)
    n = int(num_inference_steps)
    if n == len(listed):
        sig = listed
    else:
        sig = np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(listed)), np.log(listed)))
    return np.concatenate([sig, [0.0]])


def sigma_to_timestep(sampler, sigmas: np.ndarray) -> np.ndarray:
    """Integer training timesteps t(σ) of ``sampler``'s β schedule: log σ interpolated over the log training σ's
    σ_t = √((1 − ᾱ_t)/ᾱ_t), rounded (as diffusers' ``_sigma_to_t``, then rounded). For SD's β schedule this gives
    diffusers' ``AysSchedules["StableDiffusionTimesteps"]`` from ``StableDiffusionSigmas`` except 125 for 124 at
    σ = 0.399 (t = 124.56: the list truncates there), and ``StableDiffusionXLTimesteps`` exactly."""
    ac = sampler.alphas_cumprod.double().cpu().numpy()
    log_sigmas = np.log(np.sqrt((1 - ac) / ac))
    return np.interp(np.log(np.asarray(sigmas, dtype=np.float64)), log_sigmas, np.arange(len(ac))).round()


def set_diffusion_timesteps(sampler, num_inference_steps: int, device: str | torch.device | None = None) -> None:
    """``sampler.set_timesteps`` for a diffusion (non-flow) model: ``set_timesteps(N)``, or, when the sampler
    carries an AYS list (``_ays_sigmas``, set by :func:`build_scheduler` for ``sampler.sigmas=ays``), its σ's at N
    steps (:func:`ays_sigmas`) given as ``sigmas=`` (EulerDiscrete) or ``timesteps=`` t(σ) (Heun, DPM-Solver,
    DDPM; :func:`sigma_to_timestep`). The one place every non-flow solver's timesteps are set."""
    listed = sampler.config.get("_ays_sigmas")
    if not listed:
        sampler.set_timesteps(num_inference_steps, device=device)
        return
    sigmas = ays_sigmas(listed, num_inference_steps)
    route = _ays_route(type(sampler))
    if route == "sigmas":
        sampler.set_timesteps(sigmas=sigmas.tolist(), device=device)
        return
    if route is None:  # a copy's class changed under it: build_scheduler refuses these
        raise UserError(
            f"sampler.sigmas=ays: {type(sampler).__name__}.set_timesteps takes neither sigmas nor timesteps"
        )
    ts = sigma_to_timestep(sampler, sigmas[:-1])
    if np.any(np.diff(ts) >= 0):
        raise UserError(
            f"sampler.sigmas=ays at sampler.num_inference_steps={num_inference_steps}: the AYS σ's round to repeated "
            f"integer timesteps for {type(sampler).__name__} (it takes integer timesteps); use fewer steps, or "
            "scheduler=euler, which takes the σ's themselves"
        )
    sampler.set_timesteps(timesteps=[int(t) for t in ts], device=device)


def zero_snr_warning(base_config: dict[str, Any], sampler_cfg: Any) -> str | None:
    """Lin et al.'s warning for ``sampler.zero_terminal_snr=true`` on a model whose own scheduler config does not
    have ``rescale_betas_zero_snr: true``: it was not trained for it (None when it was, or the key is off)."""
    if not zoo_options(sampler_cfg)["zero_terminal_snr"] or base_config.get("rescale_betas_zero_snr"):
        return None
    return (
        "sampler.zero_terminal_snr=true on a model not trained with zero terminal SNR (its scheduler config has no "
        "rescale_betas_zero_snr: true): the rescaled schedule asks it for predictions at SNR values it never saw, so "
        "results are off-distribution; Lin et al. (WACV 2024) fine-tune the model on the rescaled schedule first"
    )


def _check_zoo(
    zoo: dict[str, Any], name: str, family: str, cls: type, base_config: dict, model_index: dict | None, source: str
) -> None:
    """Refuse a schedule-zoo option the solver / model cannot take, naming the key, the value, why, what fits."""
    flow = is_flow_model(base_config, model_index)
    params = _init_params(cls)
    sig, spacing, shift = zoo["sigmas"], zoo["timestep_spacing"], zoo["flow_shift"]
    what = f"scheduler={name} ({cls.__name__}; {_model_desc(base_config, model_index)}; {source})"
    if flow:
        kind = f"the model is a rectified-flow model ({what})"
        if spacing is not None:
            raise UserError(
                f"sampler.timestep_spacing={spacing}: {kind}; flow solvers have no timestep spacing (their σ's are "
                "the shifted σ(u) of the FlowMatchEuler schedule); leave it null (sampler.flow_shift / sampler.sigmas "
                "change a flow model's σ's)"
            )
        if zoo["zero_terminal_snr"]:
            raise UserError(
                f"sampler.zero_terminal_snr=true: {kind}; its σ already ends at 1 (x = noise: zero terminal SNR by "
                "construction); leave it false"
            )
        if sig == "ays":
            raise UserError(
                f"sampler.sigmas=ays: {kind}; the AYS lists (diffusers' AysSchedules) are σ's of the diffusion "
                f"families {', '.join(AYS_LISTS)}; sampler.sigmas=default, karras, exponential or beta fit a flow model"
            )
        if sig in SIGMA_KEYS and native_flow_sigmas(base_config):
            raise UserError(
                f"sampler.sigmas={sig}: {kind} samples with {cls.__name__} on flow σ's (use_flow_sigmas, Sana); "
                f"diffusers' {SIGMA_KEYS[sig]} there builds the σ's from the β schedule's alphas_cumprod "
                "(DPM-Solver ignores use_flow_sigmas and flow_shift, UniPC maps them to σ/(1+σ)), not from this "
                "model's shifted flow σ's; sampler.sigmas=default fits (sampler.flow_shift=S changes its σ's)"
            )
        if sig in SIGMA_KEYS and family == "native" and SIGMA_KEYS[sig] not in params:
            raise UserError(
                f"sampler.sigmas={sig}: {what} has no {SIGMA_KEYS[sig]}; the flow options take it through their "
                f"FlowMatchEuler schedule: {_options_where(lambda c: True, 'flow')}"
            )
        if shift is not None and uses_dynamic_shift(base_config):
            raise UserError(
                f"sampler.flow_shift={shift:g}: {kind} with a resolution-dependent shift (use_dynamic_shifting: "
                "true; μ from the image size, as Flux), not a static one; leave it null (the size sets the shift)"
            )
        if shift is not None and family == "native" and not native_flow_sigmas(base_config) and "shift" not in params:
            raise UserError(f"sampler.flow_shift={shift:g}: {what} has no shift key; scheduler=flow_euler takes it")
        return
    kind = f"the model is a diffusion model ({what})"
    if shift is not None:
        raise UserError(
            f"sampler.flow_shift={shift:g}: {kind}; the shift is a static-shift rectified-flow model's key (SD3, "
            "Sana); leave it null (sampler.sigmas / timestep_spacing / zero_terminal_snr change a diffusion schedule)"
        )
    if spacing is not None and "timestep_spacing" not in params:
        raise UserError(
            f"sampler.timestep_spacing={spacing}: {cls.__name__} has no timestep_spacing; "
            f"{_options_where(lambda c: 'timestep_spacing' in _init_params(c))} take it"
        )
    if sig in SIGMA_KEYS and SIGMA_KEYS[sig] not in params:
        key = SIGMA_KEYS[sig]
        raise UserError(
            f"sampler.sigmas={sig}: {what} has no {key} (diffusers' flag for it); "
            f"{_options_where(lambda c: key in _init_params(c))} take it"
        )
    if zoo["zero_terminal_snr"]:
        if "rescale_betas_zero_snr" not in params:
            raise UserError(
                f"sampler.zero_terminal_snr=true: {what} has no rescale_betas_zero_snr; "
                f"{_options_where(lambda c: 'rescale_betas_zero_snr' in _init_params(c))} take it"
            )
        if spacing not in (None, "trailing"):
            raise UserError(
                f"sampler.zero_terminal_snr=true with sampler.timestep_spacing={spacing}: zero terminal SNR needs "
                "trailing spacing, so sampling starts at the last (pure-noise) step (Lin et al., WACV 2024, §3.3); "
                "set sampler.timestep_spacing=trailing or leave it null"
            )
        if sig == "ays":
            raise UserError(
                "sampler.sigmas=ays with sampler.zero_terminal_snr=true: the AYS σ's were optimised for the model's "
                "own (non-zero terminal SNR) schedule; use one of them"
            )
    if sig != "ays":
        return
    if spacing is not None:
        raise UserError(
            f"sampler.timestep_spacing={spacing} with sampler.sigmas=ays: the AYS list sets every step, so a spacing "
            "would have no effect; leave sampler.timestep_spacing null"
        )
    fam = family_in_index(model_index)
    lists = ", ".join(f"{f} ({lst})" for f, lst in AYS_LISTS.items())
    if fam is None:
        where = (
            f"{source} has no model_index.json naming the family (a scheduler-only directory or a bare scheduler "
            "config), so there is no AYS list to choose"
            if not model_index
            else f"{model_index.get('_class_name')!r} is no family this project drives"
        )
        raise UserError(
            f"sampler.sigmas=ays: {where}; AYS lists: {lists}; point model.path at the pipeline directory, or use "
            "sampler.sigmas=default, karras, exponential or beta"
        )
    if fam.name not in AYS_LISTS:
        raise UserError(
            f"sampler.sigmas=ays: the model's family {fam.name!r} ({model_index.get('_class_name')}) has no AYS list "
            f"in diffusers' AysSchedules; families with one: {lists}; sampler.sigmas=default, karras, exponential or "
            "beta where the solver takes it"
        )
    if _ays_route(cls) is None:
        why = (
            "its step assumes evenly spaced timesteps (previous t = t − T/N), so it takes neither σ's nor timesteps"
            if cls.__name__ == "DDIMScheduler"
            else "its set_timesteps takes neither sigmas nor timesteps"
            + (" (sigmas only with use_flow_sigmas, on flow models)" if "use_flow_sigmas" in params else "")
        )
        raise UserError(
            f"sampler.sigmas=ays: {what}: {why}; {_options_where(lambda c: _ays_route(c) is not None)} take an AYS "
            "schedule"
        )


def _zoo_overrides(
    zoo: dict[str, Any], cls: type, base_config: dict, flow: bool, reference: dict | None
) -> dict[str, Any]:
    """The config keys the schedule-zoo options set on ``cls`` (after the option's own: they win); on a flow option
    (``reference``: its FlowMatchEuler schedule's keys) the shift and σ flag go into the reference as well, where
    every flow solver's σ's come from (:func:`set_flow_timesteps`)."""
    params = _init_params(cls)
    out: dict[str, Any] = {}
    flags = {}
    if zoo["sigmas"] in SIGMA_KEYS:
        flags = {k: k == SIGMA_KEYS[zoo["sigmas"]] for k in SIGMA_KEYS.values()}
    if not flow:
        if zoo["timestep_spacing"] is not None:
            out["timestep_spacing"] = zoo["timestep_spacing"]
        if zoo["zero_terminal_snr"]:
            out.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        out.update({k: v for k, v in flags.items() if k in params})
        return out
    from diffusers import FlowMatchEulerDiscreteScheduler

    shift = zoo["flow_shift"]
    if reference is not None:  # a flow_* option: its σ's are the reference's
        reference.update(flags)
        if shift is not None:
            reference["shift"] = shift
            out.update({k: v for k, v in _flow_overrides(reference, cls).items() if k in ("shift", "flow_shift")})
        if issubclass(cls, FlowMatchEulerDiscreteScheduler):  # set_flow_timesteps calls it directly
            out.update(flags)
    elif native_flow_sigmas(base_config):  # DPM-Solver / UniPC on flow σ's (Sana): its shift is flow_shift
        if shift is not None:
            out["flow_shift"] = shift
    else:  # the model's own FlowMatch* solver
        if shift is not None:
            out["shift"] = shift
        out.update({k: v for k, v in flags.items() if k in params})
    return out


def zoo_sigmas_for(
    scheduler_config: dict[str, Any], model_index: dict | None = None, cls: str | None = None, family: str = "native"
) -> tuple[str, ...]:
    """The ``sampler.sigmas`` values the solver (``cls``; None: the model's own) takes on this model, in
    :class:`pipeline.config.SigmaSchedule` order (the sweep list of ``${schedule_zoo:...}``)."""
    solver = scheduler_class(cls or scheduler_config.get("_class_name") or "DDIMScheduler")
    out = []
    for option in SIGMA_OPTIONS:
        try:
            _check_zoo({**_NO_ZOO, "sigmas": option}, "?", family, solver, scheduler_config, model_index, "")
        except UserError:
            continue
        out.append(option)
    return tuple(out)


def build_scheduler(
    base_config: dict[str, Any],
    sched_cfg: Any,
    source: str = "scheduler config",
    model_index: dict | None = None,
    sampler_cfg: Any = None,
):
    """The ``scheduler=`` option built from the model's scheduler config (``model_index``: the model's
    ``model_index.json`` when there is one), with the schedule-zoo keys of the ``sampler`` block ``sampler_cfg``
    (None: none). Refusals and build failures are UserErrors naming the option / key / source."""
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
    zoo = zoo_options(sampler_cfg)
    _check_zoo(zoo, name, family, cls, base_config, model_index, source)
    overrides = scheduler_overrides(sched_cfg)
    reference = None
    model_config = base_config
    if family == "flow":
        # the model's FlowMatch keys travel in the sampler's own config (it *is* its config, copies keep them) under
        # one private key; keys the class does not take are not passed (from_config would keep them and every copy
        # would warn about them)
        reference = {k: base_config[k] for k in (*_FLOW_KEYS, *SIGMA_KEYS.values()) if k in base_config}
        params = _init_params(cls)
        base_config = {k: v for k, v in base_config.items() if k in params or k.startswith("_")}
        overrides = {**_flow_overrides(reference, cls), **overrides}
    overrides.update(_zoo_overrides(zoo, cls, model_config, is_flow_model(model_config, model_index), reference))
    try:
        sampler = cls.from_config(base_config, **overrides)
    except Exception as e:  # bad beta_schedule, trained_betas of the wrong length, ...
        raise UserError(f"{source}: {cls_name} could not be built from it: {type(e).__name__}: {e}") from e
    if reference is not None:
        sampler.register_to_config(_flow_reference=reference)
    if zoo["zero_terminal_snr"] and _divides_by_zero_terminal_alpha(sampler):
        raise UserError(
            f"sampler.zero_terminal_snr=true: scheduler={name} ({cls.__name__}) with prediction_type epsilon "
            "divides by √ᾱ_T = 0 at the first step (x₀ = (x − √(1 − ᾱ) ε)/√ᾱ: inf/NaN); an ε-prediction model "
            "cannot give x₀ at zero SNR, which is why Lin et al. (WACV 2024, §3.2) switch to v-prediction; use a "
            "v-prediction model, or a solver that clamps ᾱ_T (scheduler=euler, dpmpp_2m, unipc; still "
            "off-distribution)"
        )
    if zoo["sigmas"] == "ays":
        listed = _ays_list(model_index)
        sampler.register_to_config(_ays_sigmas=listed)
        sigma_max = float(np.sqrt((1 - sampler.alphas_cumprod[-1]) / sampler.alphas_cumprod[-1]))
        if abs(sigma_max / listed[0] - 1) > 0.01:
            log.warning(
                "sampler.sigmas=ays: the AYS list starts at σ = %.4g, the model's schedule at σ_max = %.4g (%s): "
                "the list was optimised for another β schedule",
                listed[0],
                sigma_max,
                source,
            )
    return sampler


def _divides_by_zero_terminal_alpha(sampler) -> bool:
    """ε-prediction on a schedule whose last ᾱ is exactly 0 (DDIM, DDPM, LCM, TCD keep it; Euler, DPM-Solver and
    UniPC clamp it to 2⁻²⁴ when rescaling, and run)."""
    ac = getattr(sampler, "alphas_cumprod", None)
    pred = sampler.config.get("prediction_type", "epsilon")
    return ac is not None and pred == "epsilon" and float(ac[-1]) == 0.0


def _ays_list(model_index: dict | None) -> list[float]:
    """The non-zero σ's of the model family's AYS list (σ_max first); the family was checked by :func:`_check_zoo`."""
    from diffusers.schedulers import AysSchedules

    listed = [float(x) for x in AysSchedules[AYS_LISTS[family_in_index(model_index).name]]]
    return [x for x in listed if x > 0]


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


# ---------------------------------------------------------------------------------------------- uneven steps
# solvers whose step() goes from t to t − ⌊T/N⌋ whatever the next visited timestep is (diffusers 0.42)
FIXED_STRIDE = ("DDIMScheduler", "PNDMScheduler")


def stride_mismatch(sampler, steps: int) -> str | None:
    """Why ``sampler`` at ``steps`` steps is inconsistent, or None: DDIM and PNDM step from t to t − ⌊T/N⌋
    (diffusers' ``prev_timestep``), which is the next visited timestep only with ``leading`` spacing or with
    ``trailing`` when N divides T. Otherwise (``linspace``: stride (T − 1)/(N − 1)) each step lands at a noise level the
    next model call is not told (images still equal diffusers' own pipeline's: a warning, not a refusal)."""
    if type(sampler).__name__ not in FIXED_STRIDE:
        return None
    sched = type(sampler).from_config(sampler.config)
    sched.set_timesteps(steps)
    T = int(sched.config.num_train_timesteps)
    base = getattr(sched, "_timesteps", None)  # PNDM: its grid before the PLMS warm-up rearranges it
    ts = sorted({int(t) for t in (base if base is not None else sched.timesteps.tolist())}, reverse=True)
    stride = T // steps
    gaps = sorted({a - b for a, b in zip(ts, ts[1:])})
    if not gaps or gaps == [stride]:
        return None
    return (
        f"{type(sampler).__name__} steps from t to t − ⌊T/N⌋ = t − {stride}, but its "
        f"{sched.config.timestep_spacing} timesteps at N = {steps} are {', '.join(map(str, ts[:3]))}, … (gaps "
        f"{', '.join(map(str, gaps[:4]))}): every step lands {min(abs(g - stride) for g in gaps if g != stride)}"
        "+ training steps away from the timestep the next model call is given (diffusers' own behaviour: the images "
        "equal its pipeline's). `leading` spacing, or `trailing` with N dividing T, is consistent"
    )
