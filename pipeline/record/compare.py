"""Compare the runs of a sweep (or of a whole experiment) from MLflow alone.

    python -m pipeline.record.compare <parent-run-id | experiment-name> [--tracking-uri URI] [--sort KEY] [--desc]

Prints one line per run (name, status, what was swept, the main metrics; sorted by ``--sort``, by default
``metrics/fd_<primary extractor>`` (see ``pipeline.core.metric_keys``), failed runs last), which run wins per quality
metric (``pipeline.record.ranking.winner_lines``: the one ranking rule of sweep summaries, ties as ties), and
writes the full table (``sweep_summary.csv``) and the plots that apply (quality-vs-cost frontier, guidance,
per-checkpoint) into ``--out`` (default ``<outputs>/compare/<target>``). A parent run id compares its children; an
experiment name compares every run of the experiment except sweep parents. Only MLflow is read (search_runs), never
local run directories, so sweeps tracked elsewhere (a server) work the same.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from pipeline.core.escape import terminal_text
from pipeline.core.metric_keys import (
    COST_SEC_PER_IMAGE,
    PREFERENCE_SCORERS,
    PROMPT_ACCURACY,
    SEC_PER_IMAGE,
    metric_key,
    preference_key,
)
from pipeline.errors import UserError
from pipeline.record.ranking import winner_lines
from pipeline.record.sweep_summary import (
    FAILED_STATUSES,
    child_rows,
    columns,
    fd_key,
    is_metric,
    mixed_n_warning,
    primary_extractor,
    swept,
    write_summary,
)
from pipeline.record.tracking import MlflowException, _check_reachable, open_client, redact_uri, resolve_uri

DEFAULT_SORT = "metrics/fd_<primary extractor>"  # what the default is, for --help; see default_sort()
# shown in the printed table when present (the CSV has every metric): the primary extractor's FD, timing, prompt
# accuracy, the preference scores, cost/sec_per_image, then these statistics of the primary extractor
MAIN_STATS = ("kid_mean", "clip_score", "precision", "recall")
MAX_CELL = 40
PAGE = 1000


# --------------------------------------------------------------------------------------------- MLflow
def open_store(tracking_uri: str | None, outputs: str | Path) -> tuple[Any, str]:
    """(MlflowClient, uri). A missing SQLite file is an error here, not a fresh empty store."""
    # pipeline.record.tracking is the one module that imports mlflow; it also caps HTTP retries for servers

    uri = resolve_uri(tracking_uri, outputs)  # --tracking-uri, then MLFLOW_TRACKING_URI, then <outputs>/mlflow.db
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise UserError(
            f"no MLflow store at {redact_uri(uri)} (use --tracking-uri, or --outputs for the outputs dir holding mlflow.db)"
        )
    _check_reachable(uri, 5.0)
    return open_client(uri), uri


def search_all(client: Any, experiment_ids: list[str], filter_string: str = "") -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=PAGE, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def find_runs(client: Any, target: str | None, experiment: str | None = None, uri: str = "") -> tuple[str, list[Any]]:
    """(description, runs): the children of parent run ``target`` (searched in ``experiment`` if given, else in the
    parent's own experiment), or every non-parent run of experiment ``target`` (or ``experiment`` alone)."""

    def experiment_id(name: str) -> str:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise UserError(f"experiment {name!r} not found in {redact_uri(uri)}")
        return exp.experiment_id

    parent = None
    if target:
        try:
            parent = client.get_run(target)
        except MlflowException:
            if experiment:
                raise UserError(
                    f"{target!r} is not a run id in {redact_uri(uri)} (with --experiment, TARGET is a parent run id)"
                ) from None
            if client.get_experiment_by_name(target) is None:
                raise UserError(f"{target!r} is neither a run id nor an experiment name in {redact_uri(uri)}") from None
    if parent is not None:
        exp_ids = [experiment_id(experiment)] if experiment else [parent.info.experiment_id]
        runs = search_all(client, exp_ids, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        if not runs:
            role = parent.data.tags.get("sweep.role")
            raise UserError(
                f"run {target!r} has no child runs in {redact_uri(uri)}"
                + (
                    ""
                    if role == "parent"
                    else " (not a sweep parent run: give its parent run id or an experiment name)"
                )
            )
        return f"{parent.info.run_name or 'sweep'} ({target})", runs
    name = target or experiment
    if not name:
        raise UserError("give a parent run id or an experiment name (or --experiment NAME)")
    runs = [r for r in search_all(client, [experiment_id(name)]) if r.data.tags.get("sweep.role") != "parent"]
    if not runs:
        raise UserError(f"experiment {name!r} in {redact_uri(uri)} has no runs")
    return f"experiment {name}", runs


# --------------------------------------------------------------------------------------------- table
def sort_rows(rows: list[dict[str, Any]], key: str | None, desc: bool = False) -> list[dict[str, Any]]:
    """By ``key`` (numbers, then text, then runs without it), failed/killed runs last; ties and ``key=None``
    keep start order."""

    def rank(row: dict[str, Any]) -> int:
        v = row.get(key) if key else None
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            return 0
        return 2 if v is None or v == "" else 1

    ordered = []
    for failed in (False, True):
        for r in (0, 1, 2):
            part = [row for row in rows if (row.get("status") in FAILED_STATUSES) == failed and rank(row) == r]
            if r < 2:
                part.sort(key=lambda row: row[key] if r == 0 else str(row[key]), reverse=desc)
            ordered += part
    return ordered


def main_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """The metric keys the printed table shows when present: ``metrics/fd_<primary>``, seconds per image (generation),
    prompt accuracy, the preference scores (``metrics/pickscore``, ``metrics/hpsv2``, ``metrics/imagereward``),
    ``cost/sec_per_image`` (generation and features), then ``metrics/<stat>_<primary>`` for each of
    :data:`MAIN_STATS`."""
    primary = primary_extractor(rows)
    per_extractor = [metric_key(stat, primary) for stat in ("fd", *MAIN_STATS)] if primary else []
    preference = [preference_key(s) for s in PREFERENCE_SCORERS]
    return [*per_extractor[:1], SEC_PER_IMAGE, PROMPT_ACCURACY, *preference, COST_SEC_PER_IMAGE, *per_extractor[1:]]


def default_sort(rows: list[dict[str, Any]]) -> str | None:
    """``metrics/fd_<primary extractor>`` when the runs have it, else None (start order)."""
    key = fd_key(rows)
    return key if key is not None and key in columns(rows) else None


def table_columns(rows: list[dict[str, Any]], sort: str | None = None) -> list[str]:
    """The printed columns: run, status, what was swept, the main metrics (and the sort key), error."""
    keys = columns(rows)
    metrics = [m for m in main_metrics(rows) if m in keys]
    if not metrics:  # e.g. a schedule-only sweep: the first few metrics that differ between runs
        others = [k for k in keys if is_metric(k)]
        differ = [k for k in others if len({r[k] for r in rows if isinstance(r.get(k), (int, float))}) > 1]
        metrics = (differ or others)[:4]
    if sort and sort in keys and sort not in metrics and sort not in swept(rows):
        metrics.append(sort)
    return ["run_name", "run_id", "status", *swept(rows), *metrics, *(["error"] if "error" in keys else [])]


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "run_id":
        return str(value)[:8]
    if key == "run_name" and re.match(r"job \d+: ", str(value)):
        return str(value).split(":")[0]  # "job 3: <overrides>": the swept columns show the overrides
    if isinstance(value, float):
        return f"{value:.4g}"
    # run names, errors and param values are user text: no control character reaches the terminal
    text = terminal_text(str(value).replace("\n", " "))
    if key == "model.path" and "/" in text:
        text = "…/" + "/".join(text.rstrip("/").split("/")[-2:])
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def format_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    """Aligned text: numbers right-aligned, text left-aligned."""
    cells = [[_cell(c, r.get(c)) for c in cols] for r in rows]
    heads = ["run" if c == "run_name" else "id" if c == "run_id" else terminal_text(c) for c in cols]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(heads)]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in cols]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(heads), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "target"


