"""Schedule mode: noise-schedule inspection of the model's scheduler and of reference schedules.

Scalars (model's scheduler under ``schedule/<name>``, each compared schedule under
``schedule/<schedule>/<name>``): log_snr_max, log_snr_min (finite part), terminal_snr, zero_terminal_snr,
monotonic, sigma_max, first_visited_t, last_visited_t, first_visited_log_snr, num_visited.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List

import numpy as np

from pipeline.errors import UserError
from pipeline.models.schedulers import build_scheduler
from pipeline.registry import register_mode, stage
from pipeline.schedules import NamedSchedule, NoiseSchedule, from_scheduler, karras_sigmas, named_schedule, visited_positions

log = logging.getLogger(__name__)


@dataclass
class ScheduleModeConfig:
    compare: List[NamedSchedule] = field(
        default_factory=lambda: [NamedSchedule(n) for n in
                                 ("linear", "scaled_linear", "squaredcos_cap_v2", "scaled_linear_zero_snr", "karras", "edm")]
    )
    strict: bool = True  # a model schedule whose ᾱ is not strictly decreasing is an error (after results are saved)


register_mode("schedule", stages=["schedule"], schema=ScheduleModeConfig)


def visited(schedule: NoiseSchedule, solver_cfg, num_steps: int, sampler=None) -> np.ndarray:
    """Training-step positions the configured solver evaluates the model at, in order (may be fractional)."""
    if schedule.kind == "sigma":
        # continuous σ schedules are sampled on their own ρ=7 Karras discretisation (EDM, use_karras_sigmas)
        s = schedule.sigmas
        return visited_positions(schedule, karras_sigmas(s[0], s[-1], num_steps)[::-1])
    if sampler is None:
        sampler = build_scheduler(schedule.scheduler_config, solver_cfg, source=f"schedule {schedule.name!r}")
    else:
        sampler = type(sampler).from_config(sampler.config)  # never mutate the run's shared sampler
    sampler.set_timesteps(num_steps)
    return sampler.timesteps.double().numpy()


def schedule_scalars(schedule: NoiseSchedule, ts: np.ndarray) -> dict[str, float]:
    out = schedule.summary()
    first_ls = float(schedule.log_snr_at(ts[0]))
    if not np.isfinite(first_ls):  # zero-terminal-SNR schedule visiting t = T-1: keep the finite part, as for log_snr_min
        first_ls = out["log_snr_min"]
    out.update(first_visited_t=float(ts[0]), last_visited_t=float(ts[-1]), first_visited_log_snr=first_ls,
               num_visited=float(len(ts)))
    return out


def findings(label: str, s: dict[str, float]) -> list[str]:
    notes = [f"{label}: log-SNR spans {s['log_snr_max']:+.2f} -> {s['log_snr_min']:+.2f}"
             + ("" if abs(s["log_snr_max"] - 10) < 1.5 and abs(s["log_snr_min"] + 10) < 1.5
                else " (not the ±10 of DDPM-linear)")]
    if s["zero_terminal_snr"]:
        notes.append(f"{label}: zero terminal SNR (ᾱ_T = 0): the last training step is pure noise")
    else:
        notes.append(f"{label}: non-zero terminal SNR (SNR_T = {s['terminal_snr']:.3g}): sampling from pure noise "
                     "starts off the training distribution (Lin et al., WACV 2024) — a property, not an error")
    if not s["monotonic"]:
        notes.append(f"{label}: ᾱ is NOT strictly decreasing")
    return notes


def _panel_figure(schedule: NoiseSchedule, label: str, ts: np.ndarray):
    import matplotlib.pyplot as plt

    t = np.arange(schedule.num_train_timesteps)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    axes[0].plot(t, schedule.alphas_cumprod)
    axes[0].set(title="ᾱ (alphas_cumprod)", xlabel="training step t", ylim=(-0.02, 1.02))
    ls = schedule.log_snr
    axes[1].plot(t, np.where(np.isfinite(ls), ls, np.nan))
    axes[1].scatter(ts, schedule.log_snr_at(ts), s=12, color="C3", zorder=3, label=f"visited ({len(ts)})")
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[1].set(title="log-SNR", xlabel="training step t")
    axes[1].legend(loc="upper right", fontsize=8)
    axes[2].semilogy(t, np.clip(schedule.betas, 1e-12, None))
    axes[2].set(title="β", xlabel="training step t")
    fig.suptitle(label)
    fig.tight_layout()
    return fig


def _overlay_figure(curves: list[tuple[str, NoiseSchedule, np.ndarray]]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, schedule, ts) in enumerate(curves):
        x = np.linspace(0.0, 1.0, schedule.num_train_timesteps)
        ls = schedule.log_snr
        # the model's own curve: black, dashed and on top (it often coincides with a reference schedule)
        style = dict(color="black", ls="--", lw=1.6, zorder=4) if i == 0 else dict(color=f"C{i}", lw=1.2)
        ax.plot(x, np.where(np.isfinite(ls), ls, np.nan), label=label, **style)
        ax.scatter(ts / (schedule.num_train_timesteps - 1), schedule.log_snr_at(ts), color=style["color"], s=10, zorder=5)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="normalised time t / (T-1)", ylabel="log-SNR", title="log-SNR of compared schedules (dots: visited timesteps)")
    ax.legend(fontsize=8)
    return fig


def _curve_rows(schedule: NoiseSchedule) -> list[dict]:
    return [
        {"t": t, "beta": b, "alpha_cumprod": a, "snr": s, "log_snr": ls, "sigma": sg}
        for t, (b, a, s, ls, sg) in enumerate(zip(schedule.betas, schedule.alphas_cumprod, schedule.snr,
                                                  schedule.log_snr, schedule.sigmas))
    ]


@stage("schedule", needs=("scheduler_config", "sampler"))
def schedule_stage(ctx, cfg):
    mcfg = cfg.mode.schedule
    steps = int(cfg.sampler.num_inference_steps)
    sampler = ctx.get("sampler")
    source = ctx.get("scheduler_config")["source"]
    model = from_scheduler("model", sampler)
    label = f"model ({source.split('/')[-3] if source.count('/') >= 2 else source}, {type(sampler).__name__}, {steps} steps)"

    curves = [(label, model, visited(model, cfg.scheduler, steps, sampler=sampler))]
    for name in mcfg.compare:
        name = getattr(name, "value", name)
        schedule = named_schedule(name, model.num_train_timesteps)
        curves.append((name, schedule, visited(schedule, cfg.scheduler, steps)))

    summary_rows, visited_rows, notes = [], [], []
    for i, (name_label, schedule, ts) in enumerate(curves):
        prefix = "schedule" if i == 0 else f"schedule/{schedule.name}"
        scalars = schedule_scalars(schedule, ts)
        ctx.log_scalars({f"{prefix}/{k}": v for k, v in scalars.items()})
        notes += findings(name_label, scalars)
        summary_rows.append({"schedule": name_label, **scalars})
        visited_rows += [{"schedule": name_label, "step": j, "t": float(t), "log_snr": float(schedule.log_snr_at(t))}
                         for j, t in enumerate(ts)]
        ctx.save_table(_curve_rows(schedule), f"schedule_curve_{schedule.name}")
        ctx.save_figure(_panel_figure(schedule, name_label, ts), f"schedule_{schedule.name}")
    ctx.save_figure(_overlay_figure(curves), "schedule_log_snr_overlay")
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
