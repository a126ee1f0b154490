"""The metrics mode's stages: FID, KID, IS, precision/recall, density/coverage, CLIP score and prompt accuracy of
generated images against a reference set, from one feature pass per image per extractor.

Images stream batch by batch from the sampler into every extractor (never all N in memory); the reference
side's features are cached on disk (``<paths.cache>/reference/``) keyed by dataset identity + content hash,
N, extractor + weights hash and resize mode. Keys follow ``pipeline.metric_keys``: every extractor reports
``metrics/<stat>_<extractor>`` (``metrics/fd_shapes_net``, ``metrics/kid_mean_clip``, ...), the Inception one also
``metrics/fid``; the primary extractor (first of ``features=[...]``) is tagged ``metrics.primary_extractor`` and
its ``metrics/fd_<extractor>`` is the run's headline number.

Under ``torchrun`` (see ``pipeline.distributed``) each rank generates and extracts only its contiguous shard of the
N samples; FID statistics are merged as exact float64 sums and the per-sample matrices gathered in sample order, so
rank 0 computes every metric on exactly the single-process sets and logs it (``metrics/num_shards`` = world size).
Only rank 0 loads or extracts the reference features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import distributed as dist
from pipeline import metrics as M
from pipeline.errors import UserError
from pipeline.generation import generate
from pipeline.models.family import check_mode_support
from pipeline.metric_keys import PROMPT_ACCURACY, PRIMARY_EXTRACTOR_TAG, extractor_keys, primary_extractor, primary_fd_key
from pipeline.metrics.plots import sample_grid
from pipeline.registry import stage

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the cached content or its meaning changes
REPORTED_N = 10_000  # below this, FID & co. are biased: say so


def _n_reference(cfg) -> int:
    m = cfg.mode.metrics
    return int(m.num_reference if m.num_reference is not None else cfg.dataset.num_images)


@stage("metrics_check")
def metrics_check(ctx, cfg):
    """Checks that need no model, before anything is loaded or generated."""
    m = cfg.mode.metrics
    k_max = max(m.pr_k, m.dc_k)
    for key, n in (("mode.metrics.num_samples", m.num_samples), ("mode.metrics.num_reference", _n_reference(cfg))):
        if n < k_max + 1:
            raise UserError(f"{key}={n}: precision/recall (k={m.pr_k}) and density/coverage (k={m.dc_k}) need at "
                            f"least k+1 = {k_max + 1} samples")
    if m.judge not in ("auto", "on", "off"):
        raise UserError(f"mode.metrics.judge={m.judge!r}; expected auto, on or off")
    kind = getattr(cfg.dataset.kind, "value", cfg.dataset.kind)
    if kind == "folder" and not cfg.dataset.root:
        raise UserError("dataset.root: the metrics mode compares against a reference image folder; set "
                        "dataset.root=DIR (dataset=folder), or use dataset=shapes")
    if m.judge == "on" and kind != "shapes":
        raise UserError(f"mode.metrics.judge=on: dataset {cfg.dataset.name!r} has no ground truth to judge prompt "
                        "adherence with (only dataset=shapes has); set mode.metrics.judge=auto or off")
    check_mode_support(cfg.model.path, "metrics")  # a class the adapter cannot drive: refused before any work
    if m.num_samples < REPORTED_N:
        log.warning("metrics on N=%d generated images: FID/KID are biased at small N; use >= %d for reported numbers",
                    m.num_samples, REPORTED_N)
        ctx.tag("metrics.small_n", "true")
    if primary_extractor(cfg) is not None:  # before any work: a failed run still says what it ranks by
        ctx.tag(PRIMARY_EXTRACTOR_TAG, primary_extractor(cfg))
    return {}


_SHAPES_REFS: dict[tuple, object] = {}  # per process, for the jobs of a sweep


@stage("reference", produces=("reference",))
def reference_stage(ctx, cfg):
    from pipeline.config import to_plain
    from pipeline.data.reference import reference_set

    key = (repr(sorted(to_plain(cfg.dataset).items())), _n_reference(cfg))
    ref = _SHAPES_REFS.get(key) or reference_set(cfg.dataset, _n_reference(cfg))
    if ref.identity.get("kind") == "shapes":  # a pure function of the config: render (captions) once per process
        _SHAPES_REFS.clear()
        _SHAPES_REFS[key] = ref
    if ref.num_skipped:
        ctx.tag("reference.num_skipped", ref.num_skipped)
    log.info("reference set: %d images of %s (%s)", ref.n, cfg.dataset.name, ref.identity.get("split", ref.identity.get("root")))
    return {"reference": ref}


@stage("prompts", needs=("model", "reference"), produces=("prompts",))
def prompts_stage(ctx, cfg):
    """Prompts for text-conditioned models: ``mode.metrics.prompts_file`` or the reference captions."""
    from pipeline.data.reference import read_prompts

    if not ctx.get("model").text:
        return {"prompts": None}
    m = cfg.mode.metrics if cfg.mode.get("metrics") is not None else None
    if m is not None and m.prompts_file:
        return {"prompts": read_prompts(m.prompts_file)}
    captions = ctx.get("reference").captions
    if not captions or any(c is None for c in captions):
        raise UserError(f"dataset {cfg.dataset.name!r} has no caption for every image; a text-to-image model needs "
                        "prompts: set mode.metrics.prompts_file=FILE or add captions.jsonl to the folder")
    return {"prompts": captions}


# ----------------------------------------------------------------------------------------------- cache
def _cache_path(cfg, ref, extractor) -> tuple[Path, dict]:
    key = {"version": CACHE_VERSION, "dataset": ref.identity, "content": ref.content_hash(), "n": ref.n,
           "extractor": extractor.describe()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Path(cfg.paths.cache) / "reference" / f"{extractor.name}-{digest}.pt", key


_REF_STATS: dict[str, M.ReferenceStats] = {}  # per process: the reference square-root factor is computed once


@stage("real_features", needs=("reference", "extractors"), produces=("real_features",))
def real_features_stage(ctx, cfg):
    """Reference pool features per extractor, from the disk cache when its key matches (rank 0 only when
    distributed: the other ranks return None and never touch the cache)."""
    if dist.init(ctx.device) and not dist.is_main():
        return {"real_features": None}
    ref = ctx.get("reference")
    use_cache = cfg.mode.metrics.cache if cfg.mode.get("metrics") is not None else True
    out, hits = {}, []
    for name, ex in ctx.get("extractors").items():
        path, key = _cache_path(cfg, ref, ex)
        tic = time.perf_counter()
        if use_cache and path.is_file():
            pool = torch.load(path, weights_only=True)["pool"]
            hits.append(True)
            log.info("reference cache hit: %s (%s)", path.name, name)
        else:
            pool = _extract_reference(ref, ex, int(cfg.features[name].batch_size))
            hits.append(False)
            if use_cache:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: parallel writers never share it
                torch.save({"pool": pool, "key": json.dumps(key, default=str)}, tmp)
                tmp.replace(path)  # atomic: a parallel job never reads half a file
            log.info("reference cache miss: extracted %d x %d (%s) -> %s", *pool.shape, name, path.name)
        stats_key = str(path) + str(ref.n)
        if stats_key not in _REF_STATS:
            _REF_STATS[stats_key] = M.FeatureStats().update(pool).reference()
        out[name] = {"pool": pool, "stats": _REF_STATS[stats_key], "seconds": time.perf_counter() - tic}
    ctx.tag("reference_cache", "hit" if all(hits) else "miss")
    return {"real_features": out}


def _extract_reference(ref, extractor, batch_size: int) -> torch.Tensor:
    from tqdm.auto import tqdm

    chunks = []
    with tqdm(total=ref.n, desc=f"reference {extractor.name}", unit="img", dynamic_ncols=True) as bar:
        for batch in ref.batches(batch_size):
            chunks.append(extractor(batch)["pool"])
            bar.update(len(batch))
    return torch.cat(chunks)


# ----------------------------------------------------------------------------------------------- judge
def _judge_for(ctx, cfg, extractors, prompts):
    """The dataset's ground truth if prompt accuracy applies (its captions, its judge), else None with a
    ``skipped.metrics/prompt_accuracy`` tag giving the reason."""
    from pipeline.data.ground_truth import ground_truth

    mode = cfg.mode.metrics.judge
    if mode == "off" or prompts is None:
        return None
    gt = ground_truth(cfg.dataset, ctx.device, extractors)
    reason = (f"dataset {cfg.dataset.name!r} has no ground truth to judge prompts with (only dataset=shapes has)"
              if gt is None else gt.parses(prompts))
    if reason is not None:
        if mode == "on":
            raise UserError(f"mode.metrics.judge=on but prompt accuracy does not apply: {reason}")
        log.info("prompt accuracy skipped: %s", reason)
        ctx.tag(f"skipped.{PROMPT_ACCURACY}", reason)
        return None
    return gt


# ----------------------------------------------------------------------------------------------- metrics
@stage("metrics", needs=("model", "sampler", "prompts", "extractors", "real_features"))
def metrics_stage(ctx, cfg):
    m = cfg.mode.metrics
    dist.init(ctx.device)
    start, count = dist.shard(int(m.num_samples))  # (0, N) when not distributed
    if dist.is_distributed():
        log.info("rank %d of %d: samples %d..%d of %d", dist.rank(), dist.world_size(), start, start + count - 1,
                 m.num_samples)
    model, prompts, extractors = ctx.get("model"), ctx.get("prompts"), ctx.get("extractors")
    real = ctx.get("real_features")
    judge = _judge_for(ctx, cfg, extractors, prompts)
    images_dir = ctx.run_dir / "images" if m.save_images else None
    batch_size = int(m.batch_size or cfg.sampler.batch_size)

    fake = {name: {"pool": [], "logits": [], "image_embeds": [], "stats": M.FeatureStats()} for name in extractors}
    text_embeds: dict[str, list[torch.Tensor]] = {name: [] for name in extractors}
    grid_images, grid_prompts, judged = [], [], []
    n_valid = n_invalid = 0
    gen_seconds = feat_seconds = 0.0
    real_shape = ctx.get("reference").image_shape()

    stream = generate(model, ctx.get("sampler"), count, batch_size, cfg.sampler.num_inference_steps,
                      cfg.sampler.guidance_scale, cfg.seed, prompts=prompts, class_ids=m.class_ids, start=start,
                      height=cfg.sampler.height, width=cfg.sampler.width, eta=cfg.sampler.eta,
                      progress=dist.is_main(), desc="metrics")
    tic = time.perf_counter()
    for batch in stream:
        gen_seconds += time.perf_counter() - tic
        tic = time.perf_counter()
        n_invalid += batch.num_invalid
        n_valid += len(batch.images)
        if n_valid == len(batch.images) and len(batch.images) and tuple(batch.images.shape[2:]) != real_shape[:2]:
            log.info("generated %s vs reference %s images: each is resized to the extractor's input (%s)",
                     tuple(batch.images.shape[2:]), real_shape[:2],
                     {n: f"{e.input_size}px {e.resize}" for n, e in extractors.items()})
        if not len(batch.images):
            continue
        if images_dir is not None:
            _save_images(images_dir, batch.images, batch.indices)
        for name, ex in extractors.items():
            out = ex(batch.images)
            fake[name]["stats"].update(out["pool"])
            for k in ("pool", "logits", "image_embeds"):
                if k in out:
                    fake[name][k].append(out[k])
            if "image_embeds" in out and batch.prompts and hasattr(ex, "text_embeds"):
                text_embeds[name].append(ex.text_embeds(batch.prompts))
        if judge is not None:
            judged += judge.adherence(batch.images, batch.prompts)
        if len(grid_images) < m.grid ** 2 and start < m.grid ** 2:  # later shards never reach the grid
            take = m.grid ** 2 - len(grid_images)
            grid_images += list(batch.images[:take])
            labels = batch.prompts or ([f"class {c}" for c in batch.class_ids] if batch.class_ids else [])
            grid_prompts += labels[:take]
        feat_seconds += time.perf_counter() - tic
        tic = time.perf_counter()

    if dist.is_distributed():
        n_valid, n_invalid = (int(v) for v in dist.all_reduce_scalars([n_valid, n_invalid]))
        gen_seconds, feat_seconds = dist.all_reduce_scalars([gen_seconds, feat_seconds], op="max")  # wall clock
        for name in extractors:
            fake[name]["stats"] = dist.all_reduce_stats(fake[name]["stats"])
            for k in ("pool", "logits", "image_embeds"):
                fake[name][k] = _gathered(fake[name][k])
            text_embeds[name] = _gathered(text_embeds[name])
        judged = dist.all_gather_list(judged)
        grid_images = dist.all_gather_list(grid_images)[: m.grid ** 2]
        grid_prompts = dist.all_gather_list(grid_prompts)[: m.grid ** 2]
    k_max = max(m.pr_k, m.dc_k)
    if n_valid < k_max + 1:
        raise UserError(f"only {n_valid} of {m.num_samples} generated images are finite (NaN/Inf in the rest); "
                        f"metrics need at least {k_max + 1}")
    if not dist.is_main():
        return {}  # rank 0 computes and logs every metric from the merged statistics
    ref_seconds = sum(r["seconds"] for r in real.values())
    scalars = {"metrics/num_samples": n_valid, "metrics/num_invalid": n_invalid, "metrics/num_shards": dist.world_size(),
               "metrics/sec_per_image": gen_seconds / max(m.num_samples, 1), "metrics/generation_seconds": gen_seconds,
               "metrics/fake_features_seconds": feat_seconds, "metrics/reference_seconds": ref_seconds}
    rows = []
    for i, (name, ex) in enumerate(extractors.items()):
        r_pool, f_pool = real[name]["pool"], torch.cat(fake[name]["pool"])
        s = {"fd": M.frechet_distance(fake[name]["stats"], real[name]["stats"])}
        subset = min(m.kid_subset_size, len(r_pool), len(f_pool))
        if subset < m.kid_subset_size:
            log.info("KID subset size %d capped at N=%d", m.kid_subset_size, subset)
        s["kid_mean"], s["kid_std"] = M.kernel_distance(r_pool, f_pool, subsets=m.kid_subsets, subset_size=subset, seed=cfg.seed)
        if fake[name]["logits"]:
            logits = torch.cat(fake[name]["logits"])
            s["is_mean"], s["is_std"] = M.inception_score(logits, splits=min(m.is_splits, len(logits)), seed=cfg.seed)
        s["precision"], s["recall"] = M.precision_recall(r_pool, f_pool, k=m.pr_k)
        s["density"], s["coverage"] = M.density_coverage(r_pool, f_pool, k=m.dc_k)
        if text_embeds[name]:
            s["clip_score"] = M.clip_score(torch.cat(fake[name]["image_embeds"]), torch.cat(text_embeds[name]))
        half = len(r_pool) // 2
        s["fd_floor"] = M.frechet_distance(r_pool[:half], r_pool[half : 2 * half])  # noise floor at this N
        scalars.update(extractor_keys(name, s))  # metrics/<stat>_<name> (+ metrics/fid for inception)
        rows.append({"extractor": name, "primary": i == 0, **ex.describe(), "n_real": len(r_pool), "n_fake": len(f_pool),
                     "kid_subset_size": subset, **s})
        ctx.tag(f"metrics.resize.{name}", ex.resize)
    if judged:
        scalars[PROMPT_ACCURACY] = float(np.mean([j["correct"] for j in judged]))
        ctx.save_table(judged, "metrics_prompt_judgements")
    ctx.log_scalars(scalars)
    ctx.save_table(rows, "metrics_extractors")
    ctx.save_figure(sample_grid(grid_images, grid_prompts or None, m.grid), "metrics_samples")
    headline = primary_fd_key(extractors)
    log.info("metrics: %s = %.4g (primary extractor); %s", headline, scalars[headline],
             {k: round(v, 4) for k, v in scalars.items() if k != headline})
    log.info("timing: generation %.1f s, fake features + judge %.1f s, reference %.1f s",
             gen_seconds, feat_seconds, ref_seconds)
    return {}


def _save_images(folder: Path, images: torch.Tensor, indices: list[int]) -> None:
    """``<folder>/<global index:06d>.png``, lossless (the oracle compares them with the family's own pipeline)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for img, i in zip(images, indices):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:06d}.png")


def _gathered(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's batches -> every rank's rows in sample order, as a one-element list (empty if none at all)."""
    merged = dist.all_gather_rows(torch.cat(chunks) if chunks else None)
    return [] if merged is None else [merged]
