"""Solver error against a reference solution: the trajectory part of the schedule mode (``mode.schedule.trajectory``).

For K conditions (the run's first K prompts / classes; unconditional models: K seeds), one initial noise each
(sample i: CPU generator ``seed + i``, as every generation of the project), every deterministic (solver, steps,
schedule option) of the study is integrated with the project's own solver loop (the same calls as
:func:`pipeline.models.generation.sample`, tested equal) and compared with a *reference solution*: the family's
second-order deterministic solver (``heun`` on β schedules, ``flow_heun`` on static-shift flow models,
``flow_dpmpp_2m`` where the shift depends on the resolution) at ``reference_steps`` (≥ 500) steps on the model's own
σ's (diffusion: ``linspace`` spacing, which starts at t = T − 1 and ends at t = 0). Its convergence is checked by
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
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.metrics.image import psnr
from pipeline.metrics.intervals import bootstrap_interval
from pipeline.models.generation import generators, step_kwargs

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
    if eta and "eta" in __import__("inspect").signature(sched.step).parameters:
        return f"{name} with sampler.eta={eta} adds noise at every step: no pathwise reference"
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
    from omegaconf import OmegaConf

    from pipeline.config import CONF_DIR, SchedulerConfig, group_options

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
    if not flow:
        return "heun"
    return "flow_dpmpp_2m" if dynamic else "flow_heun"


def _with(cfg, scheduler=None, **sampler):
    """A copy of the run config with another scheduler option and/or sampler keys (keys the schema lacks ignored)."""
    from omegaconf import open_dict

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
    from pipeline.models.generation import to_uint8

    return extractor(to_uint8(images.clamp(0, 1)).cpu())["pool"].double()


def run_study(ctx, cfg) -> dict[str, Any]:
    """The trajectory part: reference, every deterministic configuration of the study, errors, orders, geometry.
    Returns the per-configuration rows, the order rows and the geometry rows (the stage saves and plots them)."""
    from tqdm.auto import tqdm

    from pipeline.models.schedulers import uses_dynamic_shift
    from pipeline.models.stages import make_sampler

    mcfg = cfg.mode.schedule
    model = ctx.get("model")
    if model.native:
        raise UserError(
            f"mode.schedule.trajectory: {model.name} runs on the native path (its pipeline's own __call__), which "
            "hides the solver loop the trajectory study integrates; it works on the families with a driver "
            "(python -m pipeline.models lists them)"
        )
    sc = ctx.get("scheduler_config")
    flow = bool(model.family.flow)
    K = int(mcfg.trajectory_samples)
    guidance = float(cfg.sampler.guidance_scale)
    h, w = model.resolve_size(cfg.sampler.height, cfg.sampler.width)
    prompts, classes = _conditions(ctx, model, K)
    cond = model.condition(K, guidance, h, w, prompts=prompts, class_ids=classes)
    noise = model.initial_noise(generators(int(cfg.seed), range(K)), h, w, 1.0)
    extractor = next(iter(ctx.get("extractors").values()))

    # the study: the run's own option first, then mode.schedule.solvers × step counts
    own_steps = int(cfg.sampler.num_inference_steps)
    steps_list = [int(s) for s in (mcfg.step_counts or [own_steps])]
    names = [str(cfg.scheduler.name)] + [str(n) for n in (mcfg.solvers or []) if str(n) != str(cfg.scheduler.name)]
    check_study(names, steps_list)
    configs = [(cfg.scheduler.name, own_steps, cfg)]
    for name in names:
        option = cfg.scheduler if name == cfg.scheduler.name else scheduler_option(name)
        for n in steps_list:
            if (name, n) != (cfg.scheduler.name, own_steps):
                configs.append((name, n, _with(cfg, scheduler=option)))

    # the reference: R and R/2 steps of the family's second-order solver, on the model's own σ's
    dynamic = flow and uses_dynamic_shift(sc["config"])
    ref_name = reference_option(cfg, flow, dynamic)
    ref_keys = {"sigmas": "default"}
    if not flow and not bool(cfg.sampler.get("zero_terminal_snr", False)):
        ref_keys["timestep_spacing"] = "linspace"
    ref_cfg = _with(cfg, scheduler=scheduler_option(ref_name), **ref_keys)
    if not flow and "timestep_spacing" not in cfg.sampler:  # a schema without the sampler key: the option's own
        from omegaconf import open_dict

        with open_dict(ref_cfg):
            ref_cfg.scheduler.timestep_spacing = "linspace"
            ref_cfg.scheduler.steps_offset = 0
    ref_sampler = make_sampler(ref_cfg, sc)
    reason = stochastic_reason(ref_sampler, 0.0)
    if reason:
        raise UserError(f"mode.schedule.reference_solver={ref_name}: {reason}; choose a deterministic solver")
    R = int(mcfg.reference_steps)
    if R < 500:
        log.warning("trajectory: mode.schedule.reference_steps=%d is below 500: check schedule/reference_change", R)
    shares = bool(mcfg.step_shares)
    key = cache_key(
        {
            "model": [
                str(cfg.model.path),
                _model_identity(str(cfg.model.path)),
                str(cfg.model.dtype),
                str(model.device),
            ],
            "scheduler": dict(ref_sampler.config),
            "R": R,
            "K": K,
            "seed": int(cfg.seed),
            "guidance": guidance,
            "size": [h, w],
            "prompts": prompts,
            "classes": classes,
            "noise": hashlib.sha256(noise.float().cpu().numpy().tobytes()).hexdigest(),
            "states": shares,
        }
    )
    cache = Path(str(cfg.paths.cache)) / "trajectory" / f"reference_{key}.npz"
    shape = tuple(noise.shape)
    cached = load_cached(cache, {"final": shape, "half": shape, "sigmas": None, **({"states": None} if shares else {})})
    bar = tqdm(total=len(configs) + (0 if cached is not None else 2), desc="trajectory", unit="run", dynamic_ncols=True)
    if cached is not None:
        ctx.tag("schedule/reference_cache", "hit")
        ref_final = torch.from_numpy(cached["final"])
        ref_half = torch.from_numpy(cached["half"])
        ref_sigmas = cached["sigmas"]
        ref_states = torch.from_numpy(cached["states"]) if shares else None
        ref_seconds = float("nan")
    else:
        ctx.tag("schedule/reference_cache", "miss")
        bar.set_postfix_str(f"reference {ref_name} × {R}")
        ref = integrate(model, ref_sampler, cond, noise, R, h, w, flow, keep_states=shares)
        bar.update(1)
        half = integrate(model, ref_sampler, cond, noise, max(R // 2, 1), h, w, flow)
        bar.update(1)
        ref_final, ref_half, ref_sigmas = ref.final.float().cpu(), half.final.float().cpu(), np.asarray(ref.sigmas)
        ref_states = torch.stack(ref.states) if shares else None
        ref_seconds = ref.seconds + half.seconds
        arrays = {"final": ref_final.numpy(), "half": ref_half.numpy(), "sigmas": ref_sigmas}
        if shares:
            arrays["states"] = ref_states.numpy()
        save_cached(cache, arrays)
    ref_images = model.decode(ref_final.to(model.device, model.dtype), h, w).float().cpu()
    ref_feats = _features(extractor, ref_images)
    change = float(per_sample_rmse(ref_final, ref_half).mean())

    rows, paths = [], {}
    for name, n, c in configs:
        bar.set_postfix_str(f"{name} × {n}")
        sampler = make_sampler(c, sc)
        label = option_label(name, n, c)
        why = stochastic_reason(sampler, float(cfg.sampler.eta))
        if why:
            ctx.tag(f"skipped.trajectory.{name}", why)
            log.info("trajectory: %s skipped: %s", label, why)
            bar.update(1)
            continue
        run = integrate(model, sampler, cond, noise, n, h, w, flow, keep_states=(name, n) == configs[0][:2])
        images = model.decode(run.final, h, w).float().cpu()
        final = run.final.float().cpu()
        rmse = per_sample_rmse(final, ref_final)
        ps = per_sample_psnr(images, ref_images)
        fd = (_features(extractor, images) - ref_feats).norm(dim=1).numpy()
        row = {"config": label, "solver": name, "class": type(sampler).__name__, "steps": n, "nfe": run.nfe}
        for metric, values in (("rmse", rmse), ("psnr", ps), ("feature_distance", fd)):
            row[metric], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = mean_ci(values)
        row["sec_per_image"] = run.seconds / K
        row["textbook_order"] = TEXTBOOK_ORDER.get(type(sampler).__name__)
        rows.append(row)
        paths[(name, n)] = (run, rmse, sampler)
        bar.update(1)
    bar.close()

    smallest = min((r["rmse"] for r in rows), default=float("nan"))
    converged = bool(change < 0.01 * smallest) if rows else False
    orders = []
    for name in names:
        mine = [(n, paths[(name, n)]) for n in sorted({n for (nm, n) in paths if nm == name})]
        if len(mine) < 2:
            continue
        fit = fit_order([p[0].nfe for _, p in mine], np.stack([p[1] for _, p in mine]), change)
        orders.append(
            {
                "solver": name,
                "class": type(mine[0][1][2]).__name__,
                "order": fit["order"],
                "order_ci_low": fit["ci_low"],
                "order_ci_high": fit["ci_high"],
                "fit_nfe_min": fit["nfe_min"],
                "fit_nfe_max": fit["nfe_max"],
                "fit_points": fit["points"],
                "local_orders": " ".join(f"{v:.3f}" for v in fit["local"]),
                "textbook_order": TEXTBOOK_ORDER.get(type(mine[0][1][2]).__name__),
            }
        )

    geometry = []
    own = paths.get(configs[0][:2])
    if own is not None:
        run, rmse, sampler = own
        angles = curvature(run.directions)
        share = [float("nan")] * (len(run.sigmas) - 1)
        if shares and ref_states is not None:
            at = reference_at(ref_sigmas, ref_states)
            base = float(rmse.mean())
            prefix: dict = {}
            integrate(model, sampler, cond, noise, own_steps, h, w, flow, prefix=prefix)
            for i in range(len(run.sigmas) - 1):
                swap = (i, lambda s0, s1, c0: c0.float().cpu().add(at(s1) - at(s0)).to(model.device))
                rerun = integrate(model, sampler, cond, noise, own_steps, h, w, flow, replace=swap, prefix=prefix)
                share[i] = 1.0 - float(per_sample_rmse(rerun.final.float().cpu(), ref_final).mean()) / base
        for i in range(len(run.sigmas) - 1):
            geometry.append(
                {
                    "step": i,
                    "sigma": run.sigmas[i],
                    "sigma_next": run.sigmas[i + 1],
                    "curvature_deg": float(angles[i - 1]) if 1 <= i <= len(angles) else float("nan"),
                    "error_share": share[i],
                }
            )
    return {
        "rows": rows,
        "orders": orders,
        "geometry": geometry,
        "reference": {
            "solver": ref_name,
            "class": type(ref_sampler).__name__,
            "steps": R,
            "change": change,
            "converged": converged,
            "seconds": ref_seconds,
        },
        "own": configs[0],
    }
