"""The metrics mode's stages: FID, KID, IS, precision/recall, density/coverage, CLIP score and prompt accuracy of
generated images against a reference set, from one feature pass per image per extractor.

Images stream batch by batch from the sampler into every extractor (never all N in memory); the reference
side's features are cached on disk (``<paths.cache>/reference/``) keyed by dataset identity + content hash,
N, extractor + weights hash and resize mode. Keys follow ``pipeline.core.metric_keys``: every extractor reports
``metrics/<stat>_<extractor>`` (``metrics/fd_shapes_net``, ``metrics/kid_mean_clip``, ...), the Inception one also
``metrics/fid``; the primary extractor (first of ``features=[...]``) is tagged ``metrics.primary_extractor`` and
its ``metrics/fd_<extractor>`` is the run's headline number.

Under ``torchrun`` (see ``pipeline.core.distributed``) each rank generates and extracts only its contiguous shard of the
N samples and persists it batch by batch; rank 0 reads every shard in sample order, so it computes every metric on
exactly the single-process sets and logs it (``metrics/num_shards`` = world size). Only rank 0 loads or extracts
the reference features (the shared ``real_features`` stage, :mod:`pipeline.features.stages`). The statistics run on one CPU thread where their bits would depend on the thread count
(see :func:`_extractor_stats`), so a resumed, a sharded and an uninterrupted run give the same scalars exactly on
CPU. Everything read back (shards, reference cache entries) is checksummed and checked against its name.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import metrics as M
from pipeline.config import to_plain
from pipeline.core import cost as C
from pipeline.core import distributed as dist
from pipeline.core.metric_keys import (
    CLIP_TRUNCATED,
    CMMD,
    COST_NFE,
    FD_BIASED_TAG,
    PRIMARY_EXTRACTOR_TAG,
    PROMPT_ACCURACY,
    extractor_keys,
    metric_key,
    preference_key,
    primary_extractor,
    primary_fd_key,
)
from pipeline.core.progress import PROGRESS_DIR, LiveProgress, ShardStore, crash_point
from pipeline.core.registry import stage
from pipeline.data.ground_truth import ground_truth, no_judge
from pipeline.data.stages import PER_PROMPT_SAMPLES, compared_reference
from pipeline.errors import UserError
from pipeline.metrics.cmmd import cmmd  # (the package attribute ``cmmd`` is this module)
from pipeline.metrics.intervals import bootstrap_interval, fd_inf, fd_subsample_sd, kernel_subsample_sd, normal_interval
from pipeline.models.generation import generate, nfe
from pipeline.modes.metrics.plots import sample_grid, worst_prompts_figure

log = logging.getLogger(__name__)

REPORTED_N = 10_000  # below this, FID & co. are biased: say so
THUMBNAIL_MAX_N = 2048  # runs up to this N keep a thumbnail of every image in the shards (worst-prompts figure)
THUMBNAIL_SIDE = 128  # pixels, the longest side (the figure shows a tile ~150 px wide)


@stage("metrics_check")
def metrics_check(ctx, cfg):
    """The run's notes before anything is loaded or generated (the checks are :func:`pipeline.modes.metrics.mode.validate`,
    run before the MLflow run exists)."""
    m = cfg.mode.metrics
    if m.num_samples < REPORTED_N:
        log.warning(
            "metrics on N=%d generated images: FID/KID are biased at small N; use >= %d for reported numbers",
            m.num_samples,
            REPORTED_N,
        )
        ctx.tag("metrics.small_n", "true")
    if primary_extractor(cfg) is not None:  # before any work: a failed run still says what it ranks by
        ctx.tag(PRIMARY_EXTRACTOR_TAG, primary_extractor(cfg))
    return {}


# ----------------------------------------------------------------------------------------------- judge
def _judge_for(ctx, cfg, extractors, prompts):
    """The dataset's ground truth if prompt accuracy applies (its captions, its judge), else None with a
    ``skipped.metrics/prompt_accuracy`` tag giving the reason."""
    mode = cfg.mode.metrics.judge
    if mode == "off" or prompts is None:
        return None
    gt = ground_truth(cfg.dataset, ctx.device, extractors)
    reason = no_judge(cfg.dataset) if gt is None else gt.parses(prompts)
    if reason is not None:
        if mode == "on":
            raise UserError(f"mode.metrics.judge=on but prompt accuracy does not apply: {reason}")
        log.info("prompt accuracy skipped: %s", reason)
        ctx.tag(f"skipped.{PROMPT_ACCURACY}", reason)
        return None
    return gt


# ----------------------------------------------------------------------------------------------- metrics
SHARD_VERSION = 3  # bump when what a shard holds changes: older shards are then regenerated (3: cost meters)
_PER_SAMPLE = ("pool", "logits", "image_embeds")  # extractor outputs kept per sample


def _fingerprint(cfg) -> dict:
    """Everything that decides the shards' contents: the resolved config but for what a resumed run may change
    (``model.device``, ``tracking.*``, ``paths.*``)."""
    plain = to_plain(cfg)
    plain.get("model", {}).pop("device", None)
    for key in ("tracking", "paths"):
        plain.pop(key, None)
    return {"version": SHARD_VERSION, "config": plain}


def _batches(start: int, count: int, batch_size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + batch_size, start + count)) for lo in range(start, start + count, batch_size)]


@stage("metrics", needs=("model", "sampler", "prompts", "extractors", "real_features", "reference"))
def metrics_stage(ctx, cfg):
    """Generate N images batch by batch, extract every extractor's features, persist each batch as a shard in
    ``<run dir>/progress/metrics/`` (``pipeline.core.progress``), then compute every metric from the shards.

    Batches whose shard is already on disk (a resumed run) are not generated again; the metrics are computed from
    the shards in sample order with fixed-size chunks, so an interrupted-and-resumed run, a sharded ``torchrun``
    run and an uninterrupted one give the same scalars (timings aside) exactly on CPU."""
    m = cfg.mode.metrics
    dist.init(ctx.device)
    n = int(m.num_samples)
    batch_size = int(m.batch_size or cfg.sampler.batch_size)
    # rank 0's run dir: under torchrun every rank persists its shard there (one node, or a shared filesystem)
    store = ShardStore(Path(dist.broadcast_object(str(ctx.run_dir))) / PROGRESS_DIR / "metrics", _fingerprint(cfg))
    done = _resume_point(store, n, batch_size)
    _generate_shards(ctx, cfg, store, batch_size, done)
    dist.barrier()  # every rank's shards are on disk
    if not dist.is_main():
        return {}  # rank 0 computes and logs every metric from all shards
    every = [b for r in range(dist.world_size()) for b in _batches(*dist.shard(n, r), batch_size)]
    _metrics_from_shards(ctx, cfg, store, every, ctx.get("extractors"))
    return {}


def _resume_point(store, n: int, batch_size: int) -> list[tuple[int, int]]:
    """This rank's batches already on disk (a resumed run), logged with where generation starts."""
    start, count = dist.shard(n)  # (0, N) when not distributed
    mine = _batches(start, count, batch_size)
    done = store.valid(mine)
    todo = [b for b in mine if b not in done]
    where = f"rank {dist.rank()} of {dist.world_size()}: " if dist.is_distributed() else ""
    if done:
        log.info(
            "%sresuming at sample %d of %d (%d of %d batches already on disk)",
            where,
            todo[0][0] if todo else start + count,
            n,
            len(done),
            len(mine),
        )
    elif dist.is_distributed():
        log.info("%ssamples %d..%d of %d", where, start, start + count - 1, n)
    return done


