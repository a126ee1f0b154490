"""The attention mode's stage: per-word text→image attention maps of every text-to-image family (SD 1.x/2.x,
SDXL and PixArt cross-attention; SD3 and Flux joint attention — see :mod:`pipeline.modes.attention.capture`), aggregated
over heads, layers and solver steps, and scored against object masks where the dataset has them.

Generated images (``attention/miou*``): DAAM's protocol — a word's map, min-max normalised to [0, 1] and
thresholded at ``threshold`` (τ = 0.4), is compared by IoU with the object's mask. The dataset's ground truth
(:func:`pipeline.data.ground_truth.object_masks`) says which words name which object and segments it: on shapes,
the prompt gives the side and the object's pixels are the bright ones in that half of the *generated* image;
objects the model did not draw are not scored and counted. Control: in two-object captions, each mask against
the *other* object's head word (``attention/miou_swapped``) — maps that localise score well above it.

Reference images (``attention/miou_reference``): DAAM's real-image protocol — each reference image with masks is
encoded, noised to ``t`` (a fraction of the training schedule: DDPM timestep ``t·T``, flow σ = t) with its own
seed, denoised one step with its caption while capturing, and the head word's map scored against its mask.

Scalars: attention/miou (head words: the shape), attention/miou_colour (the word before it: the colour),
attention/miou_swapped, attention/miou_<h>x<w> and attention/miou_ceiling_<h>x<w> (one token grid; the IoU a
perfect map at that grid would reach), attention/miou_reference, attention/entropy_early / entropy_late
(normalised spatial entropy of content-word maps at the first and last snapshot *solver* step),
attention/bos_share (the start token's mean share; CLIP segments only), attention/text_share (joint attention:
the softmax mass on text keys), attention/num_prompts, num_scored, num_unscored, num_truncated,
num_reference_scored. Table + plot ``attention_iou_by_threshold``. ``tables/attention_maps.npz``: per prompt the
word maps at *latent* resolution (float16; upsample for display), the words and the image.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pipeline.core.registry import stage
from pipeline.data.ground_truth import no_object_masks, no_segmentation, object_masks, object_word_positions
from pipeline.data.reference import read_prompts
from pipeline.errors import UserError
from pipeline.metrics.intervals import bootstrap_interval
from pipeline.models.generation import denoiser_call_steps, generators, sample, to_uint8
from pipeline.models.tokens import word_maps
from pipeline.modes.attention.capture import capture
from pipeline.modes.attention.mode import refuse_untexted
from pipeline.modes.attention.plots import layer_step_figure, overlay_figure, resolution_figure, threshold_figure
from pipeline.modes.attention.scoring import (
    CURVE_THRESHOLDS,
    binarise,
    ideal_map,
    iou,
    normalise,
    segmentation_scores,
    spatial_entropy,
    to_image,
)

log = logging.getLogger(__name__)

STOP_WORDS = {"a", "an", "the", "on", "of", "and", "to", "in", "at", "with", "next", "is", "by", "its"}
ROW_SUM_TOLERANCE = 1e-3  # float32 probabilities: |Σ p − 1| is ~1e-6 whatever the model dtype
MAX_CONCEPTS = 32  # default concepts taken from the prompts' words (configured ones are all kept)


# ----------------------------------------------------------------------------------------------- prompts
def _prompts(ctx, cfg) -> list[str]:
    a = cfg.mode.attention
    if a.prompts:
        return list(a.prompts)
    if a.prompts_file:
        return read_prompts(a.prompts_file)
    ref = ctx.get("reference").first(a.num_prompts)
    if ref.num_bad_caption_lines:
        ctx.tag("attention.num_bad_caption_lines", ref.num_bad_caption_lines)
    if not ref.captions or any(c is None for c in ref.captions):
        raise UserError(
            f"dataset {cfg.dataset.name!r} has no captions: set mode.attention.prompts=[...] or prompts_file"
        )
    return ref.captions


class _NpzWriter:
    """``np.savez_compressed`` written one array at a time, so a run holds no prompt's maps or image after its batch
    (``np.load`` reads the file as usual). Written to ``<name>.partial`` and renamed when complete."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_suffix(path.suffix + ".partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.zf = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_DEFLATED)

    def add(self, name: str, array: np.ndarray) -> None:
        with self.zf.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)

    def close(self) -> Path:
        self.zf.close()
        self.tmp.replace(self.path)
        return self.path


