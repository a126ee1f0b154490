"""Summary of a sweep: one table row per child run, and the plots that fit what was swept.

Used twice: by :class:`pipeline.record.sweep.SweepCallback` at the end of a multirun (the CSV and the plots become
artifacts of the parent MLflow run and files in the sweep dir) and by ``python -m pipeline.record.compare``, which
builds the same rows from any MLflow store. Everything here works on the MLflow run objects alone (params,
metrics, tags), never on local run directories.

A row is a flat dict: ``run_id``, ``run_name``, ``status``, every ``choice.<group>``, the config params that
vary across the runs (``sampler.num_inference_steps``, ``model.path``, ...; None where a run lacks one), the
requested sample count N (``mode.metrics.num_samples``), the run's primary extractor (tag
``metrics.primary_extractor``, where the run has one), all metrics (keys with a ``/``: ``metrics/fd_shapes_net``)
and ``error`` for a failed run. Failed runs stay in the table and are left out of the plots.

Every plot states N; runs at different N are never one line (:func:`mixed_n_warning` says when FD/KID of
different N are compared), and runs of one config that differ only in timing are one point, never two joined.

Runs are sorted and plotted by ``metrics/fd_<primary extractor>`` (:func:`fd_key`, key grammar in
``pipeline.core.metric_keys``). Ranking (which run wins, the parent's ``best.<key>``, the report's best values) has one
rule (:func:`rank`, issue 29): only :func:`is_ranked` keys (quality scores with a registered direction; never timings,
``cost/*``, counts, interval bounds or ``fd_floor``), never a key whose values are equal across the finished runs,
and a best equal to the runner-up is a tie that names every tied run.

Quality-versus-cost frontiers (issue 28, "which solver and how many steps"): every quality metric
(``pipeline.core.metric_keys.is_quality``: the metrics mode's scores and the schedule mode's trajectory errors) against
each cost axis its configs differ in (``cost/nfe``, ``cost/flops_per_image``, seconds per image, energy, memory:
``pipeline.core.metric_keys.COST_AXES``, at most four panels), one point per config, the Pareto front marked (one
row per metric of ``sweep_frontiers.png``, where the configs differ in NFE or FLOPs), and per metric the sentence
naming the best config and the cheapest one within its 95 % interval (:func:`frontier_findings`,
``sweep_frontiers.md``). The schedule runs' visited steps (artifact ``tables/visited_steps.csv``) are stacked per
child (:func:`visited_plot`).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from pipeline.core.escape import csv_cell, csv_row, csv_uncell, mpl_label, mpl_text, shorten, terminal_text
from pipeline.core.metric_keys import (
    CI_SUFFIXES,
    COST_AXES,
    COST_CUDA_ALLOCATED,
    COST_ENERGY,
    COST_FLOPS,
    COST_NFE,
    COST_PEAK_RSS,
    COST_SEC_PER_IMAGE,
    COUNTED_COSTS,
    FID,
    FID_INF,
    INCEPTION,
    NUM_SAMPLES,
    NUM_SAMPLES_PARAM,
    PRIMARY_EXTRACTOR_TAG,
    PROMPT_ACCURACY,
    SEC_PER_IMAGE,
    SECONDS_PER_IMAGE,
    higher_is_better,
    is_n_biased,
    is_progress,
    is_quality,
    is_timing,
    metric_key,
    parse_key,
    seconds_key,
)
from pipeline.core.metric_keys import label as metric_label
from pipeline.record.ranking import finite as _finite
from pipeline.record.ranking import winner_lines

log = logging.getLogger(__name__)

STEPS = "sampler.num_inference_steps"
GUIDANCE = "sampler.guidance_scale"
CHECKPOINT = "model.path"
SCHEDULER = "choice.scheduler"
PRIMARY = PRIMARY_EXTRACTOR_TAG  # the row column holding a run's primary extractor
FIXED_COLUMNS = ("run_id", "run_name", "status", "error")
FAILED_STATUSES = ("FAILED", "KILLED")
TABLE_NAME = "sweep_summary.csv"


# --------------------------------------------------------------------------------------------- rows
def parse_value(text: Any) -> Any:
    """An MLflow param (always a string) as int or float where it is one, so columns sort numerically."""
    if not isinstance(text, str):
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def is_metric(key: str) -> bool:
    return "/" in key  # metrics are logged as <mode>/<name>; params are dot keys


def _logged_config(params: dict[str, str]) -> bool:
    """Whether a run logged its resolved config (a job that failed on its config has only ``choice.*``)."""
    return any(not k.startswith("choice.") for k in params)


def _blocks(params: dict[str, str]) -> set[str]:
    """Every config block a run has keys under: ``mode.metrics`` for ``mode.metrics.num_samples``, ``mode``, ..."""
    out = {""}
    for key in params:
        parts = key.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return out


def _expects(params: dict[str, str], blocks: set[str], key: str) -> bool:
    """Whether a run should have param ``key``: it logged a config whose block holding ``key`` exists (a run without
    ``mode.metrics`` did not select the metrics mode; its ``choice.mode`` says so) and ``key`` is not a block of
    its own there (``mode.metrics: None`` in one run, ``mode.metrics.num_samples`` in another)."""
    return key in params or (key not in blocks and key.rpartition(".")[0] in blocks)


def varying_params(children: Iterable[Any]) -> list[str]:
    """Config params (not ``choice.*``) with more than one value among the runs that logged a config, counting a
    param missing from a run that has its block as a value of its own (shown empty): e.g. a key one code version
    logs and another does not. A mode's params do not count as missing where the run did not select that mode."""
    configs = [(p, _blocks(p)) for p in (dict(run.data.params) for run in children) if _logged_config(p)]
    values: dict[str, set[Optional[str]]] = {}
    for params, _ in configs:
        for key, value in params.items():
            if not key.startswith("choice."):
                values.setdefault(key, set()).add(value)
    for key, seen in values.items():
        if any(key not in params and _expects(params, blocks, key) for params, blocks in configs):
            seen.add(None)
    return sorted(k for k, v in values.items() if len(v) > 1)