def _generate_shards(ctx, cfg, store, batch_size: int, done) -> None:
    """Generate this rank's samples not on disk, batch by batch, each persisted as a shard (:func:`_shard`)."""
    m = cfg.mode.metrics
    n = int(m.num_samples)
    start, count = dist.shard(n)
    model, prompts, extractors = ctx.get("model"), ctx.get("prompts"), ctx.get("extractors")
    judge = _judge_for(ctx, cfg, extractors, prompts)
    images_dir = ctx.run_dir / "images" if m.save_images else None
    real_shape = compared_reference(ctx, cfg).image_shape()
    live = LiveProgress(ctx.tracker, total=n, done=sum(hi - lo for lo, hi in done), scale=dist.world_size())
    energy = C.EnergyCounter(ctx.device) if m.cost else None
    if m.cost and ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)

    stream = generate(
        model,
        ctx.get("sampler"),
        count,
        batch_size,
        cfg.sampler.num_inference_steps,
        cfg.sampler.guidance_scale,
        cfg.seed,
        prompts=prompts,
        class_ids=m.class_ids,
        start=start,
        height=cfg.sampler.height,
        width=cfg.sampler.width,
        eta=cfg.sampler.eta,
        progress=dist.is_main(),
        desc="metrics",
        skip={lo for lo, _ in done},
        cost=bool(m.cost),
    )
    first = True
    # the worst-prompts figure shows a few samples small: up to THUMBNAIL_MAX_N samples each keeps a thumbnail in
    # its shard, so the figure reuses them; above, regenerating ~40 images is under 2 % of the generation
    keep_thumbnails = bool(prompts) and m.worst_prompts >= 1 and n <= THUMBNAIL_MAX_N
    tic = time.perf_counter()
    joules = energy.read() if energy is not None else None
    for batch in stream:
        gen_seconds = time.perf_counter() - tic
        tic = time.perf_counter()
        if first and len(batch.images) and tuple(batch.images.shape[2:]) != real_shape[:2]:
            log.info(
                "generated %s vs reference %s images: each is resized to the extractor's input (%s)",
                tuple(batch.images.shape[2:]),
                real_shape[:2],
                {n: f"{e.input_size}px {e.resize}" for n, e in extractors.items()},
            )
        first = False
        arrays, meta = _shard(batch, extractors, judge, images_dir, m.grid, keep_thumbnails)
        meta["generation_seconds"], meta["features_seconds"] = gen_seconds, time.perf_counter() - tic
        if m.cost:
            joules = _meter_batch(meta, batch, ctx.device, energy, joules)
        store.write(batch.span[0], batch.span[1], arrays, meta)
        live.update(batch.span[1] - batch.span[0])
        tic = time.perf_counter()
    live.close()


