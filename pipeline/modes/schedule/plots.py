"""Figures of the schedule mode: one panel per schedule (ᾱ, log-SNR with the visited steps, β or flow σ(u)) and
the log-SNR overlay of every compared schedule. Schedule labels come from the config (user text): drawn through
:func:`pipeline.core.escape.mpl_text`; the project's own titles may use mathtext, the labels never do."""

from __future__ import annotations

import numpy as np

from pipeline.core.escape import mpl_label, mpl_text
from pipeline.modes.schedule.schedules import NoiseSchedule


def panel_figure(schedule: NoiseSchedule, label: str, ts: np.ndarray):
    import matplotlib.pyplot as plt

    flow = schedule.kind == "flow"
    t = np.arange(schedule.num_train_timesteps)
    x, xv = (schedule.normalised_time(t), schedule.normalised_time(ts)) if flow else (t, ts)
    xlabel = "uniform time u" if flow else "training step t"
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    axes[0].plot(x, schedule.alphas_cumprod)
    axes[0].set(title="equivalent ᾱ = SNR/(1+SNR)" if flow else "ᾱ (alphas_cumprod)", xlabel=xlabel, ylim=(-0.02, 1.02))
    ls = schedule.log_snr
    axes[1].plot(x, np.where(np.isfinite(ls), ls, np.nan))
    axes[1].scatter(xv, schedule.log_snr_at(ts), s=12, color="C3", zorder=3, label=f"visited ({len(ts)})")
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[1].set(title="log-SNR", xlabel=xlabel)
    axes[1].legend(loc="upper right", fontsize=8)
    if flow:
        axes[2].plot(x, schedule.flow_sigmas)
        axes[2].plot([0, 1], [0, 1], color="grey", lw=0.5, ls=":")  # shift 1
        axes[2].set(title=f"σ(u), shift {schedule.shift:.3g}", xlabel=xlabel)
    else:
        axes[2].semilogy(t, np.clip(schedule.betas, 1e-12, None))  # a σ schedule has no β_0 (NaN: not drawn)
        axes[2].set(
            title="β" + (" (σ grid: no step before t = 0)" if schedule.kind == "sigma" else ""),
            xlabel="training step t",
        )
    fig.suptitle(mpl_text(label))
    fig.tight_layout()
    return fig


def overlay_figure(curves: list[tuple[str, NoiseSchedule, np.ndarray]]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, schedule, ts) in enumerate(curves):
        x = schedule.normalised_time(np.arange(schedule.num_train_timesteps))
        ls = schedule.log_snr
        # the model's own curve: black, dashed and on top (it often coincides with a reference schedule)
        style = dict(color="black", ls="--", lw=1.6, zorder=4) if i == 0 else dict(color=f"C{i}", lw=1.2)
        ax.plot(x, np.where(np.isfinite(ls), ls, np.nan), label=mpl_label(label), **style)
        ax.scatter(schedule.normalised_time(ts), schedule.log_snr_at(ts), color=style["color"], s=10, zorder=5)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(
        xlabel="normalised time t / (T-1)  (flow: u, σ = shift(u))",
        ylabel="log-SNR",
        title="log-SNR of compared schedules (dots: visited timesteps)",
    )
    ax.legend(fontsize=8)
    return fig