# --------------------------------------------------------------------------------------------- CLI
def compare(
    target: str | None,
    tracking_uri: str | None = None,
    outputs: str | Path = "outputs",
    sort: str | None = None,
    desc: bool = False,
    out: str | Path | None = None,
    experiment: str | None = None,
) -> tuple[str, list[dict[str, Any]], Path, list[Path]]:
    """(printed text, sorted rows, CSV path, plot paths). Raises UserError for anything the user can fix."""

    client, uri = open_store(tracking_uri, outputs)
    title, runs = find_runs(client, target, experiment, uri)
    rows = child_rows(runs)
    keys = columns(rows)
    if sort is not None and sort not in keys:
        available = [k for k in keys if k not in ("run_id", "error")]
        raise UserError(f"--sort {sort!r}: no such column; have {available}")
    sort_key = sort if sort is not None else default_sort(rows)
    rows = sort_rows(rows, sort_key, desc)
    out_dir = Path(out) if out is not None else Path(outputs) / "compare" / slug(target or experiment or "")
    table, pngs = write_summary(rows, out_dir)
    n_failed = sum(r["status"] in FAILED_STATUSES for r in rows)
    order = f"sorted by {sort_key}{' (descending)' if desc else ''}" if sort_key else "in start order"
    text = "\n".join(
        [
            f"{terminal_text(title)}: {len(rows)} runs, {n_failed} failed, {order}; store {redact_uri(uri)}",
            "",
            format_table(rows, table_columns(rows, sort_key)),
            "",
            *([f"warning: {warning}", ""] if (warning := mixed_n_warning(rows)) else []),
            *(
                [
                    "which run wins (per quality metric: best, runner-up; separable or tie by the 95 % intervals, "
                    "equal values a tie):",
                    *lines,
                    "",
                ]
                if (lines := winner_lines(rows))
                else []
            ),
            f"table: {table}",
            *(f"plot:  {p}" for p in pngs),
        ]
        + (
            []
            if pngs
            else [
                "plots: none apply (need metrics/fd_<primary extractor> with swept steps, guidance scale or model.path)"
            ]
        )
    )
    return text, rows, table, pngs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.record.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="?", help="parent run id of a sweep, or an MLflow experiment name")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<outputs>/mlflow.db; "
        "a server works the same)",
    )
    parser.add_argument("--outputs", default="outputs", help="outputs dir holding mlflow.db (default: outputs)")
    parser.add_argument("--sort", default=None, help=f"column to sort by (default: {DEFAULT_SORT} when present)")
    parser.add_argument(
        "--desc", action="store_true", help="sort descending (e.g. --sort metrics/prompt_accuracy --desc)"
    )
    parser.add_argument(
        "--out", default=None, help="where to write the CSV and plots (default: <outputs>/compare/<target>)"
    )
    parser.add_argument(
        "--experiment",
        default=None,
        help="experiment name: compare all its runs (without TARGET), or where to look for the "
        "children of parent run TARGET (default: the parent's experiment)",
    )
    args = parser.parse_args(argv)
    try:
        text, rows, *_ = compare(
            args.target, args.tracking_uri, args.outputs, args.sort, args.desc, args.out, args.experiment
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warning = mixed_n_warning(rows)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `python -m pipeline.record.compare ... | head`: the reader left, the files are written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