def _meter_batch(meta: dict, batch, device, energy, joules_before):
    """A batch's cost meters into its shard's ``meta["cost"]`` (phase seconds, energy since the previous batch,
    the process's memory peaks so far); returns the energy reading the next batch starts from."""
    cost = {"timings": batch.timings, "peak_rss_mb": C.peak_rss_mb()}
    peaks = C.cuda_peaks_mb(device)
    if peaks is not None:
        cost["cuda_max_allocated_mb"], cost["cuda_max_reserved_mb"] = peaks
    now = energy.read() if energy is not None else None
    if now is not None and joules_before is not None:
        cost["energy_joules"], cost["energy_source"] = now - joules_before, energy.source
    elif energy is not None:
        cost["energy_skipped"] = energy.reason or "energy counter not readable"
    meta["cost"] = cost
    return now


def _shard(batch, extractors, judge, images_dir, grid: int, thumbnails: bool = False):
    """One generated batch as a shard: its per-sample extractor outputs, judgements, grid images and (``thumbnails``)
    every image's thumbnail for the worst-prompts figure."""
    arrays: dict[str, np.ndarray] = {"indices": np.asarray(batch.indices, dtype=np.int64)}
    meta = {"num_invalid": batch.num_invalid, "prompts": batch.prompts, "class_ids": batch.class_ids, "judged": []}
    if not len(batch.images):
        return arrays, meta
    if thumbnails:
        arrays["thumbnails"] = _thumbnails(batch.images).numpy()
    if images_dir is not None:
        _save_images(images_dir, batch.images, batch.indices)
    for name, ex in extractors.items():
        out = ex(batch.images)
        for k in _PER_SAMPLE:
            if k in out:
                arrays[f"{name}.{k}"] = out[k].detach().cpu().numpy()
        if "image_embeds" in out and batch.prompts and hasattr(ex, "text_embeds"):
            arrays[f"{name}.text_embeds"] = ex.text_embeds(batch.prompts).detach().cpu().numpy()
        if batch.prompts and hasattr(ex, "prompt_scores"):  # a human-preference scorer (features=[pickscore] ...)
            scores = ex.prompt_scores(out, batch.images, batch.prompts)
            arrays[f"{name}.score"] = scores.detach().float().cpu().numpy()
    if judge is not None:
        meta["judged"] = judge.adherence(batch.images, batch.prompts)
    in_grid = [j for j, i in enumerate(batch.indices) if i < grid**2]
    if in_grid:
        arrays["grid_images"] = batch.images[in_grid].numpy()
        arrays["grid_indices"] = np.asarray([batch.indices[j] for j in in_grid], dtype=np.int64)
        labels = batch.prompts or ([f"class {c}" for c in batch.class_ids] if batch.class_ids else None)
        meta["grid_labels"] = [labels[j] for j in in_grid] if labels else None
    return arrays, meta