class _Scores:
    """IoU accumulators of the generated images."""

    def __init__(self):
        self.head, self.modifier, self.swapped = [], [], []
        self.by_grid: dict[tuple[int, int], list[float]] = {}
        self.ceiling: dict[tuple[int, int], list[float]] = {}
        self.curves: dict[str, list[list[float]]] = {"shape": [], "colour": []}  # per object: IoU at each τ
        self.output: list[float] = []  # output-space concept map of the object's head noun (ConceptAttention)
        self.unscored = 0


def _score_generated(
    scores: _Scores,
    truth,
    image: np.ndarray,
    prompt: str,
    words: list[str],
    final: torch.Tensor,
    res_maps: dict,
    threshold: float,
    concept_maps: dict[str, torch.Tensor] | None = None,
) -> None:
    """Score one generated image's word maps (image resolution) against its objects' masks; ``concept_maps``
    ({concept: map at image resolution}, output space) are scored by each object's head noun."""
    objects = truth.objects(prompt) or []
    slots = object_word_positions(words, objects)
    size = image.shape[:2]
    for k, obj in enumerate(objects):
        mask = truth.generated_mask(image, obj)
        if mask.sum() < 4 or slots[k] is None:  # not drawn, or its words truncated away
            scores.unscored += 1
            continue
        head = slots[k][-1]
        noun = _concept_key(obj.words[-1])
        if concept_maps and noun in concept_maps:
            scores.output.append(iou(normalise(concept_maps[noun]) >= threshold, mask))
        norm = normalise(final[head])  # once per word: the headline τ and the τ curve
        scores.head.append(iou(norm >= threshold, mask))
        scores.curves["shape"].append([iou(norm >= t, mask) for t in CURVE_THRESHOLDS])
        if len(slots[k]) >= 2:
            norm_mod = normalise(final[slots[k][-2]])
            scores.modifier.append(iou(norm_mod >= threshold, mask))
            scores.curves["colour"].append([iou(norm_mod >= t, mask) for t in CURVE_THRESHOLDS])
        for g, rm in res_maps.items():
            scores.by_grid.setdefault(g, []).append(iou(binarise(rm[head], threshold), mask))
            scores.ceiling.setdefault(g, []).append(iou(binarise(ideal_map(mask, g, size), threshold), mask))
        if len(objects) == 2 and slots[1 - k] is not None:  # control: the other object's head word
            scores.swapped.append(iou(binarise(final[slots[1 - k][-1]], threshold), mask))


def _reference_scores(ctx, cfg, model, layout, height: int, width: int, truth, concepts=None) -> dict[str, float]:
    """DAAM's real-image protocol on the dataset's reference images with masks (see the module docstring)."""
    a = cfg.mode.attention
    rows = truth.reference(int(a.num_reference))
    if getattr(truth, "num_bad_lines", 0):  # objects.jsonl lines refused (bad JSON, paths outside the folder)
        ctx.tag("attention.num_bad_object_lines", truth.num_bad_lines)
    if not rows:
        ctx.tag(
            "skipped.attention/miou_reference", f"dataset {cfg.dataset.name!r}: no readable reference image with masks"
        )
        return {}
    sched = type(ctx.get("sampler")).from_config(ctx.get("sampler").config)
    model.set_timesteps(sched, int(cfg.sampler.num_inference_steps), height, width)
    target = float(a.t) * float(sched.config.num_train_timesteps)
    t = sched.timesteps[int((sched.timesteps.float() - target).abs().argmin())]
    guidance = float(cfg.sampler.guidance_scale)
    ious, ious_out, bs = [], [], int(cfg.sampler.batch_size)
    seg: dict[str, list[tuple[float, float, float]]] = {"probs": [], "output": []}  # per object: acc, mIoU, AP
    for lo in range(0, len(rows), bs):
        batch = rows[lo : lo + bs]
        pixels = np.stack([np.asarray(Image.fromarray(r.image).resize((width, height), Image.BICUBIC)) for r in batch])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        captions = [r.caption for r in batch]
        toks = [layout.tokens(c) for c in captions]
        cond = model.condition(len(batch), guidance, height, width, prompts=captions)
        z = model.encode(x)
        xt = model.add_noise(sched, z, generators(cfg.seed, range(lo, lo + len(batch))), t)
        with (
            torch.no_grad(),
            capture(
                model, height, width, cfg=cond.cfg, valid_tokens=[k.num_tokens for k in toks], concepts=concepts
            ) as cap,
        ):
            model.denoise(xt, t, cond, sched)
        agg = cap.aggregate()
        out_maps = cap.aggregate("output") if concepts else None
        for i, row in enumerate(batch):
            slots = object_word_positions(toks[i].words, row.objects)
            for obj, slot in zip(row.objects, slots):
                if slot is None or obj.mask.sum() < 4:
                    continue
                m = to_image(word_maps(agg[i], [toks[i].positions[slot[-1]]]), obj.mask.shape)[0]
                ious.append(iou(binarise(m, a.threshold), obj.mask))
                seg["probs"].append(segmentation_scores(m, obj.mask))
                noun = _concept_key(obj.words[-1])
                if out_maps is not None and noun in concepts:
                    m = to_image(out_maps[i, concepts.index(noun)][None], obj.mask.shape)[0]
                    ious_out.append(iou(binarise(m, a.threshold), obj.mask))
                    seg["output"].append(segmentation_scores(m, obj.mask))
    out = {"attention/num_reference_scored": len(ious)}
    if ious:
        out["attention/miou_reference"] = float(np.mean(ious))
    else:
        ctx.tag("skipped.attention/miou_reference", "no reference object's words were found in its caption")
    if ious_out:
        out["attention/miou_reference_output"] = float(np.mean(ious_out))
    out.update(_segmentation_scalars(seg))
    log.info("attention on %d reference images (t = %s): %d objects scored", len(rows), int(t), len(ious))
    return out


