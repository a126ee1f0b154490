"""Attention mode: per-token cross-attention maps from the attention probabilities, aggregated over heads,
layers and timesteps, scored against ground-truth object masks on the shapes domain.

Ground truth (shapes captions): the *prompt* says on which side an object should be; its pixels are segmented
from the *generated* image (foreground = brighter than the black background, in that half). An object word's
heat map, min-max normalised to [0, 1] and thresholded at ``threshold`` (DAAM's τ = 0.4), is compared with that
mask by IoU. Objects whose half has no foreground (the model did not draw them) are not scored and counted.
Control: in two-object captions, the IoU of each object's mask with the *other* object's shape word
(``attention/miou_swapped``) — maps that localise score well above it.

Scalars: attention/miou (shape words), attention/miou_colour (colour words), attention/miou_swapped (control),
attention/miou_<h>x<w> (shape words, one cross-attention resolution), attention/miou_ceiling_<h>x<w> (what a
perfect map at that resolution would score: the mask's share of each cell, upsampled and thresholded like the
real maps — it separates the resolution limit from the model's attention quality), attention/entropy_early,
attention/entropy_late (normalised spatial entropy of content-word maps at the first and last snapshot),
attention/bos_share, attention/num_prompts, attention/num_scored, attention/num_unscored,
attention/num_truncated. Table + plot ``attention_iou_by_threshold``: the mean IoU of shape and colour words at
τ = 0.1 … 0.9 (the row at the configured τ equals attention/miou and attention/miou_colour).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.attention import CrossAttentionCapture, cross_attention_layers
from pipeline.errors import ModeSkipped, UserError
from pipeline.generation import generators, sample, to_uint8
from pipeline.models.family import check_loaded, check_mode_support
from pipeline.registry import register_mode, stage

log = logging.getLogger(__name__)

STOP_WORDS = {"a", "an", "the", "on", "of", "and", "to", "in", "at", "with", "next", "is", "by", "its"}
FOREGROUND = 64  # uint8 brightness above which a pixel of a shapes image is object, not background
CURVE_THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))  # τ grid of the IoU-vs-threshold table and plot


@dataclass
class AttentionModeConfig:
    prompts: Optional[List[str]] = None  # overrides the dataset prompts
    prompts_file: Optional[str] = None
    num_prompts: int = 100  # from the dataset's captions when no prompts are given
    steps: List[int] = field(default_factory=lambda: [2, 8, 15, 22])  # snapshot steps (0-based, < num_inference_steps)
    threshold: float = 0.4
    height: Optional[int] = None  # default: the model's
    width: Optional[int] = None
    figures: int = 2  # prompts drawn in the overlay / breakdown figures


# families whose cross-attention the capture hooks (UNet attn2); transformer families: a later issue
FAMILIES = {"sd", "sdxl"}


def validate(cfg) -> None:
    fam = check_mode_support(cfg.model.path, "attention", None)
    if fam is not None and fam.conditioning == "text":
        check_mode_support(cfg.model.path, "attention", FAMILIES)
    a, n = cfg.mode.attention, int(cfg.sampler.num_inference_steps)
    bad = [s for s in a.steps if not 0 <= s < n]
    if bad or not a.steps:
        raise UserError(f"mode.attention.steps={list(a.steps)}: snapshot steps must be in 0..{n - 1} "
                        f"(sampler.num_inference_steps={n}); e.g. {[round(f * (n - 1)) for f in (0.1, 0.3, 0.6, 0.9)]}")
    if not 0 < a.threshold < 1:
        raise UserError(f"mode.attention.threshold={a.threshold}: expected a fraction of the map's maximum in (0, 1)")


register_mode("attention", stages=["attention"], schema=AttentionModeConfig, validate=validate)


# ----------------------------------------------------------------------------------------------- tokens
def word_tokens(tokenizer, prompt: str) -> tuple[list[str], list[list[int]], bool]:
    """Words of ``prompt`` and their token positions (position 0 is the start token); words cut off by the
    tokenizer's length limit are dropped. Returns (words, positions, truncated)."""
    max_len = int(tokenizer.model_max_length)
    n_ids = len(tokenizer(prompt, truncation=False).input_ids)
    words, positions, pos = [], [], 1
    for word in prompt.split():
        k = len(tokenizer(word, add_special_tokens=False).input_ids)
        span = list(range(pos, pos + k))
        pos += k
        if span and span[-1] < max_len - 1:  # the last slot is the end token
            words.append(word)
            positions.append(span)
    if pos + 1 != n_ids:
        log.warning("token positions of %r may be off: %d word tokens vs %d ids", prompt, pos - 1, n_ids - 2)
    return words, positions, n_ids > max_len