@dataclass
class _Assembled:
    """The shards of a run read back in sample order."""

    columns: "_Columns"
    judged: list = field(default_factory=list)
    grid_images: list = field(default_factory=list)
    grid_labels: list = field(default_factory=list)
    grid_indices: list = field(default_factory=list)  # the sample index of each grid image
    prompts: list = field(default_factory=list)
    n_invalid: int = 0
    gen_seconds: float = 0.0
    feat_seconds: float = 0.0
    batches: list = field(default_factory=list)  # per shard: (images, generation s, features s, its cost meters)


def _assemble(store, batches, num_samples: int) -> _Assembled:
    """Per-sample arrays of the shards of ``batches`` into memory-mapped files (never lists of tensors), the rest
    into lists, in sample order."""
    got = _Assembled(_Columns(store.dir / "assembled", num_samples))
    for lo, hi in batches:
        shard = store.read(lo, hi)
        if shard is None:
            raise RuntimeError(f"shard of samples {lo}..{hi - 1} missing or corrupt in {store.dir} after generation")
        arrays, meta = shard
        grid = arrays.pop("grid_images", None)
        grid_indices = arrays.pop("grid_indices", None)
        if grid is not None:
            got.grid_images += [torch.from_numpy(g) for g in grid]
            got.grid_indices += [int(i) for i in grid_indices]
            got.grid_labels += meta.get("grid_labels") or []
        got.columns.add(arrays)
        got.judged += meta["judged"]
        got.prompts += meta["prompts"] or []
        got.n_invalid += int(meta["num_invalid"])
        got.gen_seconds += float(meta["generation_seconds"])
        got.feat_seconds += float(meta["features_seconds"])
        got.batches.append(
            (hi - lo, float(meta["generation_seconds"]), float(meta["features_seconds"]), meta.get("cost"))
        )
    return got


def _metrics_from_shards(ctx, cfg, store, batches, extractors) -> None:
    """Every metric from the shards of ``batches`` (in sample order): per-sample arrays into memory-mapped files
    (never lists of tensors), FID statistics in fixed chunks (independent of how batches were split)."""
    m = cfg.mode.metrics
    real = ctx.get("real_features")
    got = _assemble(store, batches, int(m.num_samples))
    crash_point("metrics_assembled")
    n_valid = got.columns.rows("indices")
    k_max = max(m.pr_k, m.dc_k)
    if n_valid < k_max + 1:
        raise UserError(
            f"only {n_valid} of {m.num_samples} generated images are finite (NaN/Inf in the rest); "
            f"metrics need at least {k_max + 1}"
        )
    ref_seconds = sum(r["seconds"] for r in real.values())
    scalars = {
        "metrics/num_samples": n_valid,
        "metrics/num_invalid": got.n_invalid,
        "metrics/num_shards": dist.world_size(),
        "metrics/sec_per_image": got.gen_seconds / max(m.num_samples, 1),
        "metrics/generation_seconds": got.gen_seconds,
        "metrics/fake_features_seconds": got.feat_seconds,
        "metrics/reference_seconds": ref_seconds,
    }
    rows, per_prompt = _all_extractor_stats(ctx, cfg, extractors, real, got, scalars)
    _tag_intervals_spanning_zero(ctx, scalars, n_valid)
    if got.judged:
        scalars[PROMPT_ACCURACY] = float(np.mean([j["correct"] for j in got.judged]))
    calls = nfe(
        ctx.get("model"),
        ctx.get("sampler"),
        int(cfg.sampler.num_inference_steps),
        cfg.sampler.height,
        cfg.sampler.width,
    )
    if calls is not None:  # None: a native-path run whose images were all generated by an earlier attempt
        scalars[COST_NFE] = float(calls)
    if m.cost:
        costs, why_not = C.run_cost(got.batches, calls)
        scalars.update(costs)
        for key, reason in why_not.items():
            ctx.tag(f"skipped.{key}", reason)
    ctx.log_scalars(scalars)  # the numbers first: a table or figure that fails must not lose them
    if got.judged:
        ctx.save_table(got.judged, "metrics_prompt_judgements")
    ctx.save_table(rows, "metrics_extractors")
    ctx.save_figure(
        sample_grid(got.grid_images[: m.grid**2], got.grid_labels[: m.grid**2] or None, m.grid), "metrics_samples"
    )
    if got.prompts:
        tic = time.perf_counter()
        known = dict(zip(got.grid_indices, got.grid_images))  # images the shards keep (the sample grid's)
        _per_prompt_outputs(ctx, cfg, got.columns, got.prompts, got.judged, per_prompt, known)
        ctx.log_scalars({"metrics/per_prompt_seconds": time.perf_counter() - tic})  # table + worst-prompts figure
    del got.columns
    shutil.rmtree(store.dir / "assembled", ignore_errors=True)  # rebuilt from the shards whenever needed
    headline = primary_fd_key(extractors)
    log.info(
        "metrics: %s = %.4g (primary extractor); %s",
        headline,
        scalars[headline],
        {k: round(v, 4) for k, v in scalars.items() if k != headline},
    )
    log.info(
        "timing: generation %.1f s, fake features + judge %.1f s, reference %.1f s",
        got.gen_seconds,
        got.feat_seconds,
        ref_seconds,
    )