def _concept_key(word: str) -> str:
    return word.lower().strip(".,;:!?\"'")


def _concepts(ctx, cfg, model, layout, prompts: list[str], truth) -> list[str] | None:
    """The output-space maps' concepts (None: off, with a ``skipped.attention/miou_output`` tag saying why): the
    configured words, else the head nouns of the ground truth's objects over every prompt of the run, else the
    prompts' content words (the first ``MAX_CONCEPTS`` seen). One list for the whole run, so maps do not depend on
    the batch size."""
    a = cfg.mode.attention
    if "output" not in a.maps:
        return None
    if layout.concepts is None:
        reason = (
            f"{type(model.pipe).__name__} ({model.family.name}): output-space concept maps need joint attention with a "
            "separate text stream (ConceptAttention); this family has none"
        )
        if list(a.maps) == ["output"]:
            raise UserError(f"mode.attention.maps=[output]: {reason}; use maps=[probs]")
        ctx.tag("skipped.attention/miou_output", reason)
        return None
    if a.concepts:
        return list(dict.fromkeys(_concept_key(c) for c in a.concepts))
    seen: dict[str, None] = {}
    for p in prompts:
        objects = truth.objects(p) if truth is not None else None
        words = (
            [o.words[-1] for o in objects] if objects else [w for w in p.split() if _concept_key(w) not in STOP_WORDS]
        )
        seen.update((_concept_key(w), None) for w in words if _concept_key(w))
    concepts = list(seen)
    if len(concepts) > MAX_CONCEPTS:
        ctx.tag("attention.concepts_dropped", len(concepts) - MAX_CONCEPTS)
        concepts = concepts[:MAX_CONCEPTS]
    ctx.tag("attention.concepts", " ".join(concepts)[:500])
    return concepts or None


def _segmentation_scalars(seg: dict[str, list[tuple[float, float, float]]]) -> dict[str, float]:
    """Zero-shot segmentation on the reference images: pixel accuracy, mIoU (foreground/background) and mAP over
    objects (:func:`~pipeline.modes.attention.scoring.segmentation_scores`: mean-value threshold), each with a 95 %
    percentile-bootstrap interval over objects (B = 200)."""
    out = {}
    for kind, rows in seg.items():
        suffix = "" if kind == "probs" else "_output"
        for j, name in enumerate(("seg_accuracy", "seg_miou", "seg_map")):
            vals = [r[j] for r in rows if np.isfinite(r[j])]
            if not vals:
                continue
            key = f"attention/{name}{suffix}"
            out[key] = float(np.mean(vals))
            if len(vals) >= 2:
                out[key + "_ci_low"], out[key + "_ci_high"] = bootstrap_interval(vals)
    return out


# ----------------------------------------------------------------------------------------------- stage
@dataclass
class _Setup:
    """What every batch of the attention stage shares."""

    model: Any
    sampler: Any
    layout: Any
    height: int
    width: int
    steps: int
    guidance: float
    call_steps: Any
    truth: Any  # the dataset's object masks, or None
    scored: bool  # generated images are segmented and scored
    concepts: list[str] | None = None  # output-space concept maps (None: off)


