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

Runs are ranked and plotted by ``metrics/fd_<primary extractor>`` (:func:`fd_key`, key grammar in
``pipeline.core.metric_keys``).
"""

from __future__ import annotations

import csv
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from pipeline.core.escape import csv_cell, csv_row, mpl_label, mpl_text
from pipeline.core.metric_keys import (
    CI_SUFFIXES,
    INCEPTION,
    NUM_SAMPLES,
    NUM_SAMPLES_PARAM,
    PRIMARY_EXTRACTOR_TAG,
    PROMPT_ACCURACY,
    SEC_PER_IMAGE,
    higher_is_better,
    is_n_biased,
    is_progress,
    is_timing,
    metric_key,
    parse_key,
)
from pipeline.core.metric_keys import label as metric_label

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


def _varies(rows: list[dict[str, Any]], key: str) -> bool:
    return len(_distinct(rows, key)) > 1


def plot_kinds(rows: list[dict[str, Any]]) -> list[str]:
    """Which plots apply, judged on the finished runs only (a failed job never makes a plot appear)."""
    kinds, fd = [], fd_key(rows)
    if fd and _varies(finished(rows, fd, SEC_PER_IMAGE), STEPS):
        kinds.append("sweep_frontier")
    if any(_varies(finished(rows, m), GUIDANCE) for m in (PROMPT_ACCURACY, fd) if m):
        kinds.append("sweep_guidance")
    if fd and _varies(finished(rows, fd), CHECKPOINT):
        kinds.append("sweep_checkpoints")
    return kinds


PLOTS: dict[str, Callable[[list[dict[str, Any]]], Any]] = {
    "sweep_frontier": frontier_plot,
    "sweep_guidance": guidance_plot,
    "sweep_checkpoints": checkpoint_plot,
}


def plots(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``{name: matplotlib Figure}`` for each plot that applies to these rows (possibly none)."""
    return {name: PLOTS[name](rows) for name in plot_kinds(rows)}


def write_summary(rows: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, list[Path]]:
    """The CSV and every applicable plot (PNG) into ``out_dir``. A plot that fails is logged and skipped."""
    out_dir = Path(out_dir)
    table = write_table(rows, out_dir / TABLE_NAME)
    pngs = []
    for name in plot_kinds(rows):
        try:
            fig = PLOTS[name](rows)
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            pngs.append(path)
        except Exception:  # noqa: BLE001 - a plot must never cost the table
            log.warning("sweep summary: could not draw %s", name, exc_info=True)
    return table, pngs


def best_runs(children: list[Any]) -> dict[str, tuple[float, str]]:
    """``{result key: (best value, run id)}`` over the finished runs, for every key with a direction
    (``pipeline.core.metric_keys.higher_is_better``); ties go to the earliest run. Keys without a direction have no best."""
    best: dict[str, tuple[float, str]] = {}
    for run in sorted(children, key=lambda r: r.info.start_time or 0):
        if run.info.status != "FINISHED":
            continue
        for key, value in run.data.metrics.items():
            higher = None if is_progress(key) else higher_is_better(key)
            if higher is None or not math.isfinite(value):
                continue
            if key not in best or (value > best[key][0] if higher else value < best[key][0]):
                best[key] = (value, run.info.run_id)
    return dict(sorted(best.items()))


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


def winners(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per metric with a direction (``higher_is_better``) that at least two finished runs have: the best run, the
    runner-up, and whether the best is *separable* from it (their 95 % intervals ``<key>_ci_low/_ci_high`` are
    disjoint), a *tie* (they overlap: the data do not say which is better), or *no interval* (a metric without one;
    the order is then only the point estimates'). Interval bounds, timings and counts are never ranked."""
    done = [r for r in rows if r.get("status") == "FINISHED"]
    keys = sorted(
        {
            k
            for r in done
            for k in r
            if k.startswith("metrics/")
            and not k.endswith(CI_SUFFIXES)
            and not is_timing(k)
            and higher_is_better(k) is not None
        }
    )
    out = []
    for key in keys:
        have = [r for r in done if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if len(have) < 2:
            continue
        higher = higher_is_better(key)
        best, second = sorted(have, key=lambda r: -r[key] if higher else r[key])[:2]
        lo = [r.get(key + CI_SUFFIXES[0]) for r in (best, second)]
        hi = [r.get(key + CI_SUFFIXES[1]) for r in (best, second)]
        if None in lo or None in hi:
            verdict = "no interval"
        else:
            verdict = "separable" if (lo[0] > hi[1] if higher else hi[0] < lo[1]) else "tie"
        out.append(
            {
                "metric": key,
                "best": best.get("run_name"),
                "best_value": best[key],
                "runner_up": second.get("run_name"),
                "runner_up_value": second[key],
                "verdict": verdict,
            }
        )
    return out


def winner_lines(rows: list[dict[str, Any]]) -> list[str]:
    """``which run wins`` lines for :func:`winners` (printed by ``pipeline.record.compare`` and the sweep summary)."""
    lines = []
    for w in winners(rows):
        note = {
            "separable": "separable: the 95 % intervals are disjoint",
            "tie": "tie: the 95 % intervals overlap",
            "no interval": "no interval: point estimates only",
        }[w["verdict"]]
        lines.append(
            f"  {w['metric']}: best {w['best']} ({w['best_value']:.4g}), runner-up {w['runner_up']} "
            f"({w['runner_up_value']:.4g}) — {note}"
        )
    return lines


def summarise(tracker: Any, children: list[Any], sweep_dir: Path) -> str:
    """Table and plots into the sweep dir and onto the parent run (``tables/``, ``plots/`` artifacts). Returns the
    sweep's closing :func:`sentence`."""
    rows = child_rows(children)
    table, pngs = write_summary(rows, sweep_dir)
    warning = mixed_n_warning(rows)
    if warning:
        log.warning("sweep summary: %s", warning)
    tracker.log_artifact(table, "tables")
    for png in pngs:
        tracker.log_artifact(png, "plots")
    lines = winner_lines(rows)
    if lines:
        log.info("which run wins:\n%s", "\n".join(lines))
    return sentence(rows, table, pngs)