def _all_extractor_stats(ctx, cfg, extractors, real, got: _Assembled, scalars: dict) -> tuple[list[dict], dict]:
    """Every extractor's statistics into ``scalars`` (and CMMD from clip336), the ``skipped.*`` tags of what does not
    apply; the extractors table's rows and the per-sample columns of the per-prompt table."""
    m = cfg.mode.metrics
    columns, prompts = got.columns, got.prompts
    rows, per_prompt, skipped, biased = [], {}, {}, []
    for i, (name, ex) in enumerate(extractors.items()):
        s, ci, why_not, per_sample = _extractor_stats(name, ex, real[name], columns, prompts, m, cfg.seed)
        scalars.update(extractor_keys(name, s, ci))  # metrics/<stat>_<name>[_ci_low|_ci_high] (+ fid for inception)
        skipped.update(
            {
                f"skipped.{metric_key(stat.removesuffix('_ci'), name)}{'_ci' if stat.endswith('_ci') else ''}": r
                for stat, r in why_not.items()
            }
        )
        for column, values in per_sample.items():
            per_prompt.setdefault(column, values)  # the first extractor that has the column (primary first)
        if name == "clip336":
            scalars.update(_cmmd(real[name]["pool"], columns.tensor(f"{name}.pool"), m.ci_subsets, cfg.seed))
        if hasattr(ex, "prompt_scores"):
            key, scores = preference_key(ex.score_name), columns.tensor(f"{name}.score")
            if scores is None or len(scores) < 2:
                skipped[f"skipped.{key}"] = "a preference score needs prompts (a text-to-image model) and 2 images"
            else:  # the mean of per-image scores, a percentile-bootstrap interval over images
                scalars[key] = float(scores.double().mean())
                scalars[key + "_ci_low"], scalars[key + "_ci_high"] = bootstrap_interval(
                    scores, m.ci_bootstrap, cfg.seed
                )
                per_prompt.setdefault(ex.score_name, scores)
        n, d = columns.tensor(f"{name}.pool").shape
        if n <= d:  # the FD's covariance is rank-deficient: the summary line says so beside the headline
            biased.append(f"{metric_key('fd', name)}: N = {n} ≤ d = {d}")
        if hasattr(ex, "count_truncated") and prompts and CLIP_TRUNCATED not in scalars:
            scalars[CLIP_TRUNCATED] = len(ex.count_truncated(sorted(set(prompts))))
        rows.append(
            {
                "extractor": name,
                "primary": i == 0,
                **ex.describe(),
                "n_real": len(real[name]["pool"]),
                "n_fake": columns.rows(f"{name}.pool"),
                **s,
            }
        )
        ctx.tag(f"metrics.resize.{name}", ex.resize)
    if CMMD not in scalars and any("image_embeds" in ex.outputs for ex in extractors.values()):  # another CLIP
        skipped[f"skipped.{CMMD}"] = (
            "CMMD needs features=[clip336] (CLIP ViT-L/14@336, whole image resized to "
            "336² bicubic, as Jayasumana et al.); another CLIP's numbers are not CMMD"
        )
    for key, reason in skipped.items():
        ctx.tag(key, reason)
    if biased:
        ctx.tag(FD_BIASED_TAG, "; ".join(biased) + " (fewer samples than feature dimensions: FD strongly biased)")
    return rows, per_prompt


