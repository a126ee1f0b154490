"""Solver error against a reference solution: the trajectory part of the schedule mode (``mode.schedule.trajectory``).

For K conditions (the run's first K prompts / classes; unconditional models: K seeds), one initial noise each
(sample i: CPU generator ``seed + i``, as every generation of the project), every deterministic (solver, steps,
schedule option) of the study is integrated with the project's own solver loop (the same calls as
:func:`pipeline.models.generation.sample`, tested equal) and compared with a *reference solution*: the family's
second-order deterministic solver (``heun`` on β schedules — ``dpmpp_2m`` with ``sampler.zero_terminal_snr``, which
Heun's class cannot rescale —, ``flow_heun`` on static-shift flow models, ``flow_dpmpp_2m`` where the shift depends on
the resolution) at ``reference_steps`` (default 500) steps. On β schedules its steps are Karras et al.'s ρ = 7 σ's
between the model's σ at t = T − 1 and at t = 0 (EDM's grid, dense where the solution bends: measured to converge far
faster than a grid uniform in t — docs/modes/schedule.md); flow models keep their own σ's. Its convergence is checked by
halving its step: the reference at R/2 steps is integrated too and the RMSE between the two is
``schedule/reference_change``; the reference counts as converged when that change is below 1 % of the smallest error
the study reports (tag ``schedule/reference_converged``).

Reported per (solver, steps, option), against the reference, mean over the K samples with a 95 % percentile
bootstrap interval over samples (:func:`pipeline.metrics.intervals.bootstrap_interval`):

- ``rmse``: RMSE of the final latents (the denoiser's space, before decoding);
- ``psnr``: PSNR (dB) of the decoded images clamped to [0, 1] (:func:`pipeline.metrics.image.psnr`);
- ``feature_distance``: Euclidean distance between the primary extractor's ``pool`` features of the two images;
- ``nfe``: denoiser calls per image, counted as they are made (Heun: 2 per step except the last; PNDM: its warm-up
  entries). Classifier-free guidance does not double it: it doubles the batch of each call. Seconds per image are
  the wall time of that integration / K (guidance batch included).

The reference solves the probability-flow ODE itself: where the model's scheduler config asks for x₀ clipping
(``clip_sample``) or dynamic thresholding, the reference is built without it, and the studied solvers whose class
applies it are flagged (column ``x0_correction``; they converge to a different solution, their errors do not vanish).

Stochastic solvers (ancestral, SDE, DDPM, DDIM with η > 0) have no pathwise reference: a ``skipped.trajectory.<name>``
tag says so and they are left out.

Convergence order (per solver, over the study's step counts): the slope p of log(error) = c − p·log(NFE) fitted by
least squares **per sample** over the *asymptotic range*, and reported as the mean over samples with a bootstrap
interval. The rule, fixed before any measurement: the range is the larger half of the step counts (the ⌈n/2⌉
largest NFE, at least 3 points, so 3 of 5), and a point whose error is below 100× the reference's own change is not
resolved by the reference and left out (a fit with fewer than 2 points is not made). Local orders between neighbouring
step counts are in the table as well. Textbook orders: Euler / DDIM / flow_euler 1, Heun / DPM-Solver++(2M) / flow_heun
2, UniPC (bh2) 3 with its corrector, PNDM 4 (pseudo linear multistep).

Geometry (the run's own solver and step count): per step the angle between successive ODE directions — dx/dσ in the
solver's σ-parametrisation, i.e. the guided ε prediction for β-schedule models (EDM's x = x₀ + σε form: dx/dσ = ε̂) and
the velocity for flow models — ``schedule/curvature_max`` (degrees, mean over samples) and the step where it occurs;
and each step's share of the final error: the final RMSE when that one step's displacement is replaced by the
reference's displacement over the same σ interval (the reference's states interpolated linearly in σ between its own
steps), as ``1 − E_i / E`` (negative when the step's own error was cancelling another's).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict
from tqdm.auto import tqdm

from pipeline.config import CONF_DIR, SchedulerConfig, group_options
from pipeline.errors import UserError
from pipeline.metrics.image import psnr
from pipeline.metrics.intervals import bootstrap_interval
from pipeline.models.generation import generators, step_kwargs, to_uint8
from pipeline.models.schedulers import is_flow_model, stride_mismatch, uses_dynamic_shift
from pipeline.models.stages import make_sampler, read_scheduler_setup

log = logging.getLogger(__name__)

TEXTBOOK_ORDER = {
    "EulerDiscreteScheduler": 1,
    "DDIMScheduler": 1,
    "FlowMatchEulerDiscreteScheduler": 1,
    "HeunDiscreteScheduler": 2,
    "FlowMatchHeunDiscreteScheduler": 2,
    "DPMSolverMultistepScheduler": 2,
    "UniPCMultistepScheduler": 3,
    "PNDMScheduler": 4,
    "LMSDiscreteScheduler": 4,
}
STOCHASTIC = (
    "EulerAncestralDiscreteScheduler",
    "DDPMScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler",
)
UNRESOLVED_FACTOR = 100.0  # errors below this many times the reference's own change are not resolved by it


def stochastic_reason(sched, eta: float) -> str | None:
    """Why ``sched`` has no pathwise reference (None: it is deterministic)."""
    name = type(sched).__name__
    if name in STOCHASTIC:
        return f"{name} draws fresh noise at every step: no pathwise reference"
    if "sde" in str(sched.config.get("algorithm_type") or ""):
        return (
            f"{name} with algorithm_type {sched.config.get('algorithm_type')} is an SDE solver: no pathwise reference"
        )
    if eta and "eta" in inspect.signature(sched.step).parameters:
        return f"{name} with sampler.eta={eta} adds noise at every step: no pathwise reference"
    return None


def x0_correction(sched) -> str | None:
    """What ``sched`` does to its x₀ prediction at every step beyond the ODE (diffusers' ``clip_sample`` to
    ±``clip_sample_range``, dynamic ``thresholding``), from the model's scheduler config, where its class takes the
    key (DDIM, DDPM, Heun; DPM-Solver++ and UniPC: thresholding); None when it solves the ODE unmodified."""
    params = inspect.signature(type(sched).__init__).parameters
    if "clip_sample" in params and sched.config.get("clip_sample"):
        return f"clip_sample (x₀ clipped to ±{sched.config.get('clip_sample_range', 1.0)})"
    if "thresholding" in params and sched.config.get("thresholding"):
        return "thresholding (dynamic x₀ thresholding)"
    return None


# ---------------------------------------------------------------------------------------------- the solver loop
@dataclass
class Path_:
    """One integration: the final latents (packed as the denoiser takes them), the per-step records, the cost."""

    final: torch.Tensor
    nfe: int
    seconds: float
    timesteps: list[float] = field(default_factory=list)  # every call's timestep (the visited steps)
    sigmas: list[float] = field(default_factory=list)  # σ at each solver step's first call, then the final 0
    states: list[torch.Tensor] = field(default_factory=list)  # canonical state at each step boundary (keep_states)
    directions: list[torch.Tensor] = field(default_factory=list)  # ODE direction at each step's first call


def _sigma_and_scale(sched, x: torch.Tensor, t, flow: bool) -> tuple[float, float]:
    """(σ, c) at the solver's current call: σ the noise level of the solver's parametrisation (flow: σ of
    x = (1 − σ)x₀ + σε; else the VP ratio √((1 − ᾱ)/ᾱ)), and c with canonical state = c · sample (flow: the sample;
    else EDM's x₀ + σε = x_t·√(1 + σ²), x_t the model input ``scale_model_input`` gives)."""
    if getattr(sched, "step_index", 0) is None and hasattr(sched, "_init_step_index"):
        sched._init_step_index(t)  # what its step() does first: the index of t in its timesteps
    sigmas, idx = getattr(sched, "sigmas", None), getattr(sched, "step_index", None)
    if sigmas is not None and idx is not None and idx < len(sigmas):
        sigma = float(sigmas[idx])
    else:
        a = float(sched.alphas_cumprod[int(round(float(t)))])
        sigma = math.sqrt(max(1.0 - a, 0.0) / a) if a > 0 else math.inf
    if flow:
        return sigma, 1.0
    x_t = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
    ratio = float((x_t.double().norm() / x.double().norm()).item()) if float(x.double().norm()) > 0 else 1.0
    return sigma, ratio * math.sqrt(1.0 + sigma * sigma)


def _direction(pred: torch.Tensor, x: torch.Tensor, sched, sigma: float, c: float, flow: bool) -> torch.Tensor:
    """dx/dσ of the solver's ODE from its prediction: flow velocity as is; else ε̂ (ε: as is; v: √ᾱ v + √(1−ᾱ) x_t;
    x₀: (x_t − √ᾱ x₀)/√(1−ᾱ)), with ᾱ = 1/(1 + σ²) and x_t = canonical / √(1 + σ²)."""
    if flow:
        return pred.float()
    kind = str(sched.config.get("prediction_type") or "epsilon")
    a = 1.0 / (1.0 + sigma * sigma)
    x_t = (x.float() * c) / math.sqrt(1.0 + sigma * sigma)
    if kind == "v_prediction":
        return math.sqrt(a) * pred.float() + math.sqrt(1 - a) * x_t
    if kind == "sample":
        return (x_t - math.sqrt(a) * pred.float()) / math.sqrt(max(1 - a, 1e-12))
    return pred.float()


def step_of_call(sched, steps: int) -> list[int]:
    """The solver step (0 .. steps − 1) of each call, as :func:`pipeline.models.generation.denoiser_call_steps`."""
    calls, order = len(sched.timesteps), int(getattr(sched, "order", 1))
    warmup = max(calls - steps * order, 0)
    return [0 if i < warmup else min((i - warmup) // order, steps - 1) for i in range(calls)]


@torch.no_grad()
def integrate(
    adapter,
    sampler,
    cond,
    noise: torch.Tensor,
    steps: int,
    height: int,
    width: int,
    flow: bool,
    keep_states: bool = False,
    replace: tuple[int, Callable[[float, float, torch.Tensor], torch.Tensor]] | None = None,
    prefix: dict | None = None,
) -> Path_:
    """:func:`pipeline.models.generation.sample` without the decode (same calls, same order: tested equal), with
    records. ``noise``: unit-variance packed initial noise. ``replace=(i, fn)``: at the end of solver step i the
    canonical state becomes ``fn(σ_i, σ_{i+1}, canonical state at σ_i)`` (the step-share experiment). ``prefix``:
    a dict filled with deep copies of (scheduler, sample) at each step boundary (``prefix[i]``) so a replayed run can
    start there."""
    sched = type(sampler).from_config(sampler.config)
    adapter.set_timesteps(sched, steps, height, width)
    x = noise.to(adapter.device, adapter.dtype) * float(getattr(sched, "init_noise_sigma", 1.0))
    extra = step_kwargs(sched, 0.0, [])
    of_call = step_of_call(sched, steps)
    start = 0
    if replace is not None and prefix is not None and replace[0] in prefix:
        sched, x = copy.deepcopy(prefix[replace[0]][0]), prefix[replace[0]][1].clone()
        start = prefix[replace[0]][2]
    out = Path_(final=x, nfe=0, seconds=0.0)
    tic = time.perf_counter()
    pending = None  # (step index, σ_i, canonical state at σ_i) of a step to replace at its end
    timesteps = list(sched.timesteps)
    for k in range(start, len(timesteps)):
        t = timesteps[k]
        first = k == 0 or of_call[k] != of_call[k - 1]
        if first:
            i = of_call[k]
            if pending is not None:  # the replaced step ended here: swap in the reference's displacement
                j, s0, c0 = pending
                s1, c1 = _sigma_and_scale(sched, x, t, flow)
                x = (replace[1](s0, s1, c0) / c1).to(x.dtype)
                pending = None
            sigma, c = _sigma_and_scale(sched, x, t, flow)
            if prefix is not None and replace is None:
                prefix[i] = (copy.deepcopy(sched), x.clone(), k)
            if keep_states:
                out.states.append((x.float() * c).cpu())
            out.sigmas.append(sigma)
            if replace is not None and replace[0] == i:
                pending = (i, sigma, x.float() * c)
        pred = adapter.denoise(x, t, cond, sched)
        out.nfe += 1
        out.timesteps.append(float(t))
        if first and keep_states:
            out.directions.append(_direction(pred, x, sched, sigma, c, flow).cpu())
        x = sched.step(pred, t, x, return_dict=False, **extra)[0]
    if pending is not None:  # the last step replaced: its end is σ = 0
        x = replace[1](pending[1], 0.0, pending[2]).to(x.dtype)
    out.seconds = time.perf_counter() - tic
    out.sigmas.append(0.0)
    if keep_states:
        out.states.append(x.float().cpu())
    out.final = x
    return out


def reference_at(ref_sigmas: np.ndarray, ref_states: torch.Tensor) -> Callable[[float], torch.Tensor]:
    """x_ref(σ): the reference's canonical states (ordered by decreasing σ), linear in σ between its own steps."""
    s = np.asarray(ref_sigmas, dtype=np.float64)

    def at(sigma: float) -> torch.Tensor:
        if sigma >= s[0]:
            return ref_states[0]
        if sigma <= s[-1]:
            return ref_states[-1]
        j = int(np.searchsorted(-s, -sigma, side="right"))  # s[j-1] >= sigma > s[j]
        w = (s[j - 1] - sigma) / (s[j - 1] - s[j])
        return ref_states[j - 1] * (1 - w) + ref_states[j] * w

    return at


# ---------------------------------------------------------------------------------------------- errors, order
def per_sample_rmse(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    d = (a.double() - b.double()).reshape(a.shape[0], -1)
    return d.pow(2).mean(dim=1).sqrt().cpu().numpy()


def per_sample_psnr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """PSNR (dB) of float images clamped to [0, 1], per sample."""
    return psnr(a.clamp(0, 1), b.clamp(0, 1)).cpu().numpy()


def mean_ci(values: np.ndarray) -> tuple[float, float, float]:
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), float("nan"), float("nan")
    lo, hi = bootstrap_interval(v)
    return float(v.mean()), lo, hi


def fit_order(nfe: Sequence[int], errors: np.ndarray, floor: float) -> dict[str, Any]:
    """The convergence order over the asymptotic range (module docstring's rule). ``errors``: (points, samples).
    Returns order, interval, the NFE range used and the local orders between neighbouring points."""
    nfe = np.asarray(nfe, dtype=np.float64)
    errors = np.asarray(errors, dtype=np.float64)
    order = np.argsort(nfe)
    nfe, errors = nfe[order], errors[order]
    mean = errors.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        local = -np.diff(np.log(mean)) / np.diff(np.log(nfe))
    n = len(nfe)
    take = list(range(n - max(3, math.ceil(n / 2)), n)) if n >= 3 else list(range(n))
    take = [i for i in take if i >= 0 and mean[i] >= UNRESOLVED_FACTOR * floor]
    out: dict[str, Any] = {"local": local.tolist(), "points": len(take)}
    if len(take) < 2:
        out.update(order=float("nan"), ci_low=float("nan"), ci_high=float("nan"), nfe_min=None, nfe_max=None)
        return out
    x = np.log(nfe[take])
    slopes = []
    for s in range(errors.shape[1]):
        y = np.log(np.maximum(errors[take, s], 1e-300))
        slopes.append(-np.polyfit(x, y, 1)[0])
    value, lo, hi = mean_ci(np.asarray(slopes))
    out.update(order=value, ci_low=lo, ci_high=hi, nfe_min=int(nfe[take[0]]), nfe_max=int(nfe[take[-1]]))
    return out


def curvature(directions: list[torch.Tensor]) -> np.ndarray:
    """Per step i ≥ 1: the angle (degrees, mean over samples) between the ODE directions at steps i − 1 and i."""
    out = []
    for a, b in zip(directions[:-1], directions[1:]):
        a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
        out.append(float(torch.rad2deg(torch.arccos(cos.clamp(-1, 1))).mean()))
    return np.asarray(out)


# ---------------------------------------------------------------------------------------------- reference cache
def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def load_cached(path: Path, expect: dict[str, tuple]) -> dict[str, np.ndarray] | None:
    """The cached reference arrays, or None when missing, unreadable or not of the expected shapes (untrusted file:
    numpy's loader without pickle, every array checked)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: np.array(z[k]) for k in expect}
    except Exception as e:  # noqa: BLE001 - a bad cache file is recomputed, never trusted
        log.warning("trajectory: reference cache %s unreadable (%s): recomputing", path, type(e).__name__)
        return None
    for k, shape in expect.items():
        if shape is not None and tuple(out[k].shape) != tuple(shape) or not np.isfinite(out[k]).all():
            log.warning("trajectory: reference cache %s has a bad %r: recomputing", path, k)
            return None
    return out


def save_cached(path: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    except OSError as e:
        log.warning("trajectory: could not cache the reference at %s: %s", path, e)


def check_study(solvers: Sequence[str], step_counts: Sequence[int]) -> None:
    if len(set(step_counts)) != len(list(step_counts)):
        raise UserError(f"mode.schedule.step_counts: {list(step_counts)} repeats a value; expected distinct counts")
    if len(set(solvers)) != len(list(solvers)):
        raise UserError(f"mode.schedule.solvers: {list(solvers)} repeats an option")


# ---------------------------------------------------------------------------------------------- the study
def scheduler_option(name: str):
    """The ``scheduler=<name>`` option (conf/scheduler/<name>.yaml) as a validated SchedulerConfig."""

    options = group_options("scheduler")
    if name not in options:
        raise UserError(f"mode.schedule.solvers: {name!r} is not a scheduler option; expected some of {options}")
    return OmegaConf.merge(
        OmegaConf.structured(SchedulerConfig), OmegaConf.load(CONF_DIR / "scheduler" / f"{name}.yaml")
    )


def reference_option(cfg, flow: bool, dynamic: bool) -> str:
    """``mode.schedule.reference_solver``, else the family's second-order deterministic solver."""
    chosen = cfg.mode.schedule.reference_solver
    if chosen:
        return str(chosen)
    if not flow:  # Heun's class takes no rescale_betas_zero_snr: DPM-Solver++(2M) on a zero-terminal-SNR schedule
        return "dpmpp_2m" if bool(cfg.sampler.get("zero_terminal_snr", False)) else "heun"
    return "flow_dpmpp_2m" if dynamic else "flow_heun"


def study_copy(cfg, scheduler=None, **sampler):
    """A copy of the run config with another scheduler option and/or sampler keys (keys the schema lacks ignored)."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        if scheduler is not None:
            out.scheduler = scheduler
        for k, v in sampler.items():
            if k in out.sampler:
                out.sampler[k] = v
    return out


def option_label(name: str, steps: int, cfg) -> str:
    sigmas = str(getattr(cfg.sampler.get("sigmas", None), "value", cfg.sampler.get("sigmas", None)) or "default")
    spacing = cfg.sampler.get("timestep_spacing", None)
    parts = [f"{name} × {steps}"] + ([sigmas] if sigmas != "default" else [])
    if spacing is not None:
        parts.append(str(getattr(spacing, "value", spacing)))
    return ", ".join(parts)


def _conditions(ctx, model, k: int) -> tuple[list[str] | None, list[int] | None]:
    if model.text:
        prompts = list(dict.fromkeys(ctx.get("prompts")))  # distinct, in order
        return [prompts[i % len(prompts)] for i in range(k)], None
    if model.class_conditional:
        return None, [i % model.num_classes for i in range(k)]
    return None, None


def _model_identity(path: str) -> list:
    """What makes a local model directory the same model (file names, sizes, mtimes); a hub id is its own name."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return [path]
    return sorted((str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in p.rglob("*") if f.is_file())


def _features(extractor, images: torch.Tensor) -> torch.Tensor:

    return extractor(to_uint8(images.clamp(0, 1)).cpu())["pool"].double()


def study_configs(cfg) -> list[tuple[str, int, Any]]:
    """(option name, steps, run config) of every configuration the run looks at: its own first, then (trajectory
    part on) ``mode.schedule.solvers`` × ``mode.schedule.step_counts``."""
    m, own = cfg.mode.schedule, (str(cfg.scheduler.name), int(cfg.sampler.num_inference_steps))
    out = [(own[0], own[1], cfg)]
    if not m.get("trajectory"):
        return out
    names = [own[0]] + [str(n) for n in (m.solvers or []) if str(n) != own[0]]
    steps = [int(s) for s in (m.step_counts or [own[1]])]
    check_study(names, steps)
    for name in names:
        option = cfg.scheduler if name == own[0] else scheduler_option(name)
        out += [(name, n, study_copy(cfg, scheduler=option)) for n in steps if (name, n) != own]
    return out


def check_study_solvers(cfg) -> None:
    """Every studied option and the reference built against the model's scheduler config (no weights): a solver that
    cannot drive the model is refused before any work, by :func:`pipeline.models.stages.make_sampler`'s message."""
    setup = read_scheduler_setup(cfg)
    for _, _, c in study_configs(cfg)[1:]:
        make_sampler(c, setup)
    flow = is_flow_model(setup["config"], setup.get("model_index"))
    make_sampler(
        study_copy(
            cfg, scheduler=scheduler_option(reference_option(cfg, flow, flow and uses_dynamic_shift(setup["config"])))
        ),
        setup,
    )


@dataclass
class _Setup:
    """What every integration of one study shares: the model, K conditions and their noise, size, extractor."""

    model: Any
    sc: dict
    flow: bool
    K: int
    h: int
    w: int
    cond: Any
    noise: torch.Tensor
    prompts: list[str] | None
    classes: list[int] | None
    extractor: Any
    cache_misses: int = 0

    def run(self, sampler, steps: int, **kw) -> Path_:
        return integrate(self.model, sampler, self.cond, self.noise, steps, self.h, self.w, self.flow, **kw)

    def decode(self, final: torch.Tensor) -> torch.Tensor:
        return self.model.decode(final.to(self.model.device, self.model.dtype), self.h, self.w).float().cpu()


@dataclass
class _Reference:
    name: str
    sampler: Any
    steps: int
    final: torch.Tensor
    change: float  # RMSE between the reference and the same solver at half its steps
    sigmas: np.ndarray
    states: torch.Tensor | None  # canonical states at its step boundaries (step shares), else None
    images: torch.Tensor = None
    features: torch.Tensor = None


def _setup(ctx, cfg) -> _Setup:
    model = ctx.get("model")
    if model.native:
        raise UserError(
            f"mode.schedule.trajectory: {model.name} runs on the native path (its pipeline's own __call__), which "
            "hides the solver loop the trajectory study integrates; it works on the families with a driver "
            "(python -m pipeline.models lists them)"
        )
    K = int(cfg.mode.schedule.trajectory_samples)
    h, w = model.resolve_size(cfg.sampler.height, cfg.sampler.width)
    prompts, classes = _conditions(ctx, model, K)
    return _Setup(
        model=model,
        sc=ctx.get("scheduler_config"),
        flow=bool(model.family.flow),
        K=K,
        h=h,
        w=w,
        cond=model.condition(K, float(cfg.sampler.guidance_scale), h, w, prompts=prompts, class_ids=classes),
        noise=model.initial_noise(generators(int(cfg.seed), range(K)), h, w, 1.0),
        prompts=prompts,
        classes=classes,
        extractor=next(iter(ctx.get("extractors").values())),
    )


def _reference_sampler(cfg, s: _Setup) -> tuple[str, Any]:
    """The reference solver (module docstring): its option name and sampler."""
    ref_name = reference_option(cfg, s.flow, s.flow and uses_dynamic_shift(s.sc["config"]))
    keys = {"sigmas": "default"}
    if not s.flow:  # Karras σ's between the model's σ(T − 1) and σ(0) (linspace spans them; trailing with zero SNR)
        keys["sigmas"] = "karras"
        if not bool(cfg.sampler.get("zero_terminal_snr", False)):
            keys["timestep_spacing"] = "linspace"
    sampler = make_sampler(study_copy(cfg, scheduler=scheduler_option(ref_name), **keys), s.sc)
    if x0_correction(sampler):  # the reference solves the probability-flow ODE itself, not a clipped one
        params = inspect.signature(type(sampler).__init__).parameters
        off = {k: False for k in ("clip_sample", "thresholding") if k in params}
        sampler = type(sampler).from_config(sampler.config, **off)
    reason = stochastic_reason(sampler, 0.0)
    if reason:
        raise UserError(f"mode.schedule.reference_solver={ref_name}: {reason}; choose a deterministic solver")
    return ref_name, sampler


def _reference_key(cfg, s: _Setup, sampler) -> str:
    """What makes two studies' references the same: model files, solver config, noise, conditions, size."""
    return cache_key(
        {
            "model": [str(cfg.model.path), _model_identity(str(cfg.model.path)), str(cfg.model.dtype)],
            "device": str(s.model.device),
            "scheduler": dict(sampler.config),
            "seed": int(cfg.seed),
            "guidance": float(cfg.sampler.guidance_scale),
            "size": [s.h, s.w],
            "prompts": s.prompts,
            "classes": s.classes,
            "noise": hashlib.sha256(s.noise.float().cpu().numpy().tobytes()).hexdigest(),
        }
    )


def _reference_run(cfg, s: _Setup, sampler, steps: int, states: bool, bar) -> dict[str, np.ndarray]:
    """The reference solver's final latents (and σ's / canonical states) at ``steps``, from
    ``<paths.cache>/trajectory/`` when this exact reference was integrated before (``s.cache_misses`` counts the
    ones integrated now)."""
    key = _reference_key(cfg, s, sampler)
    path = Path(str(cfg.paths.cache)) / "trajectory" / f"reference_{key}_{steps}{'_states' if states else ''}.npz"
    expect = {"final": tuple(s.noise.shape), "sigmas": None, **({"states": None} if states else {})}
    arrays = load_cached(path, expect)
    if arrays is None:
        bar.set_postfix_str(f"reference × {steps}")
        ref = s.run(sampler, steps, keep_states=states)
        arrays = {"final": ref.final.float().cpu().numpy(), "sigmas": np.asarray(ref.sigmas)}
        if states:
            arrays["states"] = torch.stack(ref.states).numpy()
        save_cached(path, arrays)
        s.cache_misses += 1
    return arrays


def _states_fit(s: _Setup, steps: int) -> bool:
    """Whether the reference's states for step shares fit in memory (≤ 1 GiB at float32)."""
    return s.noise.numel() * 4 * (steps + 1) <= 2**30


def _reference(cfg, s: _Setup, bar, steps: int, shares: bool, half: dict | None = None) -> tuple[_Reference, dict]:
    """The reference at ``steps``, with its change against ``steps // 2`` (``half``: that run's arrays, when the
    previous refinement computed it)."""
    name, sampler = _reference_sampler(cfg, s)
    states = shares and _states_fit(s, steps)
    full = _reference_run(cfg, s, sampler, steps, states, bar)
    half = half or _reference_run(cfg, s, sampler, max(steps // 2, 1), False, bar)
    final = torch.from_numpy(full["final"])
    images = s.decode(final)
    return _Reference(
        name=name,
        sampler=sampler,
        steps=steps,
        final=final,
        change=float(per_sample_rmse(final, torch.from_numpy(half["final"])).mean()),
        sigmas=np.asarray(full["sigmas"]),
        states=torch.from_numpy(full["states"]) if states else None,
        images=images,
        features=_features(s.extractor, images),
    ), full


def _integrate_all(ctx, cfg, s: _Setup, configs, bar) -> list[tuple]:
    """Every deterministic configuration integrated once (stochastic ones tagged and left out):
    ``(name, steps, label, sampler, run, images, features)``."""
    done = []
    for i, (name, n, c) in enumerate(configs):
        bar.set_postfix_str(f"{name} × {n}")
        sampler = make_sampler(c, s.sc)
        why = stochastic_reason(sampler, float(cfg.sampler.eta))
        if why:
            ctx.tag(f"skipped.trajectory.{name}", why)
            log.info("trajectory: %s skipped: %s", option_label(name, n, c), why)
        else:
            run = s.run(sampler, n, keep_states=i == 0)
            images = s.decode(run.final)
            done.append((name, n, option_label(name, n, c), sampler, run, images, _features(s.extractor, images)))
        bar.update(1)
    return done


def _score(done: list[tuple], ref: _Reference, K: int) -> tuple[list[dict], dict]:
    """One row per integrated configuration against ``ref``; ``{(name, steps): (run, per-sample rmse, sampler)}``."""
    rows, paths = [], {}
    for name, n, label, sampler, run, images, feats in done:
        rmse = per_sample_rmse(run.final.float().cpu(), ref.final)
        row = {"config": label, "solver": name, "class": type(sampler).__name__, "steps": n, "nfe": run.nfe}
        for metric, values in (
            ("rmse", rmse),
            ("psnr", per_sample_psnr(images, ref.images)),
            ("feature_distance", (feats - ref.features).norm(dim=1).numpy()),
        ):
            row[metric], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = mean_ci(values)
        row["sec_per_image"] = run.seconds / K
        row["textbook_order"] = TEXTBOOK_ORDER.get(type(sampler).__name__)
        row["stride_mismatch"] = stride_mismatch(sampler, n) is not None  # DDIM/PNDM off their own grid
        row["x0_correction"] = x0_correction(sampler) or ""  # a different ODE from the reference's
        rows.append(row)
        paths[(name, n)] = (run, rmse, sampler)
    return rows, paths


def _orders(names: list[str], paths: dict, change: float) -> list[dict]:
    out = []
    for name in names:
        mine = [paths[k] for k in sorted((k for k in paths if k[0] == name), key=lambda k: k[1])]
        if len(mine) < 2:
            continue
        fit = fit_order([run.nfe for run, _, _ in mine], np.stack([rmse for _, rmse, _ in mine]), change)
        cls = type(mine[0][2]).__name__
        out.append(
            {
                "solver": name,
                "class": cls,
                "order": fit["order"],
                "order_ci_low": fit["ci_low"],
                "order_ci_high": fit["ci_high"],
                "fit_nfe_min": fit["nfe_min"],
                "fit_nfe_max": fit["nfe_max"],
                "fit_points": fit["points"],
                "local_orders": " ".join(f"{v:.3f}" for v in fit["local"]),
                "textbook_order": TEXTBOOK_ORDER.get(cls),
            }
        )
    return out


def _geometry(s: _Setup, ref: _Reference, own: tuple, steps: int) -> list[dict]:
    """Per step of the run's own configuration: curvature and (with the reference's states) the error share."""
    run, rmse, sampler = own
    angles = curvature(run.directions)
    share = [float("nan")] * (len(run.sigmas) - 1)
    if ref.states is not None:
        at = reference_at(ref.sigmas, ref.states)
        base = float(rmse.mean())
        prefix: dict = {}
        s.run(sampler, steps, prefix=prefix)
        for i in range(len(share)):
            swap = (i, lambda s0, s1, c0: c0.float().cpu().add(at(s1) - at(s0)).to(s.model.device))
            rerun = s.run(sampler, steps, replace=swap, prefix=prefix)
            share[i] = 1.0 - float(per_sample_rmse(rerun.final.float().cpu(), ref.final).mean()) / base
    return [
        {
            "step": i,
            "sigma": run.sigmas[i],
            "sigma_next": run.sigmas[i + 1],
            "curvature_deg": float(angles[i - 1]) if 1 <= i <= len(angles) else float("nan"),
            "error_share": share[i],
        }
        for i in range(len(share))
    ]


def run_study(ctx, cfg) -> dict[str, Any]:
    """The trajectory part: reference, every deterministic configuration of the study, errors, orders, geometry.
    The reference starts at ``reference_steps`` and doubles (up to ``reference_max_steps``) until halving its step
    changes its result by less than 1 % of the smallest error the study reports; the errors are then scored against
    the finest one. Tag ``schedule/reference_cache``: ``hit`` when every reference run came from the cache. Returns the rows, order rows, geometry rows and the reference's description."""
    m = cfg.mode.schedule
    s = _setup(ctx, cfg)
    configs = study_configs(cfg)
    steps, cap, shares = (
        int(m.reference_steps),
        max(int(m.reference_max_steps), int(m.reference_steps)),
        bool(m.step_shares),
    )
    if steps < 500:
        log.warning("trajectory: mode.schedule.reference_steps=%d is below 500: check schedule/reference_change", steps)
    bar = tqdm(total=len(configs) + 1, desc="trajectory", unit="run", dynamic_ncols=True)
    try:
        ref, arrays = _reference(cfg, s, bar, steps, shares)
        bar.update(1)
        done = _integrate_all(ctx, cfg, s, configs, bar)
        rows, paths = _score(done, ref, s.K)
        while rows and ref.change >= 0.01 * min(r["rmse"] for r in rows) and ref.steps * 2 <= cap:
            bar.total += 1
            ref, arrays = _reference(cfg, s, bar, ref.steps * 2, shares, half=arrays)
            bar.update(1)
            rows, paths = _score(done, ref, s.K)
    finally:
        bar.close()
    ctx.tag("schedule/reference_cache", "miss" if s.cache_misses else "hit")
    own = paths.get(configs[0][:2])
    smallest = min((r["rmse"] for r in rows), default=float("nan"))
    return {
        "rows": rows,
        "orders": _orders(list(dict.fromkeys(c[0] for c in configs)), paths, ref.change),
        "geometry": _geometry(s, ref, own, configs[0][1]) if own is not None else [],
        "reference": {
            "solver": ref.name,
            "class": type(ref.sampler).__name__,
            "steps": ref.steps,
            "change": ref.change,
            "converged": bool(rows) and bool(ref.change < 0.01 * smallest),
        },
        "own": configs[0],
        "per_sample": {(name, run.nfe): rmse for (name, _), (run, rmse, _) in paths.items()},
    }
