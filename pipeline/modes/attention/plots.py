"""Figures of the attention mode: overlays per word over snapshot steps, per-resolution breakdown, IoU vs τ.
Every overlay is drawn min-max normalised (as scored) on one fixed 0..1 colour scale. Prompts and their words are
user text: drawn through :func:`pipeline.core.escape.mpl_text`, never as mathtext."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.core.escape import mpl_text
from pipeline.modes.attention.scoring import CURVE_THRESHOLDS, normalise

__all__ = ["layer_step_figure", "overlay_figure", "resolution_figure", "threshold_figure"]


def _colour_bar(fig, image_artist, threshold: float | None) -> None:
    """One colour bar for every overlay of ``fig`` (all drawn on the same 0..1 scale), τ marked."""
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    cax = fig.add_axes((0.92, 0.15, 0.015, 0.7))
    bar = fig.colorbar(image_artist, cax=cax)
    bar.set_label(
        "attention, min-max normalised per map" + (f" (line: τ = {threshold:g})" if threshold is not None else ""),
        fontsize=7,
    )
    bar.ax.tick_params(labelsize=7)
    if threshold is not None:
        bar.ax.axhline(threshold, color="black", lw=1.2)


def _overlay(ax, image: np.ndarray, m: torch.Tensor):
    ax.imshow(image)
    return ax.imshow(normalise(m), cmap="jet", alpha=0.55, vmin=0.0, vmax=1.0)


def overlay_figure(
    image: np.ndarray,
    words: list[str],
    snaps: dict[int, torch.Tensor],
    final: torch.Tensor,
    prompt: str,
    threshold: float | None = None,
):
    """Rows: words; columns: the image, each snapshot (solver step), all steps. Maps at image resolution."""
    import matplotlib.pyplot as plt

    cols = [*(f"step {s}" for s in sorted(snaps)), "all steps"]
    fig, axes = plt.subplots(
        len(words), len(cols) + 1, figsize=(1.6 * (len(cols) + 1) + 0.8, 1.6 * len(words) + 0.4), squeeze=False
    )
    im = None
    for r, word in enumerate(words):
        axes[r, 0].imshow(image)
        axes[r, 0].set_ylabel(mpl_text(word), fontsize=8)
        for c, m in enumerate([*(snaps[s][r] for s in sorted(snaps)), final[r]]):
            im = _overlay(axes[r, c + 1], image, m)
            if r == 0:
                axes[r, c + 1].set_title(cols[c], fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(mpl_text(prompt), fontsize=9)
    _colour_bar(fig, im, threshold)
    return fig


def resolution_figure(
    image: np.ndarray,
    words: list[str],
    by_res: dict[tuple[int, int], torch.Tensor],
    prompt: str,
    threshold: float | None = None,
):
    """Rows: token grids (finest first); columns: words."""
    import matplotlib.pyplot as plt

    grids = sorted(by_res, reverse=True)
    fig, axes = plt.subplots(
        len(grids), len(words), figsize=(1.6 * len(words) + 0.8, 1.6 * len(grids) + 0.4), squeeze=False
    )
    im = None
    for r, g in enumerate(grids):
        for c, word in enumerate(words):
            im = _overlay(axes[r, c], image, by_res[g][c])
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(mpl_text(word), fontsize=8)
            if c == 0:
                axes[r, c].set_ylabel(f"{g[0]}x{g[1]}", fontsize=8)
    fig.suptitle(f"attention per token grid: {mpl_text(prompt)}", fontsize=9)
    _colour_bar(fig, im, threshold)
    return fig


def threshold_figure(means: dict[str, np.ndarray], threshold: float, n_objects: int):
    """Mean IoU of each word kind at τ = 0.1 … 0.9, the configured τ marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for kind, marker in zip(means, "os^"):
        ax.plot(CURVE_THRESHOLDS, means[kind], marker=marker, label=f"{mpl_text(kind)} words")
    ax.axvline(threshold, color="grey", linestyle="--", linewidth=1, label=f"configured τ = {threshold:g}")
    ax.set_xlabel("threshold τ on the min-max normalised map")
    ax.set_ylabel("mean IoU with the object mask")
    ax.set_ylim(0, 1)
    ax.set_title(f"IoU vs threshold ({n_objects} objects)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def layer_step_figure(grids: dict[str, np.ndarray], layers: list[int], steps: list[int]):
    """One heatmap per quantity (rows: recorded layers in forward order; columns: solver steps), each on 0..1."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1,
        len(grids),
        figsize=(0.25 * len(steps) * len(grids) + 2.5 * len(grids), 0.22 * len(layers) + 2),
        squeeze=False,
    )
    for ax, (title, grid) in zip(axes[0], grids.items()):
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, origin="upper")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("solver step", fontsize=8)
        ax.set_ylabel("layer (forward order)", fontsize=8)
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=6)
        ax.set_yticks(range(len(layers)), [str(la) for la in layers], fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    fig.suptitle("where the maps localise: layer x solver step", fontsize=9)
    fig.tight_layout()
    return fig