def _cmmd(real_pool, fake_pool, ci_subsets: int, seed: int) -> dict[str, float]:
    """CMMD and its interval (kernel sums on one thread: the same bits whatever the thread count)."""
    with M.one_thread():
        value = cmmd(real_pool, fake_pool)
        sd = kernel_subsample_sd(real_pool, fake_pool, "cmmd", ci_subsets, seed)
    low, high = normal_interval(value, sd)
    return {CMMD: value, CMMD + "_ci_low": low, CMMD + "_ci_high": high}


def _tag_intervals_spanning_zero(ctx, scalars: dict, n_valid: int) -> None:
    spans = [
        k[: -len("_ci_low")]
        for k, v in scalars.items()
        if k.endswith("_ci_low") and v < 0 < scalars[k[:-7] + "_ci_high"]
    ]
    for key in spans:
        log.warning(
            "%s = %.4g, 95 %% interval [%.4g, %.4g] spans 0: not distinguishable from 0 at N = %d",
            key,
            scalars[key],
            scalars[key + "_ci_low"],
            scalars[key + "_ci_high"],
            n_valid,
        )
    if spans:
        ctx.tag("metrics.interval_spans_zero", ",".join(spans))


FD_INF_MIN_N = 2000  # FD∞ only when N >= max(2000, d) (Chong & Forsyth fit from 5k; below, covariances are poor)
NO_RESAMPLING = (
    "no resampling interval: {stat} depends on the generated set jointly (its k-NN balls), which "
    "duplicated samples distort"
)


def _extractor_stats(name, ex, real, columns, prompts, m, seed):
    """One extractor's statistics, their intervals (``pipeline.metrics.intervals``: subsampling for FD/KID,
    percentile bootstrap for precision/density/CLIP score), the reasons of what it skips, and per-sample columns
    for the per-prompt table ({column: (N,) values}).

    Everything but precision/recall/density/coverage runs on one CPU thread (``M.one_thread``): torch's reductions
    and LAPACK split their work by thread count, which the thread policy, torchrun and a resume all change, and a
    resumed run must give the uninterrupted run's bits. PR/DC keep the process's threads: their k-NN distances are
    gemm tiles split over the output (no split reduction), then per-row comparisons, so their counts do not depend
    on the thread count, and they are the costliest step at large N."""
    r_pool, f_pool = real["pool"], columns.tensor(f"{name}.pool")
    n, d = f_pool.shape
    s, ci, skipped, per_sample = {}, {}, {}, {}
    per_fake: dict = {}
    prdc = M.precision_recall_density_coverage(r_pool, f_pool, m.pr_k, m.dc_k, per_fake=per_fake)
    with M.one_thread():
        s["fd"] = M.frechet_distance(M.FeatureStats.from_features(f_pool), real["stats"])
        ci["fd"] = normal_interval(s["fd"], fd_subsample_sd(f_pool, real["stats"], m.ci_subsets, seed))
        if n >= max(FD_INF_MIN_N, d):
            s["fd_inf"] = fd_inf(f_pool, real["stats"], seed=seed)
        else:
            skipped["fd_inf"] = f"FD∞ needs N >= max({FD_INF_MIN_N}, d = {d}); N = {n}"
        subset = min(m.kid_subset_size, len(r_pool), n)
        if subset < m.kid_subset_size:
            log.info("KID subset size %d capped at N=%d", m.kid_subset_size, subset)
        s["kid_mean"], s["kid_std"] = M.kernel_distance(
            r_pool, f_pool, subsets=m.kid_subsets, subset_size=subset, seed=seed
        )
        ci["kid_mean"] = normal_interval(s["kid_mean"], kernel_subsample_sd(r_pool, f_pool, "kid", m.ci_subsets, seed))
        logits = columns.tensor(f"{name}.logits")
        if logits is not None:
            s["is_mean"], s["is_std"] = M.inception_score(logits, splits=min(m.is_splits, len(logits)), seed=seed)
        s["precision"], s["recall"], s["density"], s["coverage"] = prdc
        for stat in ("precision", "density"):
            ci[stat] = bootstrap_interval(per_fake[stat], m.ci_bootstrap, seed)
        for stat in ("recall", "coverage"):
            skipped[f"{stat}_ci"] = NO_RESAMPLING.format(stat=stat)
        text = columns.tensor(f"{name}.text_embeds")
        if text is not None:
            scores = M.clip_scores(columns.tensor(f"{name}.image_embeds"), text)
            s["clip_score"] = float(scores.mean())
            ci["clip_score"] = bootstrap_interval(scores, m.ci_bootstrap, seed)
            per_sample["clip_score"] = scores
        s["vendi"] = M.vendi_score(f_pool)
        groups = _prompt_groups(prompts)
        if groups:
            vendis = {p: M.vendi_score(f_pool[idx]) for p, idx in groups.items()}
            s["vendi_per_prompt"] = float(np.mean(list(vendis.values())))
            per_sample["vendi"] = vendis
        else:
            skipped["vendi_per_prompt"] = (
                "no prompt has 2 samples or more: set mode.metrics.per_prompt=true (4 per prompt) or "
                "mode.metrics.samples_per_prompt >= 2"
                if prompts
                else "no prompts (not a text-conditioned model)"
            )
        half = len(r_pool) // 2
        s["fd_floor"] = M.frechet_distance(r_pool[:half], r_pool[half : 2 * half])  # noise floor at this N
    return s, ci, skipped, per_sample