def word_maps(maps: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """(T, H, W) token maps -> (n_words, H, W); a word split into several tokens is their mean."""
    return torch.stack([maps[p].mean(0) for p in positions]) if positions else maps[:0]


def spatial_entropy(m: torch.Tensor) -> float:
    """Normalised spatial entropy in [0, 1] of a non-negative map (1 = uniform)."""
    p = m.clamp_min(0).flatten().double()
    p = p / p.sum().clamp_min(1e-12)
    return float(-(p * p.clamp_min(1e-30).log()).sum() / math.log(p.numel()))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def normalise(m: torch.Tensor) -> np.ndarray:
    """Min-max normalise a heat map to [0, 1] (as DAAM does before thresholding)."""
    lo, hi = m.min(), m.max()
    return ((m - lo) / (hi - lo).clamp_min(1e-12)).numpy()


def binarise(m: torch.Tensor, threshold: float) -> np.ndarray:
    """Min-max normalise a heat map to [0, 1] and threshold it (DAAM's τ)."""
    return normalise(m) >= threshold


def object_word_positions(words: list[str], objects: list[tuple[str, str, str]]) -> list[tuple[int, int] | None]:
    """Word indices (colour, shape) of each captioned object, in caption order: the first adjacent
    "<colour> <shape>" pair after the previous object's. None for an object whose words were truncated away."""
    out, start = [], 0
    lower = [w.lower().strip(".,") for w in words]
    for colour, shape, _ in objects:
        found = next((p for p in range(start, len(lower) - 1) if lower[p] == colour and lower[p + 1] == shape), None)
        out.append(None if found is None else (found, found + 1))
        if found is not None:
            start = found + 2
    return out


def ideal_map(mask: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """The best map a layer with a ``grid`` of cells can hold for ``mask``: the mask's share of each cell,
    upsampled like the real maps. Its IoU is the resolution ceiling of that layer's maps."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return _to_image(F.adaptive_avg_pool2d(m, grid)[0], size)[0]


def object_mask(image: np.ndarray, side: str) -> np.ndarray:
    """Foreground pixels of a generated shapes image (H, W, 3) in the named half."""
    fg = image.max(axis=2) > FOREGROUND
    half = np.zeros_like(fg)
    w = fg.shape[1]
    if side == "left":
        half[:, : w // 2] = True
    else:
        half[:, w // 2 :] = True
    return fg & half


# ----------------------------------------------------------------------------------------------- prompts
def _prompts(cfg) -> list[str]:
    a = cfg.mode.attention
    if a.prompts:
        return list(a.prompts)
    if a.prompts_file:
        from pipeline.data.reference import read_prompts

        return read_prompts(a.prompts_file)
    from pipeline.data.reference import reference_set

    ref = reference_set(cfg.dataset, a.num_prompts)
    if not ref.captions or any(c is None for c in ref.captions):
        raise UserError(f"dataset {cfg.dataset.name!r} has no captions: set mode.attention.prompts=[...] or prompts_file")
    return ref.captions


# ----------------------------------------------------------------------------------------------- figures
def _colour_bar(fig, image_artist, threshold: float | None) -> None:
    """One colour bar for every overlay of ``fig`` (all drawn on the same 0..1 scale), τ marked."""
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    cax = fig.add_axes((0.92, 0.15, 0.015, 0.7))
    bar = fig.colorbar(image_artist, cax=cax)
    bar.set_label("attention, min-max normalised per map" + (f" (line: τ = {threshold:g})" if threshold is not None
                                                                 else ""), fontsize=7)
    bar.ax.tick_params(labelsize=7)
    if threshold is not None:
        bar.ax.axhline(threshold, color="black", lw=1.2)


def _overlay(ax, image: np.ndarray, m: torch.Tensor):
    """The image with a word's map on top, min-max normalised (as scored) on a fixed 0..1 colour scale."""
    ax.imshow(image)
    return ax.imshow(normalise(m), cmap="jet", alpha=0.55, vmin=0.0, vmax=1.0)


def _overlay_figure(image: np.ndarray, words: list[str], snaps: dict[int, torch.Tensor], final: torch.Tensor, prompt: str,
                    threshold: float | None = None):
    import matplotlib.pyplot as plt

    cols = [*(f"step {s}" for s in sorted(snaps)), "all steps"]
    fig, axes = plt.subplots(len(words), len(cols) + 1, figsize=(1.6 * (len(cols) + 1) + 0.8, 1.6 * len(words) + 0.4),
                             squeeze=False)
    im = None
    for r, word in enumerate(words):
        axes[r, 0].imshow(image)
        axes[r, 0].set_ylabel(word, fontsize=8)
        for c, m in enumerate([*(snaps[s][r] for s in sorted(snaps)), final[r]]):
            im = _overlay(axes[r, c + 1], image, m)
            if r == 0:
                axes[r, c + 1].set_title(cols[c], fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(prompt, fontsize=9)
    _colour_bar(fig, im, threshold)
    return fig


def _resolution_figure(image: np.ndarray, words: list[str], by_res: dict[tuple[int, int], torch.Tensor], prompt: str,
                       threshold: float | None = None):
    import matplotlib.pyplot as plt

    grids = sorted(by_res, reverse=True)
    fig, axes = plt.subplots(len(grids), len(words), figsize=(1.6 * len(words) + 0.8, 1.6 * len(grids) + 0.4),
                             squeeze=False)
    im = None
    for r, g in enumerate(grids):
        for c, word in enumerate(words):
            im = _overlay(axes[r, c], image, by_res[g][c])
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(word, fontsize=8)
            if c == 0:
                axes[r, c].set_ylabel(f"{g[0]}x{g[1]}", fontsize=8)
    fig.suptitle(f"per-resolution cross-attention: {prompt}", fontsize=9)
    _colour_bar(fig, im, threshold)
    return fig


def _threshold_figure(means: dict[str, np.ndarray], threshold: float, n_objects: int):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for kind, marker in (("shape", "o"), ("colour", "s")):
        ax.plot(CURVE_THRESHOLDS, means[kind], marker=marker, label=f"{kind} words")
    ax.axvline(threshold, color="grey", linestyle="--", linewidth=1, label=f"configured τ = {threshold:g}")
    ax.set_xlabel("threshold τ on the min-max normalised map")
    ax.set_ylabel("mean IoU with the object mask")
    ax.set_ylim(0, 1)
    ax.set_title(f"IoU vs threshold ({n_objects} objects)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _to_image(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(k, h, w) latent-resolution maps -> (k, H, W) image-resolution maps (bilinear, clamped at 0)."""
    return F.interpolate(maps[None].float(), size=size, mode="bilinear", align_corners=False)[0].clamp_min(0)


# ----------------------------------------------------------------------------------------------- stage
@stage("attention", needs=("model", "sampler"))
def attention_stage(ctx, cfg):
    a = cfg.mode.attention
    model = ctx.get("model")
    if not model.text:
        raise ModeSkipped(f"{type(model.pipe).__name__} has no cross-attention (not text-conditioned: "
                          f"{model.family.conditioning}): attention mode does not apply")
    check_loaded(model.pipe, "attention", FAMILIES)
    if not cross_attention_layers(model.denoiser):
        raise ModeSkipped(f"{type(model.pipe).__name__} has no cross-attention layer: attention mode does not apply")
    prompts = _prompts(cfg)
    tok = model.tokenizer
    height, width = model.resolve_size(a.height or cfg.sampler.height, a.width or cfg.sampler.width)
    latent_hw = tuple(model.latent_shape(height, width)[1:])
    steps, guidance = int(cfg.sampler.num_inference_steps), float(cfg.sampler.guidance_scale)
    cfg_batch = model.uses_cfg(guidance)
    sampler = ctx.get("sampler")

    from pipeline.data.ground_truth import ground_truth
    from pipeline.data.shapes import parse_caption

    has_truth = ground_truth(cfg.dataset, ctx.device) is not None  # object masks: dataset=shapes only
    if not has_truth:
        reason = f"dataset {cfg.dataset.name!r} has no ground truth (object masks) to score maps with; maps only"
        log.info("attention IoU skipped: %s", reason)
        ctx.tag("skipped.attention/miou", reason)

    ious, ious_colour, ious_swapped, ent_early, ent_late, bos = [], [], [], [], [], []
    ious_res: dict[tuple[int, int], list[float]] = {}
    curves: dict[str, list[list[float]]] = {"shape": [], "colour": []}  # per object: IoU at each CURVE_THRESHOLDS
    ceiling: dict[tuple[int, int], list[float]] = {}  # the IoU a perfect map at each layer's grid would reach
    n_trunc = n_unscored = 0
    saved: dict[str, np.ndarray] = {}
    figures = 0
    batch_size = int(cfg.sampler.batch_size)
    for lo in range(0, len(prompts), batch_size):
        batch = prompts[lo : lo + batch_size]
        tokens = [word_tokens(tok, p) for p in batch]
        n_trunc += sum(t[2] for t in tokens)
        for p, t in zip(batch, tokens):
            if t[2]:
                log.warning("prompt longer than the tokenizer's %d tokens, truncated: %r", tok.model_max_length, p)
        gens = generators(cfg.seed, range(lo, lo + len(batch)))
        cond = model.condition(len(batch), guidance, height, width, prompts=batch)
        with CrossAttentionCapture(model.denoiser, latent_hw, set(a.steps), cfg_batch=cfg_batch) as cap:
            out = sample(model, sampler, cond, gens, steps, height, width, eta=float(cfg.sampler.eta))
        if cap.max_row_sum_error > 1e-3:
            raise RuntimeError(f"attention probabilities do not sum to 1 over tokens (error {cap.max_row_sum_error:.2e})")
        images = to_uint8(out.float().nan_to_num().clamp(0, 1)).permute(0, 2, 3, 1).numpy()
        agg = cap.aggregate()  # (n, T, h, w)
        by_res_all = cap.by_resolution()
        for i, prompt in enumerate(batch):
            words, positions, _ = tokens[i]
            bos.append(float(agg[i, 0].mean()))
            final = _to_image(word_maps(agg[i], positions), (height, width))
            content = [k for k, w in enumerate(words) if w.lower().strip(".,") not in STOP_WORDS]
            snaps = {s: word_maps(cap.snapshots[s][i], positions) for s in sorted(cap.snapshots)}
            if snaps and content:
                first, last = snaps[min(snaps)], snaps[max(snaps)]
                ent_early.append(np.mean([spatial_entropy(first[k]) for k in content]))
                ent_late.append(np.mean([spatial_entropy(last[k]) for k in content]))
            saved[f"maps_{lo + i:04d}"] = final.numpy().astype(np.float16)
            saved[f"words_{lo + i:04d}"] = np.array(words)
            saved[f"image_{lo + i:04d}"] = images[i]
            try:
                objects = parse_caption(prompt) if has_truth else []
            except ValueError:
                objects = []  # not a shapes caption: maps only, no ground truth
            res_maps = {g: _to_image(word_maps(m[i], positions), (height, width)) for g, m in by_res_all.items()}
            slots = object_word_positions(words, objects)  # (colour index, shape index) per object, or None
            for k, (colour, shape, side) in enumerate(objects):
                mask = object_mask(images[i], side)
                if mask.sum() < 4:
                    n_unscored += 1
                    continue
                if slots[k] is None:
                    n_unscored += 1  # truncated away: the words are not in the tokens
                    continue
                c_idx, s_idx = slots[k]
                for kind, idx, scores in (("shape", s_idx, ious), ("colour", c_idx, ious_colour)):
                    norm = normalise(final[idx])  # once per word: the headline τ and the τ curve
                    scores.append(iou(norm >= a.threshold, mask))
                    curves[kind].append([iou(norm >= t, mask) for t in CURVE_THRESHOLDS])
                for g, rm in res_maps.items():
                    ious_res.setdefault(g, []).append(iou(binarise(rm[s_idx], a.threshold), mask))
                    ceiling.setdefault(g, []).append(iou(binarise(ideal_map(mask, g, (height, width)), a.threshold), mask))
                if len(objects) == 2 and slots[1 - k] is not None:  # control: the other object's shape word
                    ious_swapped.append(iou(binarise(final[slots[1 - k][1]], a.threshold), mask))
            if figures < a.figures and content:
                snaps_img = {s: _to_image(v[content], (height, width)) for s, v in snaps.items()}
                ctx.save_figure(_overlay_figure(images[i], [words[k] for k in content], snaps_img, final[content], prompt,
                                                a.threshold), f"attention_overlay_{figures}")
                by_res = {g: m[content] for g, m in res_maps.items()}  # already at image size
                ctx.save_figure(_resolution_figure(images[i], [words[k] for k in content], by_res, prompt, a.threshold),
                                f"attention_resolutions_{figures}")
                figures += 1

    if curves["shape"]:
        # how much of the score is the choice of τ: mean IoU of shape and colour words at each threshold
        means = {kind: np.mean(v, axis=0) for kind, v in curves.items()}
        ctx.save_table([{"threshold": t, "miou_shape": float(means["shape"][j]), "miou_colour": float(means["colour"][j])}
                        for j, t in enumerate(CURVE_THRESHOLDS)], "attention_iou_by_threshold")
        ctx.save_figure(_threshold_figure(means, a.threshold, len(curves["shape"])), "attention_iou_by_threshold")

    path = ctx.run_dir / "tables" / "attention_maps.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, prompts=np.array(prompts), **saved)
    if ctx.tracker is not None:
        ctx.tracker.log_artifact(path, "tables")
    scalars = {"attention/num_prompts": len(prompts), "attention/num_truncated": n_trunc,
               "attention/bos_share": float(np.mean(bos)), "attention/num_scored": len(ious),
               "attention/num_unscored": n_unscored}
    if ent_early:
        scalars["attention/entropy_early"] = float(np.mean(ent_early))
        scalars["attention/entropy_late"] = float(np.mean(ent_late))
    if ious:
        scalars["attention/miou"] = float(np.mean(ious))
    if ious_colour:
        scalars["attention/miou_colour"] = float(np.mean(ious_colour))
    if ious_swapped:
        scalars["attention/miou_swapped"] = float(np.mean(ious_swapped))
    for g, vals in sorted(ious_res.items(), reverse=True):
        scalars[f"attention/miou_{g[0]}x{g[1]}"] = float(np.mean(vals))
        scalars[f"attention/miou_ceiling_{g[0]}x{g[1]}"] = float(np.mean(ceiling[g]))
    ctx.log_scalars(scalars)
    log.info("attention: %s", {k: round(v, 4) for k, v in scalars.items()})
    return {}