def child_rows(children: list[Any]) -> list[dict[str, Any]]:
    """One row per run, in start order: choices, the params that vary across ``children`` (None where a run lacks
    one it should have), the requested sample count N (``mode.metrics.num_samples``, always, where logged),
    metrics, error."""
    children = sorted(children, key=lambda r: r.info.start_time or 0)
    varying = varying_params(children)
    rows = []
    for run in children:
        params = run.data.params
        row: dict[str, Any] = {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status}
        row.update(
            {
                k: parse_value(v)
                for k, v in sorted(params.items())
                if k.startswith("choice.") and not k.startswith("choice.hydra")
            }
        )
        blocks = _blocks(params) if _logged_config(params) else set()
        row.update({k: parse_value(params.get(k)) for k in varying if _expects(params, blocks, k)})
        if NUM_SAMPLES_PARAM in params:
            row[NUM_SAMPLES_PARAM] = parse_value(params[NUM_SAMPLES_PARAM])
        if run.data.tags.get(PRIMARY):
            row[PRIMARY] = run.data.tags[PRIMARY]
        row.update(dict(sorted((k, v) for k, v in run.data.metrics.items() if not is_progress(k))))
        if "error" in run.data.tags:
            row["error"] = run.data.tags["error"]
        rows.append(row)
    return rows


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of every row: fixed columns, choices, varying params, metrics, error last."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    params = [k for k in keys if k not in FIXED_COLUMNS and not is_metric(k)]
    choices = [k for k in params if k.startswith("choice.")]
    return (
        [k for k in FIXED_COLUMNS[:3] if k in keys]
        + choices
        + [k for k in params if k not in choices]
        + [k for k in keys if is_metric(k)]
        + (["error"] if "error" in keys else [])
    )


def _group(key: str) -> str:
    """The config group a column belongs to: ``choice.model`` and ``model.path`` -> ``model``. Each
    ``sampler.*`` key is its own group (steps and guidance are independent knobs, not one group choice)."""
    if key.startswith("choice."):
        return key[len("choice.") :]
    return key if key.startswith("sampler.") else key.split(".")[0]


def _distinct(rows: list[dict[str, Any]], key: str) -> set[str]:
    return {str(r[key]) for r in rows if key in r}


def _implied(rows: list[dict[str, Any]], key: str, choice: str) -> bool:
    """Whether ``key`` follows from ``choice``: the runs that share a choice value share ``key``'s value."""
    seen: dict[str, str] = {}
    for r in rows:
        if choice in r and seen.setdefault(str(r[choice]), str(r.get(key))) != str(r.get(key)):
            return False
    return True


def swept(rows: list[dict[str, Any]]) -> list[str]:
    """The columns that say what was swept: every varying choice and every varying param (a param a run lacks
    counts as a value: shown empty), except a param that merely follows from a varying choice of its group
    (``scheduler.cls`` says nothing that ``choice.scheduler`` does not). ``model.path`` under a fixed
    ``choice.model`` is a checkpoint sweep; the ``mode.*`` params are never hidden behind ``choice.mode`` (it says
    which modes ran, not with what settings: ``mode.metrics.num_samples`` differs across mode choices too)."""
    keys = [k for k in columns(rows) if k not in FIXED_COLUMNS and not is_metric(k) and len(_distinct(rows, k)) > 1]
    choices = {_group(k): k for k in keys if k.startswith("choice.")}
    return [
        k
        for k in keys
        if k.startswith("choice.")
        or _group(k) == "mode"
        or _group(k) not in choices
        or not _implied(rows, k, choices[_group(k)])
    ]


def primary_extractor(rows: list[dict[str, Any]]) -> Optional[str]:
    """The extractor whose FD ranks and plots ``rows``: the most common ``metrics.primary_extractor`` among them
    (ties: the earliest row's). Rows without that tag (fabricated, or older runs): the extractor of their
    ``metrics/fd_<extractor>`` keys, Inception's where there are several, else the most common (ties: by name)."""
    tagged = [str(r[PRIMARY]) for r in rows if r.get(PRIMARY)]
    if tagged:
        return max(dict.fromkeys(tagged), key=tagged.count)
    counts: dict[str, int] = {}
    for row in rows:
        for key in row:
            parsed = parse_key(key)
            if parsed is not None and parsed[0] == "fd":
                counts[parsed[1]] = counts.get(parsed[1], 0) + 1
    return min(counts, key=lambda n: (n != INCEPTION, -counts[n], n)) if counts else None


def fd_key(rows: list[dict[str, Any]]) -> Optional[str]:
    """``metrics/fd_<primary extractor>`` of ``rows`` (see :func:`primary_extractor`); None without one."""
    name = primary_extractor(rows)
    return None if name is None else metric_key("fd", name)


def finished(rows: list[dict[str, Any]], *metrics: str) -> list[dict[str, Any]]:
    """Rows of runs that finished with every one of ``metrics`` finite: the rows a plot may show."""
    return [
        r
        for r in rows
        if r.get("status") == "FINISHED"
        and all(isinstance(r.get(m), (int, float)) and math.isfinite(r[m]) for m in metrics)
    ]