def _prompt_groups(prompts) -> dict[str, list[int]]:
    """{prompt: indices of its valid samples} for prompts with at least 2 samples, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts or []):
        groups.setdefault(p, []).append(i)
    return {p: idx for p, idx in groups.items() if len(idx) >= 2}


# the column the worst-prompts figure ranks by: a human-preference score, else CLIP score, accuracy, Vendi
_RANK_COLUMNS = ("pickscore", "hpsv2", "imagereward", "clip_score", "prompt_accuracy", "vendi")


def _per_prompt_outputs(ctx, cfg, columns, prompts, judged, per_sample, known=None) -> None:
    """``tables/metrics_per_prompt.csv`` (per prompt: samples, the mean of every per-image score — CLIP score, each
    preference score — prompt accuracy where the dataset has a judge, Vendi among its samples) and
    ``plots/metrics_worst_prompts.png``: the worst prompts by the first of :data:`_RANK_COLUMNS` the run has, with up
    to 4 of their samples (:func:`_worst_images`; ``known``: {sample index: image} the run still holds)."""
    m = cfg.mode.metrics
    indices = columns.tensor("indices").tolist()
    rows: dict[str, dict] = {}
    for i, p in enumerate(prompts):
        row = rows.setdefault(p, {"prompt": p, "num_samples": 0, "_idx": [], "_pos": []})
        row["num_samples"] += 1
        row["_idx"].append(indices[i])
        row["_pos"].append(i)
    for column, values in per_sample.items():
        if isinstance(values, dict):  # {prompt: value} (Vendi: only prompts with 2 samples or more have one)
            for p, v in values.items():
                rows[p][column] = v
        else:  # one value per image: the prompt's mean
            values = values.tolist()
            for row in rows.values():
                row[column] = float(np.mean([values[i] for i in row["_pos"]]))
    if judged and len(judged) == len(prompts):
        for row in rows.values():
            row["prompt_accuracy"] = float(np.mean([judged[i]["correct"] for i in row["_pos"]]))
    table = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows.values()]
    ctx.save_table(table, "metrics_per_prompt")  # a prompt without a value: an empty cell
    present = [k for k in _RANK_COLUMNS if any(k in r for r in table)]
    # a column every prompt ties on ranks nothing (the shapes judge finds every prompt right): the next one, else none
    key = next((k for k in present if _ranks([r[k] for r in table if k in r])), None)
    if key is None or m.worst_prompts < 1:
        if present and m.worst_prompts >= 1:
            reason = f"every prompt ties on {', '.join(present)}: no worst prompts to show"
            log.info("worst-prompts figure skipped: %s", reason)
            ctx.tag("skipped.plots/metrics_worst_prompts", reason)
        return
    ranked = [r for r in rows.values() if key in r]
    if len(ranked) < len(rows):  # Vendi: prompts with one sample (N not a multiple of k) have none
        log.info(
            "worst prompts by %s: %d of %d prompts have no %s (Vendi needs 2 samples of a prompt) and are not ranked",
            key,
            len(rows) - len(ranked),
            len(rows),
            key,
        )
    worst = sorted(ranked, key=lambda r: r[key])[: m.worst_prompts]
    groups = [r["_idx"][:PER_PROMPT_SAMPLES] for r in worst]
    thumbs = columns.tensor("thumbnails")
    if thumbs is not None:  # kept in the shards (N <= THUMBNAIL_MAX_N): no regeneration
        wanted = {i for g in groups for i in g}
        known = {**(known or {}), **{i: thumbs[pos] for pos, i in enumerate(indices) if i in wanted}}
    images = _worst_images(ctx, cfg, groups, known)
    labels = [f"{r['prompt'][:60]}  ({key} {r[key]:.3g})" for r in worst]
    ctx.save_figure(worst_prompts_figure(images, labels), "metrics_worst_prompts")


def _thumbnails(images: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3, h, w) with the longest side at most :data:`THUMBNAIL_SIDE` (antialiased bilinear)."""
    h, w = images.shape[-2:]
    scale = THUMBNAIL_SIDE / max(h, w)
    if scale >= 1:
        return images.clone()
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return small.round().clamp(0, 255).to(torch.uint8)