@dataclass
class _Tally:
    """Everything the stage accumulates over the prompts besides the IoUs."""

    scores: _Scores = field(default_factory=_Scores)
    ent_early: list = field(default_factory=list)
    ent_late: list = field(default_factory=list)
    bos: list = field(default_factory=list)
    share: list = field(default_factory=list)
    n_trunc: int = 0
    figures: int = 0
    # (kind, layer index, step) -> IoUs of head words (probs) / head-noun concepts (output); text share per cell
    cells: dict = field(default_factory=dict)
    cell_share: dict = field(default_factory=dict)


@stage("attention", needs=("model", "sampler", "reference"))
def attention_stage(ctx, cfg):
    setup = _setup(ctx, cfg)
    prompts = _prompts(ctx, cfg)
    setup.concepts = _concepts(ctx, cfg, setup.model, setup.layout, prompts, setup.truth)
    tally = _Tally()
    npz = _maps_file(ctx, setup, prompts)
    _add_concepts(npz, setup.concepts)
    bar = tqdm(total=len(prompts), desc="attention", unit="prompt", dynamic_ncols=True)
    batch_size = int(cfg.sampler.batch_size)
    for lo in range(0, len(prompts), batch_size):
        _attend_batch(ctx, cfg, setup, prompts[lo : lo + batch_size], lo, tally, npz)
        bar.update(len(prompts[lo : lo + batch_size]))
    bar.close()
    _threshold_outputs(ctx, cfg, tally.scores)
    path = npz.close()
    if ctx.tracker is not None:
        ctx.tracker.log_artifact(path, "tables")
    scalars = _scalars(ctx, setup, prompts, tally)
    scalars.update(_layer_step_outputs(ctx, setup, tally))
    scalars.update(_reference_part(ctx, cfg, setup))
    ctx.log_scalars(scalars)
    log.info("attention: %s", {k: round(v, 4) for k, v in scalars.items()})
    return {}


def _setup(ctx, cfg) -> _Setup:
    """The model's size, attention layout and solver steps, and whether the dataset segments generated images (a
    ``skipped.attention/miou`` tag when not)."""
    a = cfg.mode.attention
    model = ctx.get("model")
    if not model.text:
        refuse_untexted(type(model.pipe).__name__, model.family)
    height, width = model.resolve_size(a.height or cfg.sampler.height, a.width or cfg.sampler.width)
    steps = int(cfg.sampler.num_inference_steps)
    sampler = ctx.get("sampler")
    truth = object_masks(cfg.dataset)
    scored = truth is not None and truth.segments_generated
    if not scored:
        reason = no_segmentation(cfg.dataset) + "; maps, entropy and shares only"
        log.info("attention IoU on generated images skipped: %s", reason)
        ctx.tag("skipped.attention/miou", reason)
    layout = model.attention_layout(height, width)
    if a.layers is not None and a.layers[1] > len(layout.layers):
        raise UserError(
            f"mode.attention.layers={list(a.layers)}: {type(model.pipe).__name__} has {len(layout.layers)} recorded "
            f"attention layers; expected [start, stop) with stop <= {len(layout.layers)}"
        )
    return _Setup(
        model,
        sampler,
        layout,
        height,
        width,
        steps,
        float(cfg.sampler.guidance_scale),
        denoiser_call_steps(model, sampler, steps, height, width),
        truth,
        scored,
    )


def _maps_file(ctx, setup: _Setup, prompts: list[str]) -> _NpzWriter:
    npz = _NpzWriter(ctx.run_dir / "tables" / "attention_maps.npz")
    npz.add("prompts", np.array(prompts))
    npz.add("latent_hw", np.array(setup.model.latent_shape(setup.height, setup.width)[1:]))
    npz.add("image_hw", np.array([setup.height, setup.width]))
    return npz


def _add_concepts(npz: _NpzWriter, concepts: list[str] | None) -> None:
    if concepts:
        npz.add("concepts", np.array(concepts))


