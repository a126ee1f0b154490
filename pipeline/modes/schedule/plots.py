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


def error_figure(rows: list[dict], orders: list[dict], reference: dict, per_sample: dict | None = None):
    """Final-latent RMSE against the reference vs NFE (log-log), one line per solver (its samples' own curves thin:
    an error that is not monotone in NFE for some sample says the range is not yet asymptotic), the fitted slope
    drawn over its fit range; labels name the measured order and the textbook one."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    fits = {o["solver"]: o for o in orders}
    for i, solver in enumerate(dict.fromkeys(r["solver"] for r in rows)):
        mine = sorted((r for r in rows if r["solver"] == solver), key=lambda r: r["nfe"])
        x = np.array([r["nfe"] for r in mine], dtype=float)
        y = np.array([r["rmse"] for r in mine])
        lo = np.array([r["rmse_ci_low"] for r in mine])
        hi = np.array([r["rmse_ci_high"] for r in mine])
        o = fits.get(solver)
        label = mpl_label(solver)
        if o is not None and np.isfinite(o["order"]):
            label += f" (order {o['order']:.2f}, textbook {o['textbook_order']})"
        (line,) = ax.loglog(x, y, marker="o", color=f"C{i}", label=label)
        if np.isfinite(lo).all() and np.isfinite(hi).all():
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
        samples = [per_sample[(solver, r["nfe"])] for r in mine if (solver, r["nfe"]) in (per_sample or {})]
        if len(samples) == len(mine) and len(mine) > 1:
            ax.loglog(x, np.stack(samples), color=line.get_color(), lw=0.5, alpha=0.35)
        if o is not None and np.isfinite(o["order"]) and o["fit_nfe_min"]:
            xs = np.array([o["fit_nfe_min"], o["fit_nfe_max"]], dtype=float)
            y0 = np.interp(np.log(xs[1]), np.log(x), np.log(y))
            ax.loglog(xs, np.exp(y0) * (xs / xs[1]) ** (-o["order"]), ls=":", color=line.get_color(), lw=2)
    if np.isfinite(reference["change"]) and reference["change"] > 0:
        ax.axhline(reference["change"], color="grey", ls="--", lw=0.8, label="reference: change on halving its step")
    ax.set(
        xlabel="NFE (denoiser calls per image; CFG doubles the batch, not the count)",
        ylabel="final-latent RMSE vs reference",
        title=f"error against {mpl_text(reference['solver'])} × {reference['steps']} (dotted: fitted slope)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def geometry_figure(geometry: list[dict], label: str):
    """Per solver step: the angle between successive ODE directions, and the step's share of the final error."""
    import matplotlib.pyplot as plt

    steps = [g["step"] for g in geometry]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    axes[0].plot(steps, [g["curvature_deg"] for g in geometry], marker="o")
    axes[0].set(xlabel="solver step", ylabel="degrees", title="angle between successive ODE directions")
    share = [g["error_share"] for g in geometry]
    axes[1].bar(steps, np.nan_to_num(share), color=["C3" if s > 0 else "C0" for s in np.nan_to_num(share)])
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[1].set(
        xlabel="solver step",
        ylabel="1 − E(step replaced) / E",
        title="share of the final error (step replaced by reference)",
    )
    fig.suptitle(mpl_text(label))
    fig.tight_layout()
    return fig


def visited_figure(schedule: NoiseSchedule, points: list[tuple[str, np.ndarray]]):
    """Left: the model's log-SNR curve with every configuration's visited points on it; right: the same points
    stacked one row per configuration (labels are config text: escaped)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, 2, figsize=(13, 0.9 + max(3.2, 0.32 * len(points))), gridspec_kw={"width_ratios": [1, 1.3]}
    )
    x = schedule.normalised_time(np.arange(schedule.num_train_timesteps))
    ls = schedule.log_snr
    axes[0].plot(x, np.where(np.isfinite(ls), ls, np.nan), color="black", lw=1)
    for i, (_label, ts) in enumerate(points):
        marker = "o^sDvP*X"[i % 8]
        axes[0].scatter(schedule.normalised_time(ts), schedule.log_snr_at(ts), s=14, marker=marker, color=f"C{i % 10}")
        v = schedule.log_snr_at(ts)
        axes[1].scatter(
            np.where(np.isfinite(v), v, np.nan), np.full(len(ts), i), s=12, marker=marker, color=f"C{i % 10}"
        )
    axes[0].set(xlabel="normalised time (flow: u)", ylabel="log-SNR", title="visited points on the model's curve")
    axes[1].set_yticks(range(len(points)), [mpl_text(p[0]) for p in points], fontsize=8)
    axes[1].invert_yaxis()
    axes[1].set(xlabel="log-SNR of each denoiser call", title="per configuration (solver × steps, schedule option)")
    axes[1].grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig
