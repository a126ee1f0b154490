"""Figures of the metrics mode: the logged sample grid and the worst prompts. Prompts and labels are user text:
drawn through :func:`pipeline.core.escape.mpl_text`, never as mathtext."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.core.escape import mpl_text

PROMPT_MAX_CHARS = 80  # under a tile: longer prompts are cut, so the mosaic keeps its size


def sample_grid(images: list[torch.Tensor], prompts: list[str] | None, grid: int):
    """One mosaic image with the prompt under each tile (one axes: 64 subplots + tight_layout cost seconds)."""
    import matplotlib.pyplot as plt

    n = min(len(images), grid * grid)
    h, w = images[0].shape[1:] if n else (32, 32)
    gap_x, gap_y = max(2, w // 8), (h // 2 if prompts else max(2, h // 8))  # room for two lines of prompt
    mosaic = np.full((grid * (h + gap_y), grid * (w + gap_x), 3), 255, np.uint8)
    fig, ax = plt.subplots(figsize=(grid * 1.6, grid * 1.75))
    for i in range(n):
        r, c = divmod(i, grid)
        y, x = r * (h + gap_y), c * (w + gap_x)
        mosaic[y : y + h, x : x + w] = images[i].permute(1, 2, 0).numpy()
        if prompts:
            ax.text(
                x + w / 2,
                y + h + 0.5,
                mpl_text(str(prompts[i]).replace(" and ", "\n& "), PROMPT_MAX_CHARS),
                fontsize=4.5,
                ha="center",
                va="top",
            )
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    fig.subplots_adjust(0.01, 0.01, 0.99, 0.99)
    return fig


def worst_prompts_figure(images: list[list[torch.Tensor]], labels: list[str]):
    """One row per prompt (worst first): its samples, the prompt and its score above the row."""
    import matplotlib.pyplot as plt

    rows, cols = len(images), max((len(r) for r in images), default=1)
    h, w = images[0][0].shape[1:] if rows and images[0] else (32, 32)
    gap_y, gap_x = max(h // 3, 6), max(2, w // 8)
    mosaic = np.full((rows * (h + gap_y), cols * (w + gap_x), 3), 255, np.uint8)
    fig, ax = plt.subplots(figsize=(max(cols * 1.4, 5), rows * 1.5))
    for r, (row, label) in enumerate(zip(images, labels)):
        y = r * (h + gap_y) + gap_y
        ax.text(0, y - 1, mpl_text(label), fontsize=6, va="bottom")
        for c, img in enumerate(row):
            mosaic[y : y + h, c * (w + gap_x) : c * (w + gap_x) + w] = img.permute(1, 2, 0).numpy()
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    ax.set_title("worst prompts (lowest first) and their samples", fontsize=8)
    fig.subplots_adjust(0.01, 0.01, 0.99, 0.95)
    return fig