def _attend_batch(ctx, cfg, setup: _Setup, batch: list[str], lo: int, tally: _Tally, npz: _NpzWriter) -> None:
    """Generate one batch of prompts while capturing attention, then score, store and plot each prompt's maps."""
    a, s = cfg.mode.attention, setup
    toks = [s.layout.tokens(p) for p in batch]
    for p, t in zip(batch, toks):
        if t.truncated:
            tally.n_trunc += 1
            log.warning(
                "prompt longer than the %s segment's %d tokens, truncated: %r",
                s.layout.segment_name,
                s.layout.max_length,
                p,
            )
    gens = generators(cfg.seed, range(lo, lo + len(batch)))
    cond = s.model.condition(len(batch), s.guidance, s.height, s.width, prompts=batch)
    heads = [_head_tokens(s.truth, p, t) for p, t in zip(batch, toks)] if s.scored else None
    with capture(
        s.model,
        s.height,
        s.width,
        a.steps,
        s.call_steps,
        cfg=s.model.uses_cfg(s.guidance),
        valid_tokens=[t.num_tokens for t in toks],
        concepts=s.concepts,
        keep=None if heads is None else [[j for _, pos in h for j in pos] for h in heads],
        layers=a.layers,
        steps=a.step_range,
    ) as cap:
        out = sample(s.model, s.sampler, cond, gens, s.steps, s.height, s.width, eta=float(cfg.sampler.eta))
    if cap.max_row_sum_error > ROW_SUM_TOLERANCE:
        raise RuntimeError(f"attention probabilities do not sum to 1 over keys (error {cap.max_row_sum_error:.2e})")
    images = to_uint8(out.float().nan_to_num().clamp(0, 1)).permute(0, 2, 3, 1).cpu().numpy()
    maps = {
        "agg": cap.aggregate(),
        "by_res": cap.by_resolution(),
        "snapshots": cap.snapshots(),
        "text_share": cap.text_share(),
        "output": cap.aggregate("output") if s.concepts else None,
        "output_snapshots": cap.snapshots("output") if s.concepts else {},
    }
    for i, prompt in enumerate(batch):
        _one_prompt(ctx, a, s, tally, npz, prompt, toks[i], images[i], maps, i, lo + i)
    if heads is not None:
        _score_layer_steps(s, tally, cap, batch, images, heads, a.threshold)


def _one_prompt(
    ctx,
    a,
    s: _Setup,
    tally: _Tally,
    npz: _NpzWriter,
    prompt: str,
    tok,
    image: np.ndarray,
    maps: dict,
    i: int,
    index: int,
) -> None:
    """Prompt ``i`` of its batch (``index`` of the run): shares, entropies, the npz entries, its IoUs (when scored)
    and its figures."""
    agg, by_res, snapshots, text_share = maps["agg"], maps["by_res"], maps["snapshots"], maps["text_share"]
    words, positions = tok.words, tok.positions
    if tok.start_token:
        tally.bos.append(float(agg[i, 0].mean()))
    if text_share is not None:
        tally.share.append(float(text_share[i]))
    latent = word_maps(agg[i], positions)  # (n_words, h, w) at latent resolution
    content = [k for k, w in enumerate(words) if w.lower().strip(".,") not in STOP_WORDS]
    snaps = {t: word_maps(m[i], positions) for t, m in snapshots.items()}
    if snaps and content:
        first, last = snaps[min(snaps)], snaps[max(snaps)]
        tally.ent_early.append(np.mean([spatial_entropy(first[k]) for k in content]))
        tally.ent_late.append(np.mean([spatial_entropy(last[k]) for k in content]))
    npz.add(f"maps_{index:04d}", latent.numpy().astype(np.float16))
    npz.add(f"words_{index:04d}", np.array(words))
    npz.add(f"image_{index:04d}", image)
    wanted = s.scored or tally.figures < a.figures
    size = (s.height, s.width)
    final = to_image(latent, size) if wanted else None
    res_maps = {g: to_image(word_maps(m[i], positions), size) for g, m in by_res.items()} if wanted else {}
    concept_img = None
    if maps["output"] is not None:
        npz.add(f"output_{index:04d}", maps["output"][i].numpy().astype(np.float16))
        concept_img = to_image(maps["output"][i], size) if wanted else None
    if s.scored:
        by_concept = dict(zip(s.concepts, concept_img)) if concept_img is not None else None
        _score_generated(tally.scores, s.truth, image, prompt, words, final, res_maps, a.threshold, by_concept)
    if tally.figures < a.figures and content:
        snaps_img = {t: to_image(v[content], size) for t, v in snaps.items()}
        names = [words[k] for k in content]
        ctx.save_figure(
            overlay_figure(image, names, snaps_img, final[content], prompt, a.threshold),
            f"attention_overlay_{tally.figures}",
        )
        ctx.save_figure(
            resolution_figure(image, names, {g: m[content] for g, m in res_maps.items()}, prompt, a.threshold),
            f"attention_resolutions_{tally.figures}",
        )
        if concept_img is not None:  # output space: every concept, over the same snapshot steps
            snaps_out = {t: to_image(m[i], size) for t, m in maps["output_snapshots"].items()}
            ctx.save_figure(
                overlay_figure(image, s.concepts, snaps_out, concept_img, f"{prompt} (output space)", a.threshold),
                f"attention_concepts_{tally.figures}",
            )
        tally.figures += 1