def _ranks(values: list) -> bool:
    """Whether a column orders prompts: one prompt (its samples are shown), or at least two different values."""
    return len(values) < 2 or len(set(values)) > 1


def _worst_images(ctx, cfg, groups: list[list[int]], known=None) -> list[list[torch.Tensor]]:
    """The images of samples ``groups`` (a list of index lists): those in ``known`` (the sample grid's, kept in the
    shards), read from ``images/`` where the run saved them (``mode.metrics.save_images``), else regenerated in one
    batched :func:`generate` call over all the missing ones —
    per-sample seeds, so the run's images up to float rounding where the batch composition differs. One call, not
    one per prompt: the figure costs a fraction of one batch, also in a resumed run with every shard on disk."""
    wanted = [i for g in groups for i in g]
    found: dict[int, torch.Tensor] = {i: known[i] for i in wanted if i in (known or {})}
    folder = ctx.run_dir / "images"
    if cfg.mode.metrics.save_images:
        for i in (i for i in wanted if i not in found):
            path = folder / f"{i:06d}.png"
            if path.is_file():
                with Image.open(path) as im:
                    found[i] = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    todo = [i for i in wanted if i not in found]
    if todo:
        batch_size = int(cfg.mode.metrics.batch_size or cfg.sampler.batch_size)
        for batch in generate(
            ctx.get("model"),
            ctx.get("sampler"),
            len(todo),
            batch_size,
            cfg.sampler.num_inference_steps,
            cfg.sampler.guidance_scale,
            cfg.seed,
            prompts=ctx.get("prompts"),
            class_ids=cfg.mode.metrics.class_ids,
            height=cfg.sampler.height,
            width=cfg.sampler.width,
            eta=cfg.sampler.eta,
            progress=False,
            indices=todo,
        ):
            found.update(zip(batch.indices, batch.images))
    return [[found[i] for i in g if i in found] for g in groups]


class _Columns:
    """Per-sample arrays of the shards, appended into memory-mapped ``.npy`` files of ``capacity`` rows."""

    def __init__(self, folder: Path, capacity: int):
        self.folder, self.capacity = folder, capacity
        self.maps: dict[str, np.ndarray] = {}
        self.filled: dict[str, int] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        for key, a in arrays.items():
            if key not in self.maps:
                self.maps[key] = np.lib.format.open_memmap(
                    self.folder / f"{key}.npy", mode="w+", dtype=a.dtype, shape=(self.capacity, *a.shape[1:])
                )
                self.filled[key] = 0
            k = self.filled[key]
            self.maps[key][k : k + len(a)] = a
            self.filled[key] = k + len(a)

    def rows(self, key: str) -> int:
        return self.filled.get(key, 0)

    def tensor(self, key: str) -> torch.Tensor | None:
        """The filled rows as a tensor sharing the memory map (no copy), None when no shard had ``key``."""
        if key not in self.maps:
            return None
        return torch.from_numpy(self.maps[key][: self.filled[key]])


def _save_images(folder: Path, images: torch.Tensor, indices: list[int]) -> None:
    """``<folder>/<global index:06d>.png``, lossless (the oracle compares them with the family's own pipeline)."""
    folder.mkdir(parents=True, exist_ok=True)
    for img, i in zip(images, indices):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:06d}.png")