def write_table(rows: list[dict[str, Any]], path: Path) -> Path:
    """The rows as CSV, :func:`columns` order. Run names, errors and param values are user text: a text cell a
    spreadsheet would evaluate gets a leading ``'`` (:func:`pipeline.core.escape.csv_cell`, OWASP); numbers stay."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = columns(rows)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([csv_cell(k) for k in fields])
        writer.writerows(csv_row(row, fields) for row in rows)
    return path


# --------------------------------------------------------------------------------------------- plots
def _short(key: str) -> str:
    return key.split("/")[-1] if is_metric(key) else key.split(".")[-1]


def checkpoint_label(path: Any) -> str:
    """The checkpoint directory name of a ``model.path`` (``.../shapes_sd_ckpt/step_00250`` -> ``step_00250``)."""
    return Path(str(path).rstrip("/")).name or str(path)


def checkpoint_labels(paths: Iterable[Any]) -> dict[Any, str]:
    """``{path: label}``: the directory name, or the last two path parts where two paths share a name."""
    paths = set(paths)
    names = {p: checkpoint_label(p) for p in paths}
    clash = {n for n in names.values() if list(names.values()).count(n) > 1}
    return {p: "/".join(str(p).rstrip("/").split("/")[-2:]) if n in clash else n for p, n in names.items()}


def _checkpoint_order(label: str) -> tuple:
    """Training order: ``step_<n>`` checkpoints by n, anything else (the final model) after them."""
    m = re.search(r"(\d+)$", label)
    return (0, int(m.group(1)), label) if m and "step" in label else (1, 0, label)


def _series(rows: list[dict[str, Any]], x_key: str) -> dict[str, list]:
    """Rows split into one series per combination of the other swept columns (not ``x_key``'s group): runs at
    different N are never one line."""
    keys = [k for k in swept(rows) if _group(k) != _group(x_key)]
    series: dict[str, list] = {}
    for row in rows:
        parts = []
        for k in keys:
            value = checkpoint_label(row.get(k)) if k == CHECKPOINT else row.get(k, "?")
            name = "N" if k == NUM_SAMPLES_PARAM else _short(k)
            parts.append(str(value) if k == SCHEDULER else f"{name}={'' if value is None else value}")
        series.setdefault(", ".join(parts) or str(row.get(SCHEDULER, "runs")), []).append(row)
    return series


def sample_size(row: dict[str, Any]) -> Optional[int]:
    """A run's N: the requested ``mode.metrics.num_samples``, else the logged ``metrics/num_samples``."""
    for key in (NUM_SAMPLES_PARAM, NUM_SAMPLES):
        if isinstance(row.get(key), (int, float)) and math.isfinite(row[key]):
            return int(row[key])
    return None


def n_note(rows: list[dict[str, Any]]) -> str:
    """N of the plotted runs, for a plot's title: ``N = 256``, or ``N = 32, 256`` with a bias note."""
    sizes = sorted({n for n in map(sample_size, rows) if n is not None})
    if not sizes:
        return "N not recorded"
    text = f"N = {', '.join(map(str, sizes))}"
    return text if len(sizes) == 1 else f"{text}: FD/KID biased in N, compare at equal N"


def mixed_n_warning(rows: list[dict[str, Any]]) -> Optional[str]:
    """A warning when finished runs report FD/FID/KID (:func:`pipeline.core.metric_keys.is_n_biased`) at different N."""
    sizes = sorted(
        {
            sample_size(r)
            for r in rows
            if r.get("status") == "FINISHED" and sample_size(r) is not None and any(is_n_biased(k) for k in r)
        }
    )
    if len(sizes) < 2:
        return None
    return (
        f"FD/FID/KID of these runs come from different sample counts N = {', '.join(map(str, sizes))}: they are "
        "biased in N (FD falls as N grows), so only runs at the same N compare"
    )


def _points(series: list[dict[str, Any]], keys: list[str], x: Callable[[dict], float], y: str) -> list[tuple]:
    """``(x, y, [(x_i, y_i), ...], rows)`` per distinct config of ``series`` (``keys``: the columns that tell configs
    apart, never a timing): repeats of one config, which differ only in timing, are one point at their mean,
    never two points joined by a line."""
    groups: dict[tuple, list] = {}
    for r in series:
        groups.setdefault(tuple(str(r.get(k)) for k in keys if not is_timing(k)), []).append(r)
    return [
        (sum(map(x, rs)) / len(rs), sum(r[y] for r in rs) / len(rs), [(x(r), r[y]) for r in rs], rs)
        for rs in groups.values()
    ]


def _draw(ax, points: list[tuple], label: str):
    """The line through ``points`` (in the given order) and each repeated config's runs as hollow markers.
    ``label`` (swept values: user text) is escaped here."""
    (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=mpl_label(label))
    for _, _, runs, _ in points:
        if len(runs) > 1:
            ax.scatter([r[0] for r in runs], [r[1] for r in runs], s=18, facecolors="none", edgecolors=line.get_color())
    return line


def frontier_plot(rows: list[dict[str, Any]]):
    """FD of the primary extractor vs seconds per image, one line per scheduler (and per other swept value, N
    included), points in step order, each annotated with its step count (``×k``: k runs of that config)."""
    from matplotlib.figure import Figure

    fd = fd_key(rows)
    rows = finished(rows, fd, SEC_PER_IMAGE)
    keys = swept(rows)
    fig = Figure(figsize=(7, 4.8))
    ax = fig.add_subplot()
    for label, series in sorted(_series(rows, STEPS).items()):
        points = sorted(
            _points(series, keys, lambda r: r[SEC_PER_IMAGE], fd),
            key=lambda p: (str(p[3][0].get(STEPS, "")).zfill(12), p[0]),
        )  # step order
        line = _draw(ax, points, label)
        for x, y, runs, same in points:
            ax.annotate(
                mpl_text(same[0].get(STEPS, "?")) + (f" ×{len(runs)}" if len(runs) > 1 else ""),
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
                color=line.get_color(),
            )
    xs = [r[SEC_PER_IMAGE] for r in rows]
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("seconds per image (generation)")
    ax.set_ylabel(f"{mpl_text(metric_label(fd))} (lower is better)")  # the extractor name is a config string
    ax.set_title(f"quality vs cost (labels: inference steps; {n_note(rows)})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _label_metric_axis(ax, metric: str) -> None:
    better = "higher" if metric == PROMPT_ACCURACY else "lower"
    ax.set_ylabel(
        f"{'prompt accuracy' if metric == PROMPT_ACCURACY else mpl_text(metric_label(metric))} ({better} is better)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def guidance_plot(rows: list[dict[str, Any]]):
    """Prompt accuracy (and the primary FD, in a second panel) vs the classifier-free guidance scale."""
    from matplotlib.figure import Figure

    metrics = [m for m in (PROMPT_ACCURACY, fd_key(rows)) if m and finished(rows, m, GUIDANCE)]
    fig = Figure(figsize=(4.6 * len(metrics), 4))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        plotted = finished(rows, metric, GUIDANCE)
        for label, series in sorted(_series(plotted, GUIDANCE).items()):
            _draw(ax, sorted(_points(series, swept(plotted), lambda r: r[GUIDANCE], metric), key=lambda p: p[0]), label)
        ax.set_xlabel("guidance scale")
        _label_metric_axis(ax, metric)
    fig.suptitle(f"classifier-free guidance ({n_note(finished(rows, GUIDANCE))})")
    fig.tight_layout()
    return fig


def checkpoint_plot(rows: list[dict[str, Any]]):
    """The primary FD (and prompt accuracy where measured) per checkpoint, x labelled by the checkpoint
    directory name."""
    from matplotlib.figure import Figure

    fd = fd_key(rows)
    rows = finished(rows, fd)
    rows = [r for r in rows if CHECKPOINT in r]
    names = checkpoint_labels(r[CHECKPOINT] for r in rows)
    labels = sorted(set(names.values()), key=_checkpoint_order)
    metrics = [fd] + ([PROMPT_ACCURACY] if finished(rows, PROMPT_ACCURACY) else [])
    fig = Figure(figsize=(max(4.6, 1.1 * len(labels) + 2) * len(metrics), 4))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        plotted = finished(rows, metric)
        for label, series in sorted(_series(plotted, CHECKPOINT).items()):
            x = lambda r: labels.index(names[r[CHECKPOINT]])  # noqa: E731
            _draw(ax, sorted(_points(series, swept(plotted), x, metric), key=lambda p: p[0]), label)
        ax.set_xticks(range(len(labels)), [mpl_text(t) for t in labels], rotation=20, ha="right")  # dir names
        ax.set_xlabel("checkpoint")
        _label_metric_axis(ax, metric)
    fig.suptitle(f"per checkpoint ({n_note(rows)})")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- frontiers
# Which solver and how many steps (issue 28): every quality metric against the cost of a config, the Pareto front,
# and the cheapest config whose quality lies within the 95 % interval of the best.
FRONTIER_PREFIX = "sweep_frontier_"  # sweep_frontier_<short metric>.png, one per quality metric
FRONTIERS_NAME = "sweep_frontiers.md"  # the frontier sentences, in the sweep dir and on the parent run
# swept schedule options, shown by value in a config label ("dpmpp_2m × 12, karras, trailing")
SCHEDULE_OPTIONS = ("sampler.sigmas", "sampler.timestep_spacing", "sampler.zero_terminal_snr", "sampler.flow_shift")
NFE_LABEL = "NFE (denoiser evaluations per image)"
# the x-axis label of each cost axis (pipeline.core.metric_keys.COST_AXES); the seconds axis names its column
COST_LABELS = {
    COST_NFE: NFE_LABEL,
    COST_FLOPS: "denoiser FLOPs per image (cost/flops_per_image)",
    COST_ENERGY: "energy per image, J (cost/energy_joules_per_image)",
    COST_CUDA_ALLOCATED: "peak CUDA memory allocated, MiB (cost/cuda_max_allocated_mb)",
    COST_PEAK_RSS: "peak resident memory, MiB (cost/peak_rss_mb)",
}
MAX_COST_PANELS = 4  # panels per row of sweep_frontiers.png: the first that apply, in COST_AXES order
MAX_LISTED = 6  # configs named in one sentence; the rest are counted


@dataclass
class Config:
    """One distinct config of a sweep for one metric: repeats of it (which differ only in timing) averaged."""

    label: str
    value: float
    low: Optional[float]  # the 95 % interval, where every repeat has one
    high: Optional[float]
    nfe: Optional[float]  # cost/nfe
    seconds: Optional[float]  # seconds per image (:func:`_seconds_column`: cost/sec_per_image where present)
    n: Optional[int]  # sample count N
    runs: int
    costs: dict[str, float] = field(default_factory=dict)  # every cost axis column the repeats all have, at its mean


def _mean(values: list[Any]) -> Optional[float]:
    """The mean of ``values``; None when one of them is missing or not finite."""
    return sum(values) / len(values) if values and all(map(_finite, values)) else None


def _g(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.4g}"


def config_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The columns that tell one config of a sweep from another: the swept ones (:func:`swept`), never a timing."""
    return [k for k in swept(rows) if not is_timing(k)]


def _option_text(key: str, value: Any) -> Optional[str]:
    if value is None or value == "":
        return None
    if key == "sampler.zero_terminal_snr":
        return "zero-terminal SNR" if str(value).lower() in ("true", "1") else None
    if key == "sampler.flow_shift":
        return f"shift {value}"
    return str(value)


def config_label(row: dict[str, Any], keys: list[str]) -> str:
    """A config as a reader names it: ``solver × steps`` then the swept schedule options by value and any other
    swept column as ``name=value`` (``dpmpp_2m × 12, karras``; ``ddim × 25, N=256``). User text: escape it for
    the sink (``mpl_text``, ``html_text``, ``terminal_text``)."""
    head = str(row.get(SCHEDULER) or row.get("run_name") or row.get("run_id") or "?")
    if row.get(STEPS) is not None:
        head += f" × {row[STEPS]}"
    parts = [head]
    for k in keys:
        if k in (SCHEDULER, STEPS):
            continue
        value = row.get(k)
        if k in SCHEDULE_OPTIONS:
            text = _option_text(k, value)
        elif k == CHECKPOINT:
            text = checkpoint_label(value) if value is not None else None
        else:
            text = f"{'N' if k == NUM_SAMPLES_PARAM else _short(k)}={'' if value is None else value}"
        if text:
            parts.append(text)
    return ", ".join(parts)


def quality_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """The quality metrics (:func:`pipeline.core.metric_keys.is_quality`: a direction, no timing, count, bound or
    ``fd_floor``) that at least two finished runs have, sorted; ``metrics/fid`` (``fid_inf``) left out where it
    merely repeats ``metrics/fd_inception`` (``fd_inf_inception``)."""
    counts: dict[str, int] = {}
    for row in finished(rows):
        for key, value in row.items():
            if is_quality(key) and _finite(value):
                counts[key] = counts.get(key, 0) + 1
    keys = {k for k, n in counts.items() if n >= 2}
    for alias, stat in ((FID, "fd"), (FID_INF, "fd_inf")):
        if metric_key(stat, INCEPTION) in keys:
            keys.discard(alias)
    return sorted(keys)


def _seconds_column(rows: list[dict[str, Any]], metric: str) -> Optional[str]:
    """The seconds-per-image column beside ``metric`` that the rows have: a schedule metric's own
    ``schedule/sec_per_image`` first; else ``cost/sec_per_image`` (generation and feature extraction, issue 29), else
    ``metrics/sec_per_image`` (generation), else any."""
    own = seconds_key(metric)
    first = [own] if own != SEC_PER_IMAGE else []
    for key in dict.fromkeys([*first, COST_SEC_PER_IMAGE, *SECONDS_PER_IMAGE]):
        if any(_finite(r.get(key)) for r in rows):
            return key
    return None


def cost_columns(rows: list[dict[str, Any]], metric: str) -> list[str]:
    """The cost columns ``metric`` may be drawn against, in :data:`pipeline.core.metric_keys.COST_AXES` order, the
    seconds axis as :func:`_seconds_column` (which prefers ``cost/sec_per_image``)."""
    sec = _seconds_column(rows, metric)
    return [sec if key == COST_SEC_PER_IMAGE else key for key in COST_AXES if key != COST_SEC_PER_IMAGE or sec]


def _cost_label(key: str) -> str:
    return COST_LABELS.get(key) or f"seconds per image ({key})"


def frontier_configs(rows: list[dict[str, Any]], metric: str) -> list[Config]:
    """One :class:`Config` per distinct config (:func:`config_keys` over all ``rows``) among the finished runs with
    ``metric``, in start order; repeats of a config are one, at their mean (as :func:`_points`)."""
    keys = config_keys(rows)
    have = finished(rows, metric)
    sec, columns_ = _seconds_column(have, metric), cost_columns(have, metric)
    out = []
    for _, _, _, group in _points(have, keys, lambda r: 0.0, metric):
        sizes = {sample_size(r) for r in group}
        costs = {k: _mean([r.get(k) for r in group]) for k in columns_}
        out.append(
            Config(
                label=config_label(group[0], keys),
                value=sum(r[metric] for r in group) / len(group),
                low=_mean([r.get(metric + CI_SUFFIXES[0]) for r in group]),
                high=_mean([r.get(metric + CI_SUFFIXES[1]) for r in group]),
                nfe=costs.get(COST_NFE),
                seconds=costs.get(sec) if sec else None,
                n=sizes.pop() if len(sizes) == 1 else None,
                runs=len(group),
                costs={k: v for k, v in costs.items() if v is not None},
            )
        )
    return out


def pareto_front(points: list[tuple[float, float]], higher: bool) -> list[int]:
    """Indices of the non-dominated ``(cost, value)`` points, cheapest first: a point is dominated when another
    costs no more and is no worse, and is cheaper or better (``higher``: larger values are better). Equal points
    are both on the front.

        >>> pareto_front([(10, 5.0), (20, 3.0), (20, 4.0), (40, 3.0), (5, 9.0)], higher=False)
        [4, 0, 1]
    """

    def no_worse(a: float, b: float) -> bool:
        return a >= b if higher else a <= b

    front = [
        i
        for i, (c, v) in enumerate(points)
        if not any(j != i and cj <= c and no_worse(vj, v) and (cj < c or vj != v) for j, (cj, vj) in enumerate(points))
    ]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1] if higher else points[i][1]))


def _safe_name(text: str) -> str:
    """``text`` as a file-name part: letters, digits, ``_ . -`` only, at most 80 characters."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-")[:80] or "metric"


def _differs(configs: list[Config], key: str) -> bool:
    """Whether at least two configs have cost ``key`` and their values differ."""
    return len({c.costs[key] for c in configs if key in c.costs}) >= 2


def frontier_metrics(rows: list[dict[str, Any]]) -> dict[str, str]:
    """``{plot name: metric}``: a frontier row for each :func:`quality_metrics` key whose configs differ in a counted
    cost (:data:`pipeline.core.metric_keys.COUNTED_COSTS`: ``cost/nfe``, ``cost/flops_per_image``) and in value (one
    value for every config is a tie, nothing to draw). Measured costs alone (seconds, energy, memory) never make
    one: they differ between any two runs, also of one config (the FD-vs-seconds ``sweep_frontier`` plot covers runs
    without NFE). Names are safe for any key (``sweep_frontier_fd_shapes_net``); two keys with one short name get
    their mode appended."""
    out: dict[str, str] = {}
    for metric in quality_metrics(rows):
        configs = frontier_configs(rows, metric)
        if not any(_differs(configs, k) for k in COUNTED_COSTS) or len({c.value for c in configs}) < 2:
            continue
        name = FRONTIER_PREFIX + _safe_name(metric.split("/", 1)[-1])  # the key without its mode
        if name in out:
            name += "_" + _safe_name(metric.split("/", 1)[0])
        base, i = name, 2
        while name in out:
            name, i = f"{base}_{i}", i + 1
        out[name] = metric
    return out


def _cost_panels(rows: list[dict[str, Any]], metric: str, configs: list[Config]) -> list[tuple[str, Callable]]:
    """The cost axes ``metric`` is drawn against, ``(x label, config -> cost or None)``: each column of
    :func:`cost_columns` (NFE, FLOPs, seconds, energy, CUDA memory, peak RSS) that at least two configs have with
    differing values, the first :data:`MAX_COST_PANELS` of them."""
    keys = [k for k in cost_columns(finished(rows, metric), metric) if _differs(configs, k)]
    return [(_cost_label(k), lambda c, k=k: c.costs.get(k)) for k in keys[:MAX_COST_PANELS]]


def _draw_frontier(axes, rows: list[dict[str, Any]], metric: str) -> None:
    """``metric`` against each cost (one of ``axes`` each): one point per config labelled with it (``×k``: k runs),
    its 95 % interval as an error bar, and the Pareto front (:func:`pareto_front`) as a step line through its
    marked points."""
    configs = frontier_configs(rows, metric)
    higher = bool(higher_is_better(metric))
    name = mpl_text(metric_label(metric))  # the extractor name is a config string
    panels = _cost_panels(rows, metric, configs)
    for ax in list(axes)[len(panels) :]:  # a cost fewer than two configs have: no panel
        ax.set_visible(False)
    for ax, (xlabel, get) in zip(axes, panels):
        pts = [c for c in configs if get(c) is not None]
        xs, ys = [get(c) for c in pts], [c.value for c in pts]
        bars = [c for c in pts if c.low is not None and c.high is not None]
        if bars:
            ax.errorbar(
                [get(c) for c in bars],
                [c.value for c in bars],
                yerr=[[max(c.value - c.low, 0) for c in bars], [max(c.high - c.value, 0) for c in bars]],
                fmt="none",
                ecolor="0.7",
                elinewidth=1,
                label="95 % interval",
                zorder=1,
            )
        ax.scatter(xs, ys, s=24, facecolors="none", edgecolors="0.4", label="config", zorder=2)
        front = [pts[i] for i in pareto_front(list(zip(xs, ys)), higher)]
        fx, fy = [get(c) for c in front], [c.value for c in front]
        ax.step(fx, fy, where="post", color="C3", zorder=3, label="Pareto front")
        ax.scatter(fx, fy, s=36, color="C3", zorder=4)
        for c in pts:
            ax.annotate(
                mpl_text(c.label, 60) + (f" ×{c.runs}" if c.runs > 1 else ""),
                (get(c), c.value),
                textcoords="offset points",
                xytext=(4, 3),
                fontsize=7,
            )
        if min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{name} ({'higher' if higher else 'lower'} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def _frontier_size(cols: int, rows: int) -> tuple[float, float]:
    """Inches of a frontier figure: 6.4 wide per panel up to two, 5.2 from three on (four: 20.8 × 4.2 per row)."""
    return (6.4 if cols <= 2 else 5.2) * cols, (4.8 if rows == 1 else 4.2 * rows)


def frontier_metric_plot(rows: list[dict[str, Any]], metric: str):
    """One metric's frontier (:func:`_draw_frontier`) as a figure of its own."""
    from matplotlib.figure import Figure

    panels = len(_cost_panels(rows, metric, frontier_configs(rows, metric)))
    fig = Figure(figsize=_frontier_size(max(panels, 1), 1))
    _draw_frontier(fig.subplots(1, max(panels, 1), squeeze=False)[0], rows, metric)
    fig.suptitle(f"quality vs cost: {mpl_text(metric_label(metric))} ({n_note(finished(rows, metric))})", fontsize=10)
    fig.tight_layout()
    return fig


def frontiers_plot(rows: list[dict[str, Any]]):
    """Every :func:`frontier_metrics` metric's frontier, one row each, in one figure (``sweep_frontiers.png``: one
    file to open and to save however many metrics a run has)."""
    from matplotlib.figure import Figure

    metrics = list(frontier_metrics(rows).values())
    cols = max([len(_cost_panels(rows, m, frontier_configs(rows, m))) for m in metrics] + [1])
    fig = Figure(figsize=_frontier_size(cols, len(metrics)))
    axes = fig.subplots(len(metrics), cols, squeeze=False)
    for row, metric in zip(axes, metrics):
        _draw_frontier(row, rows, metric)
        row[0].set_title(mpl_text(metric_label(metric)), fontsize=9, loc="left")
    fig.suptitle(f"quality vs cost, Pareto fronts in red ({n_note(finished(rows, *metrics))})", fontsize=10)
    fig.tight_layout()
    return fig


def _names(configs: list[Config]) -> str:
    names = [terminal_text(c.label) for c in configs[:MAX_LISTED]]
    more = f" and {len(configs) - MAX_LISTED} more" if len(configs) > MAX_LISTED else ""
    return ", ".join(names) + more


def _with_interval(c: Config) -> str:
    return f"{_g(c.value)} [{_g(c.low)}, {_g(c.high)}]" if c.low is not None and c.high is not None else _g(c.value)


def frontier_findings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per quality metric (:func:`quality_metrics`) of at least two configs: which config is best and which is the
    cheapest whose value lies within the best's 95 % interval (``<key>_ci_low`` / ``_ci_high``), by NFE
    (``cost/nfe``), by seconds per image where a config lacks NFE. ``verdict``: ``cheaper`` (a cheaper config is
    within the interval), ``best is cheapest``, ``same cost`` (every config costs the same), ``no cost``,
    ``no interval`` (the best has none: only the best is named), ``tie`` (one value for every config: nothing is
    ranked) or ``mixed N`` (FD/KID from different sample counts: not ranked). ``text``: the sentence, labels
    made safe for a terminal. Timings, counts, ``fd_floor`` and keys without a direction are never ranked."""
    out = []
    for metric in quality_metrics(rows):
        configs = frontier_configs(rows, metric)
        if len(configs) < 2:
            continue
        higher = bool(higher_is_better(metric))
        found: dict[str, Any] = {"metric": metric, "configs": len(configs), "best": None, "cheapest": None}
        sizes = sorted({c.n for c in configs if c.n is not None})
        if len({c.value for c in configs}) == 1:
            found["verdict"] = "tie"
            found["text"] = f"{metric}: tie: all {len(configs)} configs give {_g(configs[0].value)}; nothing to rank"
            out.append(found)
            continue
        if is_n_biased(metric) and len(sizes) > 1:
            found["verdict"] = "mixed N"
            found["text"] = (
                f"{metric}: not ranked: the configs come from different sample counts N = "
                f"{', '.join(map(str, sizes))} (FD/KID are biased in N; compare at equal N)"
            )
            out.append(found)
            continue
        if all(c.nfe is not None for c in configs):
            basis, cost = "NFE", (lambda c: c.nfe)
        elif all(c.seconds is not None for c in configs):
            basis, cost = "seconds", (lambda c: c.seconds)
        else:
            basis, cost = None, (lambda c: 0.0)
        ranked = sorted(configs, key=lambda c: (-c.value if higher else c.value, cost(c)))
        best = found["best"] = ranked[0]
        if best.low is None or best.high is None:
            found["verdict"] = "no interval"
            found["text"] = (
                f"{metric}: best {terminal_text(best.label)} ({_g(best.value)}); "
                "no interval: cannot say which configs are equivalent"
            )
            out.append(found)
            continue
        within = [c for c in ranked if c is best or best.low <= c.value <= best.high]
        others = [c for c in within if c is not best]
        head = f"best {terminal_text(best.label)} ({_with_interval(best)})"
        if basis is None:
            found["verdict"] = "no cost"
            found["text"] = (
                f"{metric}: {head}; {len(others)} other config(s) within its 95 % interval; no cost recorded "
                f"({COST_NFE}, seconds per image): cannot name the cheapest"
            )
        elif len({cost(c) for c in configs}) == 1:
            found["verdict"] = "same cost"
            found["text"] = (
                f"{metric}: {head}; all configs cost the same ({basis} {_g(cost(best))}); within its 95 % interval: "
                f"{_names(others) if others else 'no other config'}"
            )
        else:
            cheapest = found["cheapest"] = min(within, key=lambda c: (cost(c), ranked.index(c)))
            what = (
                f"NFE {_g(cheapest.nfe)} vs {_g(best.nfe)}"
                if basis == "NFE"
                else f"{cheapest.seconds:.3g} s vs {best.seconds:.3g} s per image; no NFE recorded, so by time"
            )
            if cheapest is best:
                found["verdict"] = "best is cheapest"
                found["text"] = (
                    f"{metric}: the best, {terminal_text(best.label)} ({_with_interval(best)}), is the cheapest "
                    f"config within its own 95 % interval ({basis} {_g(cost(best))}); "
                    f"{len(others)} other config(s) lie within it"
                )
            else:
                ratio = cost(cheapest) / cost(best) if cost(best) > 0 else math.nan
                found["verdict"] = "cheaper"
                found["text"] = (
                    f"{metric}: {terminal_text(cheapest.label)} ({_g(cheapest.value)}) is within the 95 % interval "
                    f"of the best, {terminal_text(best.label)} ({_with_interval(best)}), at {ratio:.2g}× its "
                    f"{'cost' if basis == 'NFE' else 'time'} ({what})"
                )
        out.append(found)
    return out


def frontier_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The sentences of :func:`frontier_findings` (safe for a terminal; escape them for HTML)."""
    return [f["text"] for f in frontier_findings(rows)]


def write_frontiers(lines: list[str], path: Path) -> Path:
    """``sweep_frontiers.md``: the frontier sentences and how to read them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = [
        "# Quality versus cost",
        "",
        "Per quality metric: the best config and the cheapest config (by NFE, `cost/nfe`; by seconds per image",
        "where NFE was not recorded) whose value lies within the best's 95 % interval. Without an interval only",
        "the best is named; one value for every config is a tie.",
        "",
        *(f"- {line}" for line in lines),
        "",
    ]
    path.write_text("\n".join(text), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- visited steps
VISITED_ARTIFACT = "tables/visited_steps.csv"  # a schedule run's visited steps (one row per step of each config)
VISITED_COLUMNS = ("config", "solver", "sigmas", "spacing", "steps", "step", "timestep", "sigma", "log_snr")
VISITED_PLOT = "sweep_visited"
VISITED_TABLE = "sweep_visited_steps.csv"
MAX_VISITED_ROWS = 50_000  # rows read from one child's table (the file is untrusted)
MAX_VISITED_LINES = 80  # rows of the figure
_TEXT_CHARS = 200  # a text cell longer than this is cut


def _whole(text: Any, name: str, low: int) -> int:
    value = float(text)
    if not math.isfinite(value) or not value.is_integer() or value < low:
        raise ValueError(f"{name} {text!r} is not a whole number >= {low}")
    return int(value)


def _real(text: Any, name: str, infinite: bool = False, low: float = -math.inf) -> float:
    value = float(text)
    if math.isnan(value) or (not infinite and math.isinf(value)) or value < low:
        raise ValueError(f"{name} {text!r} is not a number" + (f" >= {low:g}" if low > -math.inf else ""))
    return value


def _visited_row(raw: dict[str, Any]) -> dict[str, Any]:
    if any(raw.get(k) is None for k in VISITED_COLUMNS):
        raise ValueError("too few cells")
    text = {k: shorten(csv_uncell(str(raw[k])), _TEXT_CHARS) for k in ("config", "solver", "sigmas", "spacing")}
    return {
        **text,
        "steps": _whole(raw["steps"], "steps", 1),
        "step": _whole(raw["step"], "step", 0),
        "timestep": _real(raw["timestep"], "timestep"),
        "sigma": _real(raw["sigma"], "sigma", infinite=True, low=0.0),  # zero-terminal SNR: ᾱ = 0, σ = inf
        "log_snr": _real(raw["log_snr"], "log_snr", infinite=True),  # σ = 0: +inf
    }


def read_visited(path: Path, name: str = "") -> list[dict[str, Any]]:
    """The rows of one child's ``visited_steps.csv`` (:data:`VISITED_COLUMNS`), parsed defensively: the file is
    untrusted, so a row with a missing or malformed number (``steps`` and ``step`` whole, ``timestep`` finite,
    ``sigma`` >= 0 or inf, ``log_snr`` a number or ±inf) is skipped, with one warning per file naming how many
    and the first; a file without the columns is skipped with a warning; at most :data:`MAX_VISITED_ROWS` rows.
    Text cells come back as written (:func:`pipeline.core.escape.csv_uncell`), cut at 200 characters."""
    out: list[dict[str, Any]] = []
    bad, first = 0, ""
    who = terminal_text(name or path)
    try:
        with Path(path).open(newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            header = [csv_uncell(h) for h in reader.fieldnames or []]
            missing = [c for c in VISITED_COLUMNS if c not in header]
            if missing:
                log.warning("sweep summary: %s: %s lacks columns %s; not stacked", who, VISITED_ARTIFACT, missing)
                return []
            reader.fieldnames = header
            for line, raw in enumerate(reader, start=2):
                if len(out) >= MAX_VISITED_ROWS:
                    log.warning("sweep summary: %s: %s cut at %d rows", who, VISITED_ARTIFACT, MAX_VISITED_ROWS)
                    break
                try:
                    out.append(_visited_row(raw))
                except (TypeError, ValueError) as e:
                    bad += 1
                    first = first or f"line {line}: {e}"
    except (OSError, csv.Error, UnicodeError) as e:
        log.warning("sweep summary: %s: could not read %s (%s); kept %d rows", who, VISITED_ARTIFACT, e, len(out))
    if bad:
        log.warning(
            "sweep summary: %s: skipped %d malformed row(s) of %s (first: %s)",
            who,
            bad,
            VISITED_ARTIFACT,
            terminal_text(first),
        )
    return out


def _schedule_run(run: Any) -> bool:
    return any(k.startswith("schedule/") for k in run.data.metrics) or "schedule" in str(
        run.data.params.get("choice.mode", "")
    )


def _visited_file(run: Any, client: Any, tmp_dir: Optional[Path]) -> Optional[Path]:
    """A child's ``visited_steps.csv``: in its run dir (tag ``run_dir``) where that is on this machine, else
    downloaded from its MLflow artifacts with ``client`` (None: not fetched)."""
    run_dir = run.data.tags.get("run_dir")
    if run_dir and (Path(run_dir) / VISITED_ARTIFACT).is_file():
        return Path(run_dir) / VISITED_ARTIFACT
    if client is None or tmp_dir is None:
        return None
    dst = Path(tmp_dir) / _safe_name(run.info.run_id)
    dst.mkdir(parents=True, exist_ok=True)
    folder = VISITED_ARTIFACT.rpartition("/")[0]
    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")}
    try:
        listing = getattr(client, "list_artifacts", None)
        if listing is not None and VISITED_ARTIFACT not in {a.path for a in listing(run.info.run_id, folder)}:
            return None  # no request that must fail for runs without the table
        with _environ(quiet):  # no progress bar per child at the end of a sweep (unless asked for)
            return Path(client.download_artifacts(run.info.run_id, VISITED_ARTIFACT, str(dst)))
    except Exception:  # noqa: BLE001 - a run without the artifact, or a store that cannot serve it
        log.debug("sweep summary: no %s for run %s", VISITED_ARTIFACT, run.info.run_id, exc_info=True)
        return None


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """``os.environ`` updated with ``values`` inside the block, restored after it."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def visited_tables(
    children: list[Any], client: Any = None, tmp_dir: Optional[Path] = None
) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """``(run name, run id, rows)`` per finished schedule child that has ``tables/visited_steps.csv`` with at
    least one good row (:func:`read_visited`), in start order. ``client``: an MLflow client to download the
    artifact with where the run dir is not on this machine (``download_artifacts(run_id, path, dst_path)``)."""
    out = []
    for run in sorted(children, key=lambda r: r.info.start_time or 0):
        if run.info.status != "FINISHED" or not _schedule_run(run):
            continue
        path = _visited_file(run, client, tmp_dir)
        if path is None:
            continue
        rows = read_visited(path, run.info.run_name or run.info.run_id)
        if rows:
            out.append((str(run.info.run_name or run.info.run_id), run.info.run_id, rows))
    return out


def _visited_config(row: dict[str, Any]) -> str:
    return row["config"] or ", ".join(
        x for x in (f"{row['solver']} × {row['steps']}", row["sigmas"], row["spacing"]) if x
    )


def visited_plot(tables: list[tuple[str, str, list[dict[str, Any]]]]):
    """The visited steps stacked: one row per child (one per child and config where a child drew several), x the
    log-SNR, a dot per visited step; steps at log-SNR ±∞ (σ = 0; σ = ∞ of a zero-terminal-SNR schedule) are
    counted right of the row."""
    from matplotlib.figure import Figure

    lines = []
    for name, _, rows in tables:
        by_config: dict[str, list] = {}
        for r in rows:
            by_config.setdefault(_visited_config(r), []).append(r)
        lines += [(name if len(by_config) == 1 else f"{name}: {c}", rs) for c, rs in by_config.items()]
    shown = lines[:MAX_VISITED_LINES]
    fig = Figure(figsize=(8.5, 1.6 + 0.3 * len(shown)))
    ax = fig.add_subplot()
    for i, (_, rs) in enumerate(shown):
        xs = [r["log_snr"] for r in rs if math.isfinite(r["log_snr"])]
        ax.scatter(xs, [i] * len(xs), s=12, color=f"C{i % 10}", zorder=2)
        ends = [r["log_snr"] for r in rs if math.isinf(r["log_snr"])]
        counts = [(sign, sum(1 for v in ends if v * sign > 0)) for sign in (-1, 1)]
        text = ", ".join(f"{'+' if sign > 0 else '−'}∞ ×{k}" for sign, k in counts if k)
        if text:  # right of the axes: σ = ∞ (zero-terminal SNR) and σ = 0 are off any log-SNR axis
            ax.annotate(
                text, (1.01, i), xycoords=("axes fraction", "data"), va="center", fontsize=7, annotation_clip=False
            )
    ax.set_yticks(range(len(shown)), [mpl_text(label, 70) for label, _ in shown], fontsize=8)
    ax.set_ylim(len(shown) - 0.5, -0.5)
    ax.set_xlabel("log-SNR = log(α² / σ²) of each visited step")
    ax.grid(alpha=0.3, axis="x")
    cut = f"; first {MAX_VISITED_LINES} of {len(lines)} rows" if len(lines) > len(shown) else ""
    ax.set_title(f"visited steps per child run ({VISITED_ARTIFACT}{cut})", fontsize=10)
    fig.tight_layout()
    return fig


def write_visited(tables: list[tuple[str, str, list[dict[str, Any]]]], out_dir: Path) -> tuple[Path, Path]:
    """``sweep_visited_steps.csv`` (every child's table stacked, with ``run_name`` and ``run_id`` columns; cells
    neutralised by :func:`pipeline.core.escape.csv_cell`) and ``sweep_visited.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / VISITED_TABLE
    fields = ["run_name", "run_id", *VISITED_COLUMNS]
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for name, run_id, rows in tables:
            writer.writerows(csv_row({"run_name": name, "run_id": run_id, **r}, fields) for r in rows)
    png = out_dir / f"{VISITED_PLOT}.png"
    visited_plot(tables).savefig(png, dpi=110, bbox_inches="tight")
    return table, png


def _varies(rows: list[dict[str, Any]], key: str) -> bool:
    return len(_distinct(rows, key)) > 1


def plot_kinds(rows: list[dict[str, Any]]) -> list[str]:
    """Which plots apply, judged on the finished runs only (a failed job never makes a plot appear): the
    :data:`PLOTS` that fit, then ``sweep_frontiers`` when a quality metric's configs differ in NFE or FLOPs
    (:func:`frontier_metrics`: one row of that figure each)."""
    kinds, fd = [], fd_key(rows)
    if fd and _varies(finished(rows, fd, SEC_PER_IMAGE), STEPS):
        kinds.append("sweep_frontier")
    if any(_varies(finished(rows, m), GUIDANCE) for m in (PROMPT_ACCURACY, fd) if m):
        kinds.append("sweep_guidance")
    if fd and _varies(finished(rows, fd), CHECKPOINT):
        kinds.append("sweep_checkpoints")
    return kinds + (["sweep_frontiers"] if frontier_metrics(rows) else [])


PLOTS: dict[str, Callable[[list[dict[str, Any]]], Any]] = {
    "sweep_frontier": frontier_plot,
    "sweep_guidance": guidance_plot,
    "sweep_checkpoints": checkpoint_plot,
}


def _plot(name: str, rows: list[dict[str, Any]]):
    """The figure of plot ``name`` (one of :func:`plot_kinds`)."""
    if name in PLOTS:
        return PLOTS[name](rows)
    return frontiers_plot(rows)


def plots(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``{name: matplotlib Figure}`` for each plot that applies to these rows (possibly none)."""
    return {name: _plot(name, rows) for name in plot_kinds(rows)}


def write_summary(rows: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, list[Path]]:
    """The CSV and every applicable plot (PNG) into ``out_dir``. A plot that fails is logged and skipped."""
    out_dir = Path(out_dir)
    table = write_table(rows, out_dir / TABLE_NAME)
    pngs = []
    for name in plot_kinds(rows):
        try:
            fig = _plot(name, rows)
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            pngs.append(path)
        except Exception:  # noqa: BLE001 - a plot must never cost the table
            log.warning("sweep summary: could not draw %s", name, exc_info=True)
    return table, pngs


def sentence(rows: list[dict[str, Any]], table: Path, pngs: list[Path]) -> str:
    """The last line of a sweep, e.g. ``Sweep done: all 4 jobs finished; summary table <path>, plots a.png.``"""
    n, failed = len(rows), [str(r["run_name"]) for r in rows if r["status"] != "FINISHED"]
    if not n:
        outcome = "no job was recorded"
    elif not failed:
        outcome = f"all {n} jobs finished" if n > 1 else "its job finished"
    else:
        outcome = f"{n - len(failed)} of {n} jobs finished, {len(failed)} did not ({'; '.join(failed)})"
    plots_ = f", plots {', '.join(p.name for p in pngs)}" if pngs else ""
    return f"Sweep done: {outcome}; summary table {table}{plots_}."


def summarise(tracker: Any, children: list[Any], sweep_dir: Path) -> str:
    """Table and plots into the sweep dir and onto the parent run (``tables/``, ``plots/`` artifacts), the stacked
    visited steps where children have them (``tables/sweep_visited_steps.csv``, ``plots/sweep_visited.png``;
    downloaded with ``tracker.client`` where a child's run dir is not on this machine) and the frontier sentences
    (logged, and ``sweep_frontiers.md`` at the parent's artifact root). Returns the sweep's closing
    :func:`sentence`."""
    rows = child_rows(children)
    table, pngs = write_summary(rows, sweep_dir)
    warning = mixed_n_warning(rows)
    if warning:
        log.warning("sweep summary: %s", warning)
    tracker.log_artifact(table, "tables")
    try:
        with tempfile.TemporaryDirectory(prefix="visited-") as tmp:
            tables = visited_tables(children, getattr(tracker, "client", None), Path(tmp))
        if tables:
            visited, png = write_visited(tables, sweep_dir)
            tracker.log_artifact(visited, "tables")
            pngs.append(png)
    except Exception:  # noqa: BLE001 - the visited steps must never cost the summary
        log.warning("sweep summary: could not stack the visited steps", exc_info=True)
    for png in pngs:
        tracker.log_artifact(png, "plots")
    lines = winner_lines(rows)
    if lines:
        log.info("which run wins:\n%s", "\n".join(lines))
    try:
        findings = frontier_lines(rows)
        if findings:
            log.info(
                "quality versus cost (cheapest config within the best's 95 %% interval):\n%s",
                "\n".join(f"  {line}" for line in findings),
            )
            tracker.log_artifact(write_frontiers(findings, Path(sweep_dir) / FRONTIERS_NAME))
    except Exception:  # noqa: BLE001
        log.warning("sweep summary: could not write the frontier sentences", exc_info=True)
    return sentence(rows, table, pngs)