def _head_tokens(truth, prompt: str, tok) -> list[tuple[int, list[int]]]:
    """(object index, token positions of its head word) for each object of ``prompt`` whose words were found."""
    objects = truth.objects(prompt) or []
    slots = object_word_positions(tok.words, objects)
    return [(k, tok.positions[slot[-1]]) for k, slot in enumerate(slots) if slot is not None]


def _score_layer_steps(s: _Setup, tally: _Tally, cap, batch, images, heads, threshold: float) -> None:
    """IoU of every (layer, solver step) map of each scored object's head word (probs) and head noun (output)."""
    index = {name: i for i, name in enumerate(s.layout.layers)}
    size = (s.height, s.width)
    masks = []
    for i, prompt in enumerate(batch):
        objects = s.truth.objects(prompt) or []
        masks.append({k: s.truth.generated_mask(images[i], objects[k]) for k, _ in heads[i]})
        masks[i] = {k: (m, objects[k]) for k, m in masks[i].items() if m.sum() >= 4}
    for (name, step), m in cap.by_layer_step("probs").items():
        for i in range(len(batch)):
            col = 0
            for k, pos in heads[i]:
                if k in masks[i]:
                    word = to_image(m[i, col : col + len(pos)].mean(0, keepdim=True), size)[0]
                    cell = tally.cells.setdefault(("probs", index[name], step), [])
                    cell.append(iou(normalise(word) >= threshold, masks[i][k][0]))
                col += len(pos)
    if s.concepts:
        for (name, step), m in cap.by_layer_step("output").items():
            for i in range(len(batch)):
                for mask, obj in masks[i].values():
                    noun = _concept_key(obj.words[-1])
                    if noun in s.concepts:
                        concept = to_image(m[i, s.concepts.index(noun)][None], size)[0]
                        cell = tally.cells.setdefault(("output", index[name], step), [])
                        cell.append(iou(normalise(concept) >= threshold, mask))
    for (name, step), share in cap.share_by_layer_step().items():
        tally.cell_share.setdefault((index[name], step), []).extend(share.tolist())


def _best_range(values: dict[int, float]) -> tuple[int, int, float]:
    """The contiguous window of ⌈n/4⌉ indices with the highest mean: (first, last, mean)."""
    keys = sorted(values)
    width = max(1, -(-len(keys) // 4))
    best = max(range(len(keys) - width + 1), key=lambda j: np.mean([values[k] for k in keys[j : j + width]]))
    window = keys[best : best + width]
    return window[0], window[-1], float(np.mean([values[k] for k in window]))


def _layer_step_outputs(ctx, s: _Setup, tally: _Tally) -> dict[str, float]:
    """``tables/attention_miou_layer_step.csv`` and its heatmap; the best layer and step ranges as scalars."""
    if not tally.cells:
        return {}
    kinds = sorted({k for k, _, _ in tally.cells}, key=["probs", "output"].index)
    layers = sorted({layer for _, layer, _ in tally.cells})
    steps = sorted({step for _, _, step in tally.cells})
    rows = []
    for layer in layers:
        for step in steps:
            row = {"layer": layer, "layer_name": s.layout.layers[layer].removesuffix(".processor"), "step": step}
            for kind in kinds:
                vals = tally.cells.get((kind, layer, step))
                row["miou" if kind == "probs" else "miou_output"] = float(np.mean(vals)) if vals else ""
            share = tally.cell_share.get((layer, step))
            row["text_share"] = float(np.mean(share)) if share else ""
            row["num_objects"] = len(tally.cells.get(("probs", layer, step), []))
            rows.append(row)
    ctx.save_table(rows, "attention_miou_layer_step")
    grids = {}
    for kind in kinds:
        grid = np.full((len(layers), len(steps)), np.nan)
        for (k, layer, step), vals in tally.cells.items():
            if k == kind:
                grid[layers.index(layer), steps.index(step)] = np.mean(vals)
        grids["mIoU, " + ("attention probabilities" if kind == "probs" else "output space (concepts)")] = grid
    if tally.cell_share:
        grid = np.full((len(layers), len(steps)), np.nan)
        for (layer, step), vals in tally.cell_share.items():
            if layer in layers and step in steps:
                grid[layers.index(layer), steps.index(step)] = np.mean(vals)
        grids["text share (softmax mass on text keys)"] = grid
    ctx.save_figure(layer_step_figure(grids, layers, steps), "attention_miou_layer_step")
    scalars = {}
    for kind in kinds:
        suffix = "" if kind == "probs" else "_output"
        cells = {key[1:]: np.mean(v) for key, v in tally.cells.items() if key[0] == kind}
        by_layer = {layer: float(np.mean([v for (la, _), v in cells.items() if la == layer])) for layer in layers}
        by_step = {step: float(np.mean([v for (_, st), v in cells.items() if st == step])) for step in steps}
        first, last, best = _best_range(by_layer)
        scalars[f"attention/best_layers_first{suffix}"] = first
        scalars[f"attention/best_layers_last{suffix}"] = last
        scalars[f"attention/miou_best_layers{suffix}"] = best
        first, last, best = _best_range(by_step)
        scalars[f"attention/best_steps_first{suffix}"] = first
        scalars[f"attention/best_steps_last{suffix}"] = last
        scalars[f"attention/miou_best_steps{suffix}"] = best
    return scalars


def _threshold_outputs(ctx, cfg, scores: _Scores) -> None:
    """How much of the score is the choice of τ: mean IoU of head and modifier words at each threshold."""
    if not scores.curves["shape"]:
        return
    means = {kind: np.mean(v, axis=0) for kind, v in scores.curves.items() if v}
    ctx.save_table(
        [
            {"threshold": t, **{f"miou_{kind}": float(m[j]) for kind, m in means.items()}}
            for j, t in enumerate(CURVE_THRESHOLDS)
        ],
        "attention_iou_by_threshold",
    )
    ctx.save_figure(
        threshold_figure(means, cfg.mode.attention.threshold, len(scores.curves["shape"])), "attention_iou_by_threshold"
    )


def _scalars(ctx, s: _Setup, prompts: list[str], tally: _Tally) -> dict[str, float]:
    scores = tally.scores
    scalars = {
        "attention/num_prompts": len(prompts),
        "attention/num_truncated": tally.n_trunc,
        "attention/num_scored": len(scores.head),
        "attention/num_unscored": scores.unscored,
    }
    if tally.bos:
        scalars["attention/bos_share"] = float(np.mean(tally.bos))
    else:
        ctx.tag("skipped.attention/bos_share", f"the {s.layout.segment_name} segment has no start token")
    if tally.share:
        scalars["attention/text_share"] = float(np.mean(tally.share))
    if tally.ent_early:
        scalars["attention/entropy_early"] = float(np.mean(tally.ent_early))
        scalars["attention/entropy_late"] = float(np.mean(tally.ent_late))
    if s.concepts:
        scalars["attention/num_concepts"] = len(s.concepts)
    for key, vals in (
        ("miou", scores.head),
        ("miou_colour", scores.modifier),
        ("miou_swapped", scores.swapped),
        ("miou_output", scores.output),
    ):
        if vals:
            scalars[f"attention/{key}"] = float(np.mean(vals))
    for g, vals in sorted(scores.by_grid.items(), reverse=True):
        scalars[f"attention/miou_{g[0]}x{g[1]}"] = float(np.mean(vals))
        scalars[f"attention/miou_ceiling_{g[0]}x{g[1]}"] = float(np.mean(scores.ceiling[g]))
    return scalars


def _reference_part(ctx, cfg, s: _Setup) -> dict[str, float]:
    """The real-image protocol's scalars, or a ``skipped.attention/miou_reference`` tag (no masks, or turned off)."""
    if cfg.mode.attention.num_reference <= 0:
        return {}
    if s.truth is None:
        ctx.tag("skipped.attention/miou_reference", no_object_masks(cfg.dataset))
        return {}
    return _reference_scores(ctx, cfg, s.model, s.layout, s.height, s.width, s.truth, s.concepts)
