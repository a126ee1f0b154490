"""The one key grammar of the metrics mode's scalars (standard library only: the compare CLI and the sweep
summary import it without torch).

- Per extractor and statistic: ``metrics/<stat>_<extractor>`` for every extractor of ``features=[...]``,
  primary or not (``metrics/fd_shapes_net``, ``metrics/kid_mean_clip``, ``metrics/fd_floor_inception``);
  ``stat`` is one of :data:`STATS`.
- With the Inception extractor (named ``inception``) additionally ``metrics/fid`` (= ``metrics/fd_inception``).
- Keys that are not per extractor keep their plain name: ``metrics/num_samples``, ``metrics/num_invalid``,
  ``metrics/num_shards``, ``metrics/sec_per_image``, ``metrics/*_seconds``, ``metrics/prompt_accuracy``.
- Intervals append ``_ci_low`` / ``_ci_high`` to the full key (``metrics/fd_inception_ci_low``).

The sweep summary, ``pipeline.record.compare``, the sweep plots and the run log rank runs by
``metrics/fd_<primary extractor>`` (:func:`primary_fd_key`); the primary extractor is the first of
``features=[...]``, recorded per run as the tag :data:`PRIMARY_EXTRACTOR_TAG`.

    >>> metric_key("kid_mean", "clip")
    'metrics/kid_mean_clip'
    >>> sorted(extractor_keys("inception", {"fd": 1.5, "fd_floor": 0.25}).items())
    [('metrics/fd_floor_inception', 0.25), ('metrics/fd_inception', 1.5), ('metrics/fid', 1.5)]
    >>> primary_fd_key(["shapes_net", "inception"])
    'metrics/fd_shapes_net'
    >>> parse_key("metrics/fd_floor_shapes_net"), parse_key("metrics/fid"), parse_key("metrics/num_samples")
    (('fd_floor', 'shapes_net'), None, None)

Which direction is better, for every result key of every mode (:func:`higher_is_better`; one registry: the sweep
parent's ``best.<key>`` and any later ranking read it), and the few keys a run's end-of-run summary shows
(:func:`headline_keys`):

    >>> higher_is_better("metrics/fd_clip"), higher_is_better("attention/miou"), higher_is_better("schedule/log_snr_max")
    (False, True, None)
    >>> headline_keys({"metrics/fd_shapes_net": 34.3, "metrics/sec_per_image": 0.1, "schedule/log_snr_max": 7.1},
    ...               "shapes_net")
    ['metrics/fd_shapes_net', 'metrics/sec_per_image', 'schedule/log_snr_max']
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Optional

PREFIX = "metrics/"
# per-extractor statistics; fd_floor = FD between two halves of the reference set (the noise floor at this N)
STATS = (
    "fd",
    "kid_mean",
    "kid_std",
    "is_mean",
    "is_std",
    "precision",
    "recall",
    "density",
    "coverage",
    "clip_score",
    "fd_floor",
    "fd_inf",
    "vendi",
    "vendi_per_prompt",
)
INCEPTION = "inception"  # the extractor whose FD is also logged as FID
FID = PREFIX + "fid"  # = metric_key("fd", INCEPTION)
FID_INF = PREFIX + "fid_inf"  # = metric_key("fd_inf", INCEPTION)
CMMD = PREFIX + "cmmd"  # CLIP ViT-L/14@336 MMD (features=[clip336] only)
CLIP_TRUNCATED = PREFIX + "clip_truncated_prompts"
CI_SUFFIXES = ("_ci_low", "_ci_high")
PRIMARY_EXTRACTOR_TAG = "metrics.primary_extractor"
# run tags the end-of-run summary shows: the FD keys whose N <= d (rank-deficient covariance: strongly biased), and
# the prompt protocol (one image per caption, or k per prompt: pipeline.data.stages.samples_per_prompt)
FD_BIASED_TAG = "metrics.fd_biased"
PROMPT_PROTOCOL_TAG = "metrics.prompt_protocol"

# keys that are not per extractor
NUM_SAMPLES = PREFIX + "num_samples"
NUM_INVALID = PREFIX + "num_invalid"
NUM_SHARDS = PREFIX + "num_shards"
SEC_PER_IMAGE = PREFIX + "sec_per_image"
GENERATION_SECONDS = PREFIX + "generation_seconds"
FAKE_FEATURES_SECONDS = PREFIX + "fake_features_seconds"
REFERENCE_SECONDS = PREFIX + "reference_seconds"
PROMPT_ACCURACY = PREFIX + "prompt_accuracy"
# human-preference scorers (features=[pickscore] ...): ``metrics/<scorer>``, the mean of per-image scores of the
# image with its prompt (not per extractor: the score *is* the scorer), with a bootstrap interval
PREFERENCE_SCORERS = ("pickscore", "hpsv2", "imagereward")


def preference_key(scorer: str) -> str:
    """``metrics/<scorer>`` of a human-preference scorer (:data:`PREFERENCE_SCORERS`).

    >>> preference_key("pickscore")
    'metrics/pickscore'
    """
    if scorer not in PREFERENCE_SCORERS:
        raise ValueError(f"unknown preference scorer {scorer!r}; expected one of {PREFERENCE_SCORERS}")
    return PREFIX + scorer


def metric_key(stat: str, extractor: str) -> str:
    """``metrics/<stat>_<extractor>``; ``stat`` must be one of :data:`STATS`."""
    if stat not in STATS:
        raise ValueError(f"unknown metrics statistic {stat!r}; expected one of {STATS}")
    if not extractor:
        raise ValueError("metric_key: empty extractor name")
    return f"{PREFIX}{stat}_{extractor}"


def extractor_keys(
    extractor: str, values: Mapping[str, float], intervals: Mapping[str, tuple[float, float]] | None = None
) -> dict[str, float]:
    """One extractor's ``{stat: value}`` as ``{key: value}``, plus ``metrics/fid`` (``metrics/fid_inf``) when it is
    Inception's FD (FD∞); ``intervals`` ``{stat: (low, high)}`` add ``<key>_ci_low`` / ``<key>_ci_high``.

        >>> sorted(extractor_keys("clip", {"fd": 3.0}, {"fd": (2.5, 3.5)}).items())
        [('metrics/fd_clip', 3.0), ('metrics/fd_clip_ci_high', 3.5), ('metrics/fd_clip_ci_low', 2.5)]
    """
    out = {metric_key(stat, extractor): value for stat, value in values.items()}
    for stat, (low, high) in (intervals or {}).items():
        out[metric_key(stat, extractor) + CI_SUFFIXES[0]] = low
        out[metric_key(stat, extractor) + CI_SUFFIXES[1]] = high
    if extractor == INCEPTION:
        for stat, alias in (("fd", FID), ("fd_inf", FID_INF)):
            if stat in values:
                out[alias] = values[stat]
            if stat in (intervals or {}):
                out[alias + CI_SUFFIXES[0]], out[alias + CI_SUFFIXES[1]] = intervals[stat]
    return out


def interval_text(results: Mapping[str, Any], key: str) -> str:
    """`` [low, high]`` of ``key``'s 95 % interval in ``results`` ("" without one), with a note when it spans 0:
    a bare point estimate is never shown as if it were distinguishable from 0.

        >>> interval_text({"k": 1.0, "k_ci_low": -2.0, "k_ci_high": 4.0}, "k")
        ' [-2, 4] (interval spans 0)'
    """
    low, high = results.get(key + CI_SUFFIXES[0]), results.get(key + CI_SUFFIXES[1])
    if low is None or high is None:
        return ""
    return f" [{low:.4g}, {high:.4g}]" + (" (interval spans 0)" if low < 0 < high else "")


def primary_extractor(source: Any) -> Optional[str]:
    """The primary (first) extractor's name of ``source``: a run config (anything with ``features``), a mapping
    of extractors by name, an iterable of names, or one name. None when there is none."""
    if source is None:
        return None
    if isinstance(source, str):
        return source or None
    features = getattr(source, "features", None)
    if features is None and isinstance(source, Mapping) and isinstance(source.get("features"), Mapping):
        features = source["features"]  # a plain (resolved) config dict
    if features is not None:
        source = features
    if isinstance(source, (Mapping, Iterable)):
        return next((str(name) for name in source), None)
    raise TypeError(f"primary_extractor: cannot read extractor names from {type(source).__name__}")


def primary_fd_key(source: Any) -> Optional[str]:
    """``metrics/fd_<primary extractor>`` of ``source`` (see :func:`primary_extractor`), None without one."""
    name = primary_extractor(source)
    return None if name is None else metric_key("fd", name)


def parse_key(key: str) -> Optional[tuple[str, str]]:
    """``(stat, extractor)`` of a per-extractor key; None for any other key (``metrics/fid``, the keys that are
    not per extractor, interval bounds). The longest matching statistic wins (``fd_floor`` over ``fd``)."""
    if not key.startswith(PREFIX) or key.endswith(CI_SUFFIXES):
        return None
    rest = key[len(PREFIX) :]
    for stat in sorted(STATS, key=len, reverse=True):
        if rest.startswith(stat + "_") and len(rest) > len(stat) + 1:
            return stat, rest[len(stat) + 1 :]
    return None


def label(key: str) -> str:
    """A short axis label for a metric key: ``FID`` for Inception's FD, ``FD shapes_net``, ``kid_mean clip``,
    else the key without its prefix."""
    parsed = parse_key(key)
    if key == FID or parsed == ("fd", INCEPTION):
        return "FID"
    if parsed is not None:
        stat, extractor = parsed
        return f"{'FD' if stat == 'fd' else stat} {extractor}"
    return key[len(PREFIX) :] if key.startswith(PREFIX) else key


# --------------------------------------------------------------------------------------------- direction
# per-extractor statistic -> higher is better (None: a spread or a count, not a score). The metric functions'
# families in pipeline.metrics.HIGHER_IS_BETTER ("fid", "kid", "is", ...) agree with these (tested).
STAT_HIGHER_IS_BETTER: dict[str, Optional[bool]] = {
    "fd": False,
    "fd_floor": False,
    "kid_mean": False,
    "kid_std": None,
    "is_mean": True,
    "is_std": None,
    "precision": True,
    "recall": True,
    "density": True,
    "coverage": True,
    "clip_score": True,
    "fd_inf": False,
    "vendi": True,
    "vendi_per_prompt": True,
}
# other keys, first matching pattern wins (re.fullmatch on the whole key)
_DIRECTIONS: tuple[tuple[str, Optional[bool]], ...] = (
    (r"metrics/fid(_inf)?", False),
    (r"metrics/cmmd", False),
    (r"metrics/prompt_accuracy", True),
    (r"metrics/(pickscore|hpsv2|imagereward)", True),
    (r"metrics/sec_per_image|metrics/.*_seconds", False),
    (r"metrics/num_.*", None),
    # attention: a map's IoU with its own object's mask; the swapped control (IoU with the *other* object's mask)
    # is better low; the ceiling (a perfect map at that resolution) and entropies/shares/counts describe, not score
    (r"attention/miou_swapped", False),
    (r"attention/miou_ceiling_.*", None),
    (r"attention/miou(_.*)?", True),
    # latent: PSNRs, AUROCs and flip rate higher; FPR at 95 % TPR and perceptual path length lower
    (r"latent/(recon|inversion)_psnr(_min)?", True),
    (r"latent/ood_auroc_.*", True),
    (r"latent/ood_fpr95_.*", False),
    (r"latent/ppl_.*", False),
    (r"latent/direction_flip_rate", True),
    # schedule/trajectory_*: a (solver, steps, schedule option)'s error against the run's reference solution
    (r"schedule/trajectory_(rmse|feature_distance)", False),
    (r"schedule/trajectory_psnr", True),
    (r"schedule/sec_per_image", False),  # a timing, like metrics/sec_per_image (never ranked: is_timing)
    # other schedule/*: properties of a noise schedule (schedule/order/<solver>, schedule/curvature_max included),
    # latent/*_norm_ratio_mid, ood_shrinkage, cost/nfe and counts: no direction
)


def higher_is_better(key: str) -> Optional[bool]:
    """True when a larger value of result ``key`` is better, False when a smaller one is, None when the key has
    no direction (counts, spreads, interval bounds, schedule properties, unknown keys)."""
    if key.endswith(CI_SUFFIXES):
        return None
    parsed = parse_key(key)
    if parsed is not None:
        return STAT_HIGHER_IS_BETTER.get(parsed[0])
    return next((better for pattern, better in _DIRECTIONS if re.fullmatch(pattern, key)), None)


# the scalars an end-of-run summary shows, in this order, where a run has them (the primary FD comes first)
HEADLINES = (
    FID,
    PROMPT_ACCURACY,
    *(PREFIX + s for s in PREFERENCE_SCORERS),
    SEC_PER_IMAGE,
    "attention/miou",
    "attention/miou_swapped",
    "latent/recon_psnr",
    "latent/inversion_psnr",
    "latent/ood_auroc_best",
    "latent/direction_flip_rate",
    "schedule/log_snr_max",
    "schedule/log_snr_min",
    "schedule/terminal_snr",
    "schedule/trajectory_rmse",
    "schedule/trajectory_psnr",
    "cost/nfe",
)


def headline_keys(results: Mapping[str, Any], primary: Any = None) -> list[str]:
    """The keys of ``results`` worth a line in a summary: ``metrics/fd_<primary extractor>`` (``primary``: anything
    :func:`primary_extractor` reads), then :data:`HEADLINES`."""
    first = primary_fd_key(primary)
    return [k for k in dict.fromkeys([first, *HEADLINES]) if k is not None and k in results]


# --------------------------------------------------------------------------------------------- timing, sample size
# wall-clock figures: they differ between any two runs of one config, so they are shown, never compared
# (pipeline.run.reproduce), and never make two runs of one config different points of a sweep plot
TIMING_MARKERS = ("seconds", "sec_per_image", "_time")
# statistics whose value depends on the number of generated samples N (FD falls as N grows; KID's estimate and its
# spread move with N and the subset size, capped at N): runs at different N are not comparable on them
N_BIASED_STATS = ("fd", "fd_floor", "kid_mean", "kid_std")
NUM_SAMPLES_PARAM = "mode.metrics.num_samples"  # the requested N; NUM_SAMPLES is the count of valid images


PROGRESS_PREFIX = "progress/"  # live progress of a long run: MLflow-only stepped metrics, never results
SYSTEM_PREFIX = "system/"  # MLflow's system metrics (tracking.system_metrics): CPU, memory, disk, GPU over time


def is_progress(key: str) -> bool:
    """An MLflow-only stepped metric, never a result: live progress (``progress/samples_done``,
    ``progress/images_per_s``) and MLflow's system metrics (``system/cpu_utilization_percentage``). Shown while a run
    runs and in the MLflow UI, never in results.json, compared or ranked.

    >>> is_progress("progress/samples_done"), is_progress("system/cpu_utilization_percentage"), is_progress("metrics/fd_clip")
    (True, True, False)
    """
    return key.startswith((PROGRESS_PREFIX, SYSTEM_PREFIX))


def is_timing(key: str) -> bool:
    """A measured figure that differs between two runs of one config: wall clock (``metrics/sec_per_image``,
    ``metrics/*_seconds``) and every measured ``cost/*`` key (memory, energy, throughput; not ``cost/nfe`` or
    ``cost/flops_per_image``, which are counted). ``metrics/num_shards`` is not one: it says how a run was split.

        >>> is_timing("metrics/sec_per_image"), is_timing("metrics/generation_seconds"), is_timing("metrics/num_shards")
        (True, True, False)
    """
    if is_cost(key):  # cost/*: measured (wall clock, memory, energy) unless counted (NFE, FLOPs)
        return key not in COUNTED_COSTS
    return any(m in key for m in TIMING_MARKERS)


def is_n_biased(key: str) -> bool:
    """FD or KID (any extractor, and ``metrics/fid``): values at different N are not comparable.

    >>> is_n_biased("metrics/fid"), is_n_biased("metrics/kid_mean_clip"), is_n_biased("metrics/precision_clip")
    (True, True, False)
    """
    if key == FID:
        return True
    parsed = parse_key(key)
    return parsed is not None and parsed[0] in N_BIASED_STATS


# --------------------------------------------------------------------------------------------- cost, quality
# the cost axes of a quality-versus-cost frontier (pipeline.record.sweep_summary): denoiser evaluations per image,
# the hardware-independent cost (Heun: 2 per step but the last; classifier-free guidance doubles the batch, not the
# NFE), and the mode's measured seconds per image (a timing: shown, never ranked)
COST_NFE = "cost/nfe"
# what a run costs, per image (pipeline.models.cost; docs/cost.md). Counted costs are the same for every run of a
# config (NFE; FLOPs of the denoiser); every other cost/* key is measured (wall clock, memory, energy) and differs
# between any two runs of one config, so it is treated as a timing: shown, never compared or ranked
COST_PREFIX = "cost/"
COST_FLOPS = "cost/flops_per_image"  # the denoiser's FLOPs of one image's generation (one call counted x NFE)
COST_SEC_PER_IMAGE = "cost/sec_per_image"  # wall seconds per image: generation + feature extraction
COST_PHASES = ("text_encoding", "denoising", "decoding", "features")  # cost/sec_per_image_<phase>
COST_BATCH_P50 = "cost/batch_seconds_p50"
COST_BATCH_P95 = "cost/batch_seconds_p95"
COST_IMAGES_PER_SECOND = "cost/images_per_second"
COST_ACHIEVED_TFLOPS = "cost/achieved_tflops"  # denoiser FLOPs / denoising seconds, 1e12 per second
COST_PEAK_RSS = "cost/peak_rss_mb"  # the process's peak resident memory (CPU), MiB
COST_CUDA_ALLOCATED = "cost/cuda_max_allocated_mb"  # torch.cuda.max_memory_allocated, MiB
COST_CUDA_RESERVED = "cost/cuda_max_reserved_mb"  # torch.cuda.max_memory_reserved, MiB
COST_ENERGY = "cost/energy_joules_per_image"  # NVML total energy (GPU) or RAPL (CPU package), per image
COUNTED_COSTS = (COST_NFE, COST_FLOPS)
# the cost axes a quality-versus-cost frontier may draw, in this order, where at least two configs differ in one
COST_AXES = (COST_NFE, COST_FLOPS, COST_SEC_PER_IMAGE, COST_ENERGY, COST_CUDA_ALLOCATED, COST_PEAK_RSS)


def cost_phase_key(phase: str) -> str:
    """``cost/sec_per_image_<phase>`` for a phase of :data:`COST_PHASES`.

    >>> cost_phase_key("denoising")
    'cost/sec_per_image_denoising'
    """
    if phase not in COST_PHASES:
        raise ValueError(f"unknown cost phase {phase!r}; expected one of {COST_PHASES}")
    return f"{COST_SEC_PER_IMAGE}_{phase}"


def is_cost(key: str) -> bool:
    """A ``cost/*`` key (NFE, FLOPs, seconds, memory, energy): a cost axis, never a quality."""
    return key.startswith(COST_PREFIX)


SCHEDULE_SEC_PER_IMAGE = "schedule/sec_per_image"
SECONDS_PER_IMAGE = (SEC_PER_IMAGE, SCHEDULE_SEC_PER_IMAGE)
TRAJECTORY_RMSE = "schedule/trajectory_rmse"  # final latent vs the reference solution (lower is better)
TRAJECTORY_PSNR = "schedule/trajectory_psnr"  # decoded image vs the reference's, dB (higher is better)
TRAJECTORY_FEATURE_DISTANCE = "schedule/trajectory_feature_distance"  # in the run's feature space (lower)
QUALITY_MODES = ("metrics/", "schedule/")  # the modes whose results say how good a sampler's images are
NOT_RANKED_STATS = ("fd_floor",)  # FD between two halves of the *reference* set: no property of the sampler


def seconds_key(key: str) -> str:
    """The seconds-per-image key of the mode that logged ``key``: a sampler's cost in time beside its quality.

    >>> seconds_key("schedule/trajectory_rmse"), seconds_key("metrics/fd_clip")
    ('schedule/sec_per_image', 'metrics/sec_per_image')
    """
    return SCHEDULE_SEC_PER_IMAGE if key.startswith("schedule/") else SEC_PER_IMAGE


def is_quality(key: str) -> bool:
    """A result that says how good a sampler's output is, so a quality-versus-cost frontier may rank it: a key of
    :data:`QUALITY_MODES` with a direction (:func:`higher_is_better`) that is no timing, interval bound, progress
    figure, count or reference-only statistic (``fd_floor``). ``cost/nfe`` is the cost axis, not a quality.

    >>> [is_quality(k) for k in ("metrics/fd_clip", "schedule/trajectory_rmse", "metrics/sec_per_image",
    ...                          "metrics/fd_floor_clip", "cost/nfe", "schedule/curvature_max", "attention/miou")]
    [True, True, False, False, False, False, False]
    """
    if not key.startswith(QUALITY_MODES) or key.endswith(CI_SUFFIXES) or is_timing(key) or is_progress(key):
        return False
    parsed = parse_key(key)
    if parsed is not None and parsed[0] in NOT_RANKED_STATS:
        return False
    return higher_is_better(key) is not None
