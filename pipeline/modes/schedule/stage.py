"""The schedule mode's stage: noise-schedule inspection of the model's scheduler and of reference schedules.

Scalars (model's scheduler under ``schedule/<name>``, each compared schedule under
``schedule/<schedule>/<name>``): log_snr_max, log_snr_min (finite part), terminal_snr, zero_terminal_snr,
monotonic, sigma_max, first_visited_t, last_visited_t, first_visited_log_snr, num_visited. Tag
``schedule/prediction_type``: epsilon / v_prediction / sample / ``flow, static shift`` / ``flow, dynamic shift at HxW``.

A rectified-flow model (SD3, Flux) is read from configs only (``scheduler/``, ``model_index.json``, ``vae/`` and
``transformer/config.json``): σ(u) with its shift — Flux's resolution-dependent one at ``mode.schedule.height/width``
(default: the model's native size) — as the equivalent ᾱ = SNR / (1 + SNR), and the σ's its solver visits. Every
curve shares one log-SNR axis over normalised time (t / (T − 1); flow: u). Compared β schedules on a flow model are
shown at the normalised times the model's solver visits (no DDPM-family solver drives a flow model). A flow model
on the native path (:mod:`pipeline.models.native`) is loaded instead: its σ's are what its own ``__call__`` passes
to ``set_timesteps`` at the run's size (tag ``schedule/native_set_timesteps``), the denoiser never called.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from pipeline.core.registry import stage
from pipeline.errors import UserError
from pipeline.models.adapter import ModelAdapter
from pipeline.models.family import family_in_index, flow_geometry, flow_pipeline_classes
from pipeline.models.native import NATIVE_FAMILY, native_timestep_call
from pipeline.models.schedulers import (
    build_scheduler,
    flow_shift,
    is_flow_model,
    set_flow_timesteps,
    set_flow_timesteps_as,
    uses_dynamic_shift,
)
from pipeline.models.stages import cached_pipe, make_sampler
from pipeline.modes.schedule.plots import error_figure, geometry_figure, overlay_figure, panel_figure, visited_figure
from pipeline.modes.schedule.schedules import (
    NoiseSchedule,
    flow_positions,
    flow_schedule,
    from_scheduler,
    karras_sigmas,
    named_schedule,
    visited_positions,
)
from pipeline.modes.schedule.trajectory import option_label, run_study, study_configs

log = logging.getLogger(__name__)


# the keys of a diffusers config that make the β schedule; every other key belongs to the solver
_SCHEDULE_KEYS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
}


def visited(schedule: NoiseSchedule, solver_cfg, num_steps: int, sampler=None) -> np.ndarray:
    """Training-step positions the configured solver evaluates the model at, in order (may be fractional).
    ``sampler``: the run's solver, run on this schedule's β (a copy; for the model's own schedule, itself), with
    its ``sampler.*`` schedule-zoo keys (an AYS list's σ's are the same noise levels on a compared β schedule)."""
    if schedule.kind == "sigma":
        # continuous σ schedules are sampled on their own ρ=7 Karras discretisation (EDM, use_karras_sigmas)
        s = schedule.sigmas
        return visited_positions(schedule, karras_sigmas(s[0], s[-1], num_steps)[::-1])
    if sampler is None:
        sampler = build_scheduler(schedule.scheduler_config, solver_cfg, source=f"schedule {schedule.name!r}")
    else:  # never mutate the run's shared sampler
        beta = {k: (schedule.scheduler_config or {}).get(k, d) for k, d in _SCHEDULE_KEYS.items()}
        sampler = type(sampler).from_config({**dict(sampler.config), **beta})
    from pipeline.models.schedulers import set_diffusion_timesteps  # (here: the rest of this file is the lead's)

    set_diffusion_timesteps(sampler, num_steps)
    return sampler.timesteps.double().numpy()


# ---------------------------------------------------------------------------------------------- flow models
def _flow_model(ctx, cfg, steps: int) -> tuple[NoiseSchedule, np.ndarray, str]:
    """The flow model's schedule, the training-step positions its solver visits, and a label suffix."""
    sc, sampler, mcfg = ctx.get("scheduler_config"), ctx.get("sampler"), cfg.mode.schedule
    family = family_in_index(sc.get("model_index"))
    if family is NATIVE_FAMILY:
        return _native_flow_model(ctx, cfg, steps)
    family_name = family.name if family is not None else None
    h, w, seq = flow_geometry(cfg.model.path, family, mcfg.height, mcfg.width)
    if seq is None and uses_dynamic_shift(sc["config"]):
        raise UserError(
            f"model.path: {sc['source']} uses a resolution-dependent shift (use_dynamic_shifting) but "
            f"there is no model_index.json naming the family ({' / '.join(flow_pipeline_classes())}) to "
            "count image tokens from; point model.path at the pipeline directory"
        )
    shift = flow_shift(sampler, seq, family_name, num_inference_steps=steps)
    solver = type(sampler).from_config(sampler.config)  # never mutate the run's shared sampler
    set_flow_timesteps(solver, steps, "cpu", seq, family_name)
    return _flow_curve(ctx, sampler, solver, shift, uses_dynamic_shift(sc["config"]), h, w)


def _native_flow_model(ctx, cfg, steps: int) -> tuple[NoiseSchedule, np.ndarray, str]:
    """A flow model on the native path: the σ's (and μ) its own ``__call__`` passes to ``set_timesteps`` at the
    run's size, recorded with the denoiser never called (:func:`pipeline.models.native.native_timestep_call`)."""
    sampler, mcfg = ctx.get("sampler"), cfg.mode.schedule
    pipe, _ = cached_pipe(cfg.model, ctx.device)
    h, w = ModelAdapter(pipe).resolve_size(mcfg.height, mcfg.width)
    kwargs = native_timestep_call(pipe, "", steps, h, w, guidance_scale=float(cfg.sampler.guidance_scale))
    ctx.tag("schedule/native_set_timesteps", repr({k: v for k, v in kwargs.items() if k != "sigmas"}))
    mu = kwargs.get("mu")
    solver = type(sampler).from_config(sampler.config)
    set_flow_timesteps_as(solver, kwargs, "cpu")
    return _flow_curve(ctx, sampler, solver, flow_shift(sampler, mu=mu), mu is not None, h, w)


def _flow_curve(ctx, sampler, solver, shift: float, dynamic: bool, h: int, w: int):
    """The flow model's σ(u) with ``shift``, the positions ``solver`` (timesteps set) visits, and the label; the
    tag ``schedule/prediction_type`` says whether the shift is static or resolution-dependent (at which size)."""
    T = int(sampler.config.num_train_timesteps)
    model = flow_schedule("model", shift, T)
    # the σ's the solver steps through, one per model call: σ·T is not always the timestep the model gets (CogView4
    # evaluates it at the unshifted timesteps, DPM-Solver at σ·T rounded to integers)
    sigmas = solver.sigmas[: len(solver.timesteps)].double().cpu().numpy()
    ctx.tag("schedule/flow_shift", f"{shift:.6g}")
    kind = f"dynamic shift at {h}x{w}" if dynamic else "static shift"
    ctx.tag("schedule/prediction_type", f"flow, {kind}")
    label = f"flow, {kind} {shift:.3g}"
    terminal = (sampler.config.get("_flow_reference") or sampler.config).get("shift_terminal")
    if terminal:  # the solver's σ's are stretched to end at it (Qwen-Image): the points are, the σ(u) curve is not
        ctx.tag("schedule/shift_terminal", f"{float(terminal):.6g}")
        label += f", σ's stretched to end at {float(terminal):.3g} (curve unstretched)"
    return model, flow_positions(model, sigmas), label


def schedule_scalars(schedule: NoiseSchedule, ts: np.ndarray) -> dict[str, float]:
    out = schedule.summary()
    first_ls = float(schedule.log_snr_at(ts[0]))
    if not np.isfinite(
        first_ls
    ):  # zero-terminal-SNR schedule visiting t = T-1: keep the finite part, as for log_snr_min
        first_ls = out["log_snr_min"]
    out.update(
        first_visited_t=float(ts[0]),
        last_visited_t=float(ts[-1]),
        first_visited_log_snr=first_ls,
        num_visited=float(len(ts)),
    )
    return out


def findings(label: str, s: dict[str, float], kind: str = "discrete", beta_schedule: str | None = None) -> list[str]:
    """One line per property of a schedule. DDPM-linear's log-SNR span of about ±10 is the yardstick only for
    linear-β schedules (linear, scaled_linear and its zero-SNR rescaling, a model's trained β): the cosine schedule
    and the σ schedules (karras, edm) and flow paths are described by what they are instead."""
    span = f"{label}: log-SNR spans {s['log_snr_max']:+.2f} -> {s['log_snr_min']:+.2f}"
    if kind == "flow":  # a σ ∈ [0, 1] path: DDPM-linear's ±10 is no yardstick for it
        notes = [span + " (rectified flow: log-SNR = 2·log((1 − σ)/σ))"]
    elif kind == "sigma":
        notes = [
            span + f" (σ schedule: log-SNR = −2·log σ, σ from {math.exp(-s['log_snr_max'] / 2):.3g} "
            f"to {s['sigma_max']:.3g})"
        ]
    elif beta_schedule == "squaredcos_cap_v2":
        notes = [span + " (cosine schedule: ᾱ ∝ cos²((t/T + 0.008)/1.008·π/2), β capped at 0.999)"]
    else:
        notes = [
            span
            + (
                ""
                if abs(s["log_snr_max"] - 10) < 1.5 and abs(s["log_snr_min"] + 10) < 1.5
                else " (not the ±10 of DDPM-linear)"
            )
        ]
    if s["zero_terminal_snr"]:
        notes.append(f"{label}: zero terminal SNR (ᾱ_T = 0): the last training step is pure noise")
    else:
        notes.append(
            f"{label}: non-zero terminal SNR (SNR_T = {s['terminal_snr']:.3g}): sampling from pure noise "
            "starts off the training distribution (Lin et al., WACV 2024) — a property, not an error"
        )
    if not s["monotonic"]:
        notes.append(f"{label}: ᾱ is NOT strictly decreasing")
    return notes


def _curve_rows(schedule: NoiseSchedule) -> list[dict]:
    rows = [
        {"t": t, "beta": b, "alpha_cumprod": a, "snr": s, "log_snr": ls, "sigma": sg}
        for t, (b, a, s, ls, sg) in enumerate(
            zip(schedule.betas, schedule.alphas_cumprod, schedule.snr, schedule.log_snr, schedule.sigmas)
        )
    ]
    if schedule.kind == "flow":
        for row, u, fs in zip(rows, schedule.normalised_time(np.arange(len(rows))), schedule.flow_sigmas):
            row.update(u=u, flow_sigma=fs)
    return rows


@stage("schedule", needs=("scheduler_config", "sampler"))
def schedule_stage(ctx, cfg):
    mcfg = cfg.mode.schedule
    steps = int(cfg.sampler.num_inference_steps)
    sampler = ctx.get("sampler")
    sc = ctx.get("scheduler_config")
    source = sc["source"]
    where = source.split("/")[-3] if source.count("/") >= 2 else source
    flow = is_flow_model(sc["config"], sc.get("model_index"))
    if not flow:
        ctx.tag("schedule/prediction_type", str(sampler.config.get("prediction_type") or "epsilon"))
    if flow:
        model, ts, what = _flow_model(ctx, cfg, steps)
        label = f"model ({where}, {type(sampler).__name__}, {what}, {steps} steps)"
    else:
        model = from_scheduler("model", sampler)
        ts = visited(model, cfg.scheduler, steps, sampler=sampler)
        label = f"model ({where}, {type(sampler).__name__}, {steps} steps)"

    curves = [(label, model, ts)]
    for name in mcfg.compare:
        name = getattr(name, "value", name)
        schedule = named_schedule(name, model.num_train_timesteps)
        if flow and schedule.kind == "discrete":  # at the normalised times the flow solver visits
            cmp_ts = model.normalised_time(ts) * (schedule.num_train_timesteps - 1)
        else:
            cmp_ts = visited(schedule, cfg.scheduler, steps, sampler=sampler)
        curves.append((name, schedule, cmp_ts))

    summary_rows, visited_rows, notes = [], [], []
    for i, (name_label, schedule, ts) in enumerate(curves):
        prefix = "schedule" if i == 0 else f"schedule/{schedule.name}"
        scalars = schedule_scalars(schedule, ts)
        ctx.log_scalars({f"{prefix}/{k}": v for k, v in scalars.items()})
        notes += findings(name_label, scalars, schedule.kind, (schedule.scheduler_config or {}).get("beta_schedule"))
        summary_rows.append({"schedule": name_label, **scalars})
        visited_rows += [
            {"schedule": name_label, "step": j, "t": float(t), "log_snr": float(schedule.log_snr_at(t))}
            for j, t in enumerate(ts)
        ]
        ctx.save_table(_curve_rows(schedule), f"schedule_curve_{schedule.name}")
        ctx.save_figure(panel_figure(schedule, name_label, ts), f"schedule_{schedule.name}")
    ctx.save_figure(overlay_figure(curves), "schedule_log_snr_overlay")
    _visited_steps(ctx, cfg, sc, model, flow, ts)
    ctx.save_table(summary_rows, "schedule_summary")
    ctx.save_table(visited_rows, "schedule_visited")
    ctx.save_text("\n".join(f"- {n}" for n in notes) + "\n", "schedule_findings.md")
    for note in notes:
        log.info("finding: %s", note)

    if not model.monotonic and mcfg.strict:
        t_bad = model.first_non_decreasing_t()
        raise UserError(
            f"{source}: ᾱ (alphas_cumprod) is not strictly decreasing (first at t={t_bad}); expected a diffusion "
            "schedule (check beta_schedule / trained_betas). Set mode.schedule.strict=false to only report it"
        )
    return {}


# ---------------------------------------------------------------------------------------------- visited steps
def _visited_steps(ctx, cfg, sc, model: NoiseSchedule, flow: bool, own_ts: np.ndarray) -> None:
    """``tables/visited_steps.csv`` (one row per denoiser call of each configuration: its timestep, σ — flow σ on
    flow models, √((1 − ᾱ)/ᾱ) otherwise — and log-SNR) and, for more than one configuration,
    ``plots/schedule_visited_steps.png``: every configuration's points on the model's continuous log-SNR curve and
    stacked one row each. Configs only: no
    weights (a native-path flow model: its own configuration only)."""
    family = family_in_index(sc.get("model_index"))
    rows, points = [], []
    for i, (name, n, c) in enumerate(study_configs(cfg)):
        label = option_label(name, n, c)
        sampler = make_sampler(c, sc) if i else ctx.get("sampler")
        if i == 0:
            ts = own_ts
        elif flow and (family is None or family is NATIVE_FAMILY):
            continue  # its σ's come from the pipeline's own call (loaded once, for the run's configuration)
        elif flow:
            mcfg = cfg.mode.schedule
            _, _, seq = flow_geometry(cfg.model.path, family, mcfg.height, mcfg.width)
            solver = type(sampler).from_config(sampler.config)
            set_flow_timesteps(solver, n, "cpu", seq, family.name)
            ts = flow_positions(model, solver.sigmas[: len(solver.timesteps)].double().cpu().numpy())
        else:
            ts = visited(model, c.scheduler, n, sampler=sampler)
        log_snr = model.log_snr_at(ts)
        with np.errstate(over="ignore", divide="ignore"):
            sigma = 1.0 / (1.0 + np.exp(log_snr / 2)) if flow else np.exp(-log_snr / 2)
        sigmas = str(getattr(c.sampler.get("sigmas", None), "value", c.sampler.get("sigmas", None)) or "default")
        spacing = c.sampler.get("timestep_spacing", None) or c.scheduler.get("timestep_spacing", None)
        for j, (t, s, ls) in enumerate(zip(ts, sigma, log_snr)):
            rows.append(
                {
                    "config": label,
                    "solver": name,
                    "sigmas": sigmas,
                    "spacing": str(getattr(spacing, "value", spacing) or ""),
                    "steps": n,
                    "step": j,
                    "timestep": float(t),
                    "sigma": float(s),
                    "log_snr": float(ls),
                }
            )
        points.append((label, np.asarray(ts, dtype=np.float64)))
    ctx.save_table(rows, "visited_steps")
    if len(points) > 1:  # one configuration's points are already on plots/schedule_model.png and the overlay
        ctx.save_figure(visited_figure(model, points), "schedule_visited_steps")


# ---------------------------------------------------------------------------------------------- trajectory part
@stage("trajectory", needs=("scheduler_config", "sampler", "model", "prompts", "extractors"))
def trajectory_stage(ctx, cfg):
    """``mode.schedule.trajectory=true``: :func:`pipeline.modes.schedule.trajectory.run_study`, its tables, plots
    and scalars (docstring there)."""
    out = run_study(ctx, cfg)
    rows, orders, geometry, ref = out["rows"], out["orders"], out["geometry"], out["reference"]
    own_name, own_steps, _ = out["own"]
    ctx.tag("schedule/reference", f"{ref['solver']} ({ref['class']}) × {ref['steps']}")
    ctx.tag("schedule/reference_converged", str(ref["converged"]).lower())
    scalars = {"schedule/reference_change": ref["change"]}
    own = next((r for r in rows if r["solver"] == own_name and r["steps"] == own_steps), None)
    if own is not None:
        scalars["cost/nfe"] = float(own["nfe"])
        scalars["schedule/sec_per_image"] = own["sec_per_image"]
        for metric in ("rmse", "psnr", "feature_distance"):
            for suffix in ("", "_ci_low", "_ci_high"):
                if math.isfinite(own[metric + suffix]):
                    scalars[f"schedule/trajectory_{metric}{suffix}"] = own[metric + suffix]
    for o in orders:
        for k, name in (("order", ""), ("order_ci_low", "_ci_low"), ("order_ci_high", "_ci_high")):
            if math.isfinite(o[k]):
                scalars[f"schedule/order/{o['solver']}{name}"] = o[k]
    if geometry:
        angles = [(g["curvature_deg"], g["step"]) for g in geometry if math.isfinite(g["curvature_deg"])]
        if angles:
            top = max(angles)
            scalars["schedule/curvature_max"], scalars["schedule/curvature_max_step"] = top[0], float(top[1])
    ctx.log_scalars(scalars)
    ctx.save_table(rows, "trajectory_error")
    if orders:
        ctx.save_table(orders, "trajectory_order")
    if geometry:
        ctx.save_table(geometry, "trajectory_geometry")
        ctx.save_figure(geometry_figure(geometry, rows[0]["config"] if rows else own_name), "trajectory_geometry")
    if rows:
        ctx.save_figure(error_figure(rows, orders, ref, out["per_sample"]), "trajectory_error_nfe")
    notes = [
        f"reference {ref['solver']} ({ref['class']}) × {ref['steps']}: halving its step changes the final latents by "
        f"RMSE {ref['change']:.3g} — "
        + (
            "converged (< 1 % of the smallest error reported)"
            if ref["converged"]
            else "NOT converged: errors below "
            "100× that change are left out of the order fits; raise mode.schedule.reference_max_steps"
        )
    ]
    for o in orders:
        if math.isfinite(o["order"]):
            notes.append(
                f"{o['solver']} ({o['class']}): measured order {o['order']:.2f} [{o['order_ci_low']:.2f}, "
                f"{o['order_ci_high']:.2f}] over NFE {o['fit_nfe_min']}–{o['fit_nfe_max']} (textbook "
                f"{o['textbook_order']}); local orders {o['local_orders']}"
            )
        else:
            notes.append(f"{o['solver']}: no order (fewer than 2 points resolved by the reference)")
    off = list(dict.fromkeys(r["config"] for r in rows if r.get("stride_mismatch")))
    if off:
        notes.append(
            f"{', '.join(off)}: DDIM/PNDM step from t to t − ⌊T/N⌋, not to the next visited timestep, at this spacing "
            "(tag sampler.stride_mismatch explains): their errors include that inconsistency"
        )
    clipped = list(dict.fromkeys(f"{r['solver']} ({r['x0_correction']})" for r in rows if r.get("x0_correction")))
    if clipped:
        notes.append(
            f"{', '.join(clipped)}: correct x₀ at every step as the model's scheduler config asks; the reference "
            "solves the probability-flow ODE without it, so their errors converge to that difference, not to 0"
        )
    if not ref["converged"]:
        log.warning("trajectory: %s", notes[0])
    ctx.save_text("\n".join(f"- {n}" for n in notes) + "\n", "trajectory_findings.md")
    for note in notes:
        log.info("trajectory: %s", note)
    return {}
