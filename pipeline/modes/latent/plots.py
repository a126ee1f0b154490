"""Figures of the latent mode: round trips, interpolation rows, direction grid, OOD score histograms. Titles and
row labels hold user text (prompts, dataset names): drawn through :func:`pipeline.core.escape.mpl_text`, so a title here
is never mathtext."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.core.escape import mpl_label, mpl_text

__all__ = ["round_trip_figure", "interpolation_figure", "direction_figure", "robust_bins", "ood_histogram"]


def round_trip_figure(shown, psnr, title: str):
    """Inputs (top row) over their round trips (bottom row, PSNR in dB)."""
    import matplotlib.pyplot as plt

    k = min(8, len(shown[0]))
    fig, axes = plt.subplots(2, k, figsize=(1.3 * k, 2.8), squeeze=False)
    for i in range(k):
        _show(axes[0, i], shown[0][i], "input" if i == 0 else None)
        _show(axes[1, i], shown[1][i], f"{float(psnr[i]):.1f} dB")
    fig.suptitle(mpl_text(title), fontsize=8)
    return fig


def _show(ax, img: torch.Tensor, title: str | None = None) -> None:
    ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def interpolation_figure(rows: list[torch.Tensor], labels: list[str], ts: torch.Tensor, title: str):
    """One row of K images per path (noise / real endpoints, slerp / lerp)."""
    import matplotlib.pyplot as plt

    K = len(ts)
    fig, axes = plt.subplots(len(rows), K, figsize=(1.2 * K, 1.3 * len(rows) + 0.3), squeeze=False)
    for r, (row, label) in enumerate(zip(rows, labels)):
        for c in range(K):
            _show(axes[r, c], row[c], f"t={float(ts[c]):.2f}" if r == 0 else None)
        axes[r, 0].set_ylabel(mpl_text(label), fontsize=7)
    fig.suptitle(mpl_text(title), fontsize=8)
    return fig


def direction_figure(images: dict[float, torch.Tensor], labels: list[str], per_label: int, title: str):
    """Rows: base prompts (or classes); columns: scales; the first sample of each."""
    import matplotlib.pyplot as plt

    scales = sorted(images)
    fig, axes = plt.subplots(
        len(labels), len(scales), figsize=(1.3 * len(scales), 1.35 * len(labels) + 0.4), squeeze=False
    )
    for r, p in enumerate(labels):
        for c, s in enumerate(scales):
            _show(axes[r, c], images[s][r * per_label], f"s={s:g}" if r == 0 else None)
        axes[r, 0].set_ylabel(mpl_text(str(p).replace(" on the ", "\n")), fontsize=6)
    fig.suptitle(mpl_text(title), fontsize=7)
    return fig


def robust_bins(values: list[np.ndarray], n: int = 40, q: float = 1.0) -> np.ndarray:
    """Histogram bin edges over the ``q``-th to ``100 - q``-th percentile of ``values`` (the held-out and OOD
    scores), so neither a stray score nor the far-off noise set stretches the axis; scores outside are piled into
    the edge bins by the caller."""
    lo, hi = np.percentile(np.concatenate([np.asarray(v, dtype=np.float64) for v in values]), [q, 100 - q])
    hi = hi if hi > lo else lo + 1
    pad = 0.05 * (hi - lo)
    return np.linspace(lo - pad, hi + pad, n)


def ood_histogram(scores: dict, names: list[str], ood_name: str):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
    axes = axes[0]  # one score too: a row of axes, not a bare Axes
    labels = {"id": "held-out reference", "ood": ood_name, "noise": "uniform noise"}  # ood_name: a config string
    for ax, s in zip(axes, names):
        vals = {k: v[s].numpy() for k, v in scores.items() if k != "fit"}
        # bins over the robust range of held-out + OOD; anything outside (a stray score, the far-off noise set) is
        # piled into the edge bins and labelled "clipped"
        bins = robust_bins([vals["id"], vals["ood"]])
        tallest = {}
        for k, v in vals.items():
            clipped = bool(((v > bins[-1]) | (v < bins[0])).any())
            counts, _, _ = ax.hist(
                np.clip(v, bins[0], bins[-1] - 1e-9),
                bins=bins,
                alpha=0.5,
                label=mpl_label(labels[k]) + (" (clipped)" if clipped else ""),
            )
            tallest[k] = float(np.max(counts))
        # one noise bin holding every noise sample would flatten the other two: log counts then
        if tallest.get("noise", 0) > 3 * max(tallest["id"], tallest["ood"], 1):
            ax.set_yscale("log")
            ax.set_ylabel("count (log)", fontsize=8)
        ax.set_title(mpl_text(s), fontsize=9)
        ax.set_xlabel("score (higher = more OOD)", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
