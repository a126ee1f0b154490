"""One self-contained static HTML report per run and per sweep: ``report.html``.

The report opens from the file system with no server and no network, and in MLflow's artifact viewer, where
relative links break: every image is a ``data:`` URI, the CSS is inline, there is no script and no link to
anything outside the file (a Content-Security-Policy ``default-src 'none'`` says so to the browser too).

- :func:`write_run_report` builds ``<run_dir>/report.html`` from what the run dir holds: provenance (model,
  scheduler, steps, guidance, batch size, N, seeds, extractors with their resize modes and weights hashes,
  package versions, git commit: ``config_resolved.yaml``, ``tables/metrics_extractors.csv`` and the run's tags),
  every scalar of ``results.json`` grouped by mode with its interval (``K_ci_low`` / ``K_ci_high`` shown as
  ``value [low, high]`` in K's row; an interval that contains 0 is flagged), the sample grid, every
  ``plots/*.png``, the per-prompt table (``tables/metrics_per_prompt.csv``) and every other table.
  ``pipeline.run.runner.run_pipeline`` writes it before the artifact upload, so it is one of the run's artifacts.
- :func:`write_sweep_report` builds ``<sweep_dir>/report.html`` for a sweep's parent run: the child runs (name,
  status, what was swept, headline and preference metrics with intervals, the best marked, error), the best values
  (:func:`pipeline.record.ranking.rank`, the rule of the parent's ``best.<key>``: quality metrics only, ties
  as ties), the sweep plots and each child's sample grid. :class:`pipeline.record.sweep.SweepCallback` writes and
  logs it when the sweep ends.
- :func:`log_checkpoint_samples`: in a checkpoint sweep, each child's sample grid is logged on the parent run as
  MLflow image ``samples`` at the checkpoint's training step (:func:`checkpoint_steps`), so the MLflow UI's image
  slider steps through the checkpoints.

Every text in the page (captions, run names, tags, table cells) is HTML-escaped (:func:`pipeline.core.escape.html_text`);
a table cell that ``pipeline.core.escape.csv_cell`` quoted against spreadsheet formulas is shown as the user wrote it.

Standard library + PIL only at import time; nothing here imports mlflow (``pipeline.record.tracking`` does).
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from pipeline.core.escape import csv_uncell, html_text
from pipeline.core.metric_keys import (
    CI_SUFFIXES,
    NUM_SAMPLES_PARAM,
    PREFERENCE_SCORERS,
    headline_keys,
    higher_is_better,
    preference_key,
)
from pipeline.record.ranking import VERDICTS, equal_keys, rank, winners
from pipeline.record.sweep_summary import (
    CHECKPOINT,
    checkpoint_label,
    child_rows,
    frontier_lines,
    mixed_n_warning,
    primary_extractor,
    swept,
)
from pipeline.record.tracking import environment_tags
from pipeline.zoo import checkpoint_step

log = logging.getLogger(__name__)

__all__ = [
    "REPORT_NAME",
    "SAMPLES_KEY",
    "write_run_report",
    "write_sweep_report",
    "scalar_rows",
    "checkpoint_steps",
    "log_checkpoint_samples",
]

REPORT_NAME = "report.html"
SAMPLES_KEY = "samples"  # the MLflow image key of a checkpoint sweep's sample grids (on the parent run)
SAMPLES_PLOT = "metrics_samples.png"  # a metrics run's sample grid, under plots/
PER_PROMPT_TABLE = "metrics_per_prompt.csv"
EXTRACTORS_TABLE = "metrics_extractors.csv"
MAX_ROWS = 200  # rows of one table shown; the rest is in the CSV artifact
OPEN_ROWS = 25  # tables up to this many rows are shown expanded, longer ones collapsed
MAX_IMAGE_BYTES = 16 * 2**20  # a larger image is named, not embedded
IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
}  # never SVG: it could reference other files
TEXT_TABLES = (".md", ".txt")  # shown verbatim (schedule_findings.md)

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:0 18px 40px;color:#1d2329}
h1{font-size:22px;margin:18px 0 2px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:3px}
h3{font-size:15px;margin:16px 0 6px}.sub{color:#57606a;margin:0 0 8px}
nav{font-size:13px;margin:6px 0 0}nav a{margin-right:12px;color:#0969da;text-decoration:none}
table{border-collapse:collapse;margin:4px 0 10px;font-size:13px}
th,td{border:1px solid #d0d7de;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f6f8fa;position:sticky;top:0}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.warn td{background:#fff8c5}.note{color:#9a6700;font-weight:600}.err{color:#cf222e;font-weight:600}
.kv th{width:190px}.kv td{overflow-wrap:anywhere}.muted{color:#57606a}code,pre{font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
pre{background:#f6f8fa;border:1px solid #d0d7de;padding:8px;overflow:auto;max-height:480px}
figure{margin:8px 0 18px}figure img{max-width:100%;border:1px solid #d0d7de;image-rendering:auto}
figcaption{color:#57606a;font-size:12px}.grids{display:flex;flex-wrap:wrap;gap:14px}.grids figure{max-width:380px}
details{margin:4px 0 10px}.scroll{overflow-x:auto;max-width:100%}summary{cursor:pointer;font-weight:600}
.status-FINISHED{color:#1a7f37;font-weight:600}.status-FAILED,.status-KILLED{color:#cf222e;font-weight:600}
td.best{font-weight:700;background:#dafbe1}
"""
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


# --------------------------------------------------------------------------------------------- values
def _e(value: Any) -> str:
    """Every text in the page goes through here: user text (captions, run names, tags) is never markup."""
    return html_text(value)


def _fmt(value: Any) -> str:
    """A number to 6 significant digits (whole numbers without ``.0``); anything else as text."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.6g}"
    return str(value)


def _cell(text: str) -> tuple[str, bool]:
    """A CSV cell for display: ``(text, is_number)``; floats shortened to 6 significant digits."""
    try:
        int(text)
        return text, True
    except ValueError:
        pass
    try:
        return _fmt(float(text)), True
    except ValueError:
        return text, False


def _number(value: Any) -> Optional[float]:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out


def spans_zero(low: Optional[float], high: Optional[float]) -> bool:
    """Whether the interval [low, high] contains 0 (both bounds finite)."""
    return low is not None and high is not None and math.isfinite(low) and math.isfinite(high) and low <= 0 <= high


def scalar_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per result key, its interval folded in: ``{key, group, value, low, high, spans_zero, better}``.
    ``K_ci_low`` / ``K_ci_high`` become ``low`` / ``high`` of K's row (a bound without its K keeps a row of its own).
    ``group`` is the key up to its last ``/`` (``metrics``, ``schedule/edm``); ``better``: ``higher`` / ``lower`` /
    ``""`` (:func:`pipeline.core.metric_keys.higher_is_better`)."""
    rows = []
    for key in sorted(results):
        base = next((key[: -len(s)] for s in CI_SUFFIXES if key.endswith(s)), None)
        if base is not None and base in results:
            continue  # shown in its statistic's row
        low, high = (_number(results.get(key + s)) for s in CI_SUFFIXES)
        direction = higher_is_better(key)
        rows.append(
            {
                "key": key,
                "group": key.rpartition("/")[0] or "(no mode)",
                "value": results[key],
                "low": low,
                "high": high,
                "spans_zero": spans_zero(low, high),
                "better": "" if direction is None else ("higher" if direction else "lower"),
            }
        )
    return rows


def _value_with_interval(value: Any, low: Optional[float], high: Optional[float]) -> str:
    text = _fmt(value)
    if low is not None or high is not None:
        text += f" [{_fmt(low)}, {_fmt(high)}]"
    return text


# --------------------------------------------------------------------------------------------- html pieces
def _data_uri(path: Path) -> Optional[str]:
    kind = IMAGE_TYPES.get(path.suffix.lower())
    if kind is None or not path.is_file() or path.stat().st_size > MAX_IMAGE_BYTES:
        return None
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _figure(path: Path, caption: str) -> str:
    uri = _data_uri(path)
    if uri is None:
        why = "missing" if not path.is_file() else "too large or not an image to embed"
        return f'<p class="muted">{_e(caption)}: {_e(path.name)} ({why})</p>'
    return f'<figure><img src="{uri}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _table(header: Sequence[str], rows: Iterable[Any]) -> str:
    """``rows``: lists of already escaped cells (``<td>`` contents, or whole ``<td ...>`` cells), or
    ``(cells, css class of the row)``."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        css = ""
        if isinstance(row, tuple):
            row, css = row[0], f' class="{row[1]}"'
        body.append(f"<tr{css}>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _kv(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = [
        f"<tr><th>{_e(k)}</th><td>{v if isinstance(v, _Html) else _e(v)}</td></tr>"
        for k, v in pairs
        if v not in (None, "")
    ]
    return f'<table class="kv"><tbody>{"".join(rows)}</tbody></table>'


class _Html(str):
    """Text that is already HTML (escaped where needed)."""


def _csv_table(path: Path, open_rows: int = OPEN_ROWS) -> str:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = [csv_uncell(h) for h in next(reader, [])]
        rows = list(reader)
    shown = []
    for row in rows[:MAX_ROWS]:
        cells = []
        for text in row:
            shown_text, numeric = _cell(csv_uncell(text))  # the text as written, not its spreadsheet-safe form
            cells.append(f'<td class="num">{_e(shown_text)}</td>' if numeric else f"<td>{_e(shown_text)}</td>")
        shown.append(cells)
    note = (
        f'<p class="note">showing the first {MAX_ROWS} of {len(rows)} rows; the whole table is '
        f"{_e('tables/' + path.name)} among the artifacts</p>"
        if len(rows) > MAX_ROWS
        else ""
    )
    table = _table(header, shown) + note
    summary = f'{_e(path.name)} <span class="muted">({len(rows)} rows × {len(header)} columns)</span>'
    return f"<details{' open' if len(rows) <= open_rows else ''}><summary>{summary}</summary>{table}</details>"


def _text_block(path: Path) -> str:
    text = _e(path.read_text(errors="replace"))
    return f"<details open><summary>{_e(path.name)}</summary><pre>{text}</pre></details>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>{body}</section>'


def _page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    nav = "".join(f'<a href="#{_e(a)}">{_e(t)}</a>' for a, t, _ in sections)
    body = "".join(_section(a, t, b) for a, t, b in sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f'<header><h1>{_e(title)}</h1><p class="sub">{_e(subtitle)}</p><nav>{nav}</nav></header>'
        f"{body}</body></html>\n"
    )


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def _now() -> str:
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


# --------------------------------------------------------------------------------------------- run report
def _load_config(run_dir: Path) -> dict:
    path = run_dir / "config_resolved.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        log.warning("report: could not read %s", path)
        return {}


def _get(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{_uncell(k): _uncell(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _uncell(value: Any) -> Any:
    return csv_uncell(value) if isinstance(value, str) else value


def _features(config: Mapping[str, Any], tags: Mapping[str, str], extractor_rows: list[dict[str, str]]) -> str:
    """One row per extractor: resize mode, input size, weights hash (``weights_id``) and where the weights came
    from; ``tables/metrics_extractors.csv`` (what the run used) first, else the config and the run's tags."""
    features = _get(config, "features", {}) or {}
    names = [r.get("extractor") or r.get("name") for r in extractor_rows] or list(features)
    if not names:
        return ""
    by_name = {(r.get("extractor") or r.get("name")): r for r in extractor_rows}
    rows = []
    for i, name in enumerate(names):
        row, conf = by_name.get(name, {}), features.get(name) or {}
        hashes = {k: v for k, v in row.items() if ("weights" in k or "sha" in k or "hash" in k) and v}
        rows.append(
            [
                _e(name),
                _e(row.get("primary", "True" if i == 0 else "False")),
                _e(row.get("resize") or tags.get(f"metrics.resize.{name}") or conf.get("resize")),
                _e(row.get("input_size") or conf.get("image_size") or ""),
                _e(row.get("center_crop", "")),
                _e("; ".join(f"{k} {v}" for k, v in hashes.items()) or tags.get(f"features.{name}", "")),
                _e(conf.get("weights_path") or conf.get("model") or ""),
            ]
        )
    return _table(["extractor", "primary", "resize", "input size", "center crop", "weights hash", "weights"], rows)


def _provenance(
    config: Mapping[str, Any],
    tags: Mapping[str, str],
    params: Mapping[str, Any],
    info: Mapping[str, Any],
    results: Mapping[str, Any],
    status: Optional[str],
) -> list[tuple[str, Any]]:
    choices = {
        **{k[len("choice.") :]: v for k, v in params.items() if k.startswith("choice.")},
        **{k: v for k, v in (info.get("choices") or {}).items()},
    }
    seed = _get(config, "seed")
    n = _get(config, NUM_SAMPLES_PARAM)
    metrics_on = _get(config, "mode.metrics") is not None
    seeds = None
    if seed is not None:
        seeds = f"seed {seed}" + (
            f"; sample i uses the generator seeded seed + i ({seed} … {int(seed) + int(n) - 1})"
            if metrics_on and isinstance(n, int) and n > 0
            else ""
        )
    n_text = None
    if metrics_on:
        n_text = f"{n} requested"
        if "metrics/num_samples" in results:
            n_text += f", {_fmt(results['metrics/num_samples'])} valid"
        if results.get("metrics/num_invalid"):
            n_text += f", {_fmt(results['metrics/num_invalid'])} invalid"
        ref = _get(config, "mode.metrics.num_reference") or _get(config, "dataset.num_images")
        n_text += f"; reference images: {ref}"
    scheduler = choices.get("scheduler") or _get(config, "scheduler.name")
    cls = tags.get("sampler.class") or _get(config, "scheduler.cls")
    modes = tags.get("modes") or ",".join(k for k, v in (_get(config, "mode", {}) or {}).items() if v is not None)
    git = tags.get("git.commit")
    if git and tags.get("git.dirty") == "true":
        git += " (uncommitted changes)"
    error = tags.get("error")
    return [
        (
            "status",
            _Html(
                f'<span class="status-{_e(status)}">{_e(status)}</span>'
                + (f' <span class="err">{_e(error)}</span>' if error else "")
            )
            if status
            else None,
        ),
        (
            "MLflow run",
            " ".join(
                p
                for p in (info.get("run_id") or "", f"({tags['mlflow.runName']})" if tags.get("mlflow.runName") else "")
                if p
            )
            or None,
        ),
        ("parent run (sweep)", info.get("parent_run_id") or tags.get("mlflow.parentRunId")),
        ("modes", modes),
        ("model", _get(config, "model.path")),
        ("model family", tags.get("model.family")),
        ("generation path", tags.get("generation.path")),
        (
            "dtype / device",
            " / ".join(
                str(x) for x in (_get(config, "model.dtype"), tags.get("device") or _get(config, "model.device")) if x
            )
            or None,
        ),
        ("scheduler", f"{scheduler}" + (f" ({cls})" if cls else "") if scheduler or cls else None),
        ("timestep spacing", _get(config, "scheduler.timestep_spacing")),
        ("inference steps", _get(config, "sampler.num_inference_steps")),
        ("guidance scale", _get(config, "sampler.guidance_scale")),
        ("eta", _get(config, "sampler.eta")),
        ("batch size", _get(config, "mode.metrics.batch_size") or _get(config, "sampler.batch_size")),
        ("N (generated samples)", n_text),
        ("seeds", seeds),
        (
            "dataset",
            ", ".join(
                f"{k} {v}"
                for k in ("name", "split", "num_images", "root")
                if (v := _get(config, f"dataset.{k}")) is not None
            )
            or None,
        ),
        ("git commit", git),
        (
            "package versions",
            ", ".join(f"{k[len('version.') :]} {v}" for k, v in sorted(tags.items()) if k.startswith("version."))
            or None,
        ),
        ("tracking store", tags.get("tracking.uri_effective")),
        ("caches", ", ".join(f"{k} {tags[k]}" for k in ("model_cache", "reference_cache") if k in tags) or None),
    ]


def _scalars_html(results: Mapping[str, Any], tags: Mapping[str, str]) -> str:
    rows = scalar_rows(results)
    if not rows:
        return '<p class="muted">no scalars (results.json is empty or missing)</p>'
    out, flagged = [], [r["key"] for r in rows if r["spans_zero"]]
    if flagged:
        out.append(
            f'<p class="note">⚠ {len(flagged)} interval(s) contain 0: {_e(", ".join(flagged))} — the sign '
            "of these values is not established at this N.</p>"
        )
    skipped = {k[len("skipped.") :]: v for k, v in tags.items() if k.startswith("skipped.")}
    if skipped:
        out.append(
            '<p class="muted">skipped: ' + "; ".join(f"{_e(k)} ({_e(v)})" for k, v in sorted(skipped.items())) + "</p>"
        )
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for group, items in sorted(groups.items(), key=lambda g: g[0].split("/")):  # a mode, then its sub-groups
        body = []
        for r in items:
            note = '<span class="note">⚠ interval contains 0</span>' if r["spans_zero"] else ""
            cells = [
                f"<code>{_e(r['key'])}</code>",
                f'<td class="num">{_e(_value_with_interval(r["value"], r["low"], r["high"]))}</td>',
                _e(r["better"]),
                note,
            ]
            body.append((cells, "warn") if r["spans_zero"] else cells)
        out.append(
            f'<h3>{_e(group)} <span class="muted">({len(items)})</span></h3>'
            + _table(["key", "value [interval]", "better", "note"], body)
        )
    return "".join(out)


def write_run_report(
    run_dir: str | Path,
    results: Optional[Mapping[str, Any]] = None,
    tags: Optional[Mapping[str, str]] = None,
    params: Optional[Mapping[str, Any]] = None,
    status: Optional[str] = None,
) -> Path:
    """Write ``<run_dir>/report.html`` from what the run dir holds; returns its path.

    ``results``: the run's scalars (default: ``results.json``); ``tags``: the run's MLflow tags (versions, git
    commit, device, ``sampler.class``, ``metrics.resize.<name>``, ``error``, ...; default: recomputed
    :func:`pipeline.record.tracking.environment_tags`); ``params``: extra params shown as provenance (``choice.<group>``);
    ``status``: the run's status (FINISHED / FAILED / KILLED)."""
    run_dir = Path(run_dir)
    if results is None:
        file = run_dir / "results.json"
        results = json.loads(file.read_text()) if file.is_file() else {}
    config = _load_config(run_dir)
    if tags is None:
        tags = environment_tags(str(_get(config, "model.device", "n/a")))
    tags, params = dict(tags), dict(params or {})
    info_file = run_dir / "run_info.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    plots = sorted((run_dir / "plots").glob("*")) if (run_dir / "plots").is_dir() else []
    plots = [p for p in plots if p.suffix.lower() in IMAGE_TYPES]
    tables_dir = run_dir / "tables"
    tables = sorted(p for p in tables_dir.glob("*") if p.is_file()) if tables_dir.is_dir() else []

    sections: list[tuple[str, str, str]] = []
    headline = headline_keys(results, config)
    if headline:
        lows_highs = {
            k: (_number(results.get(k + CI_SUFFIXES[0])), _number(results.get(k + CI_SUFFIXES[1]))) for k in headline
        }
        sections.append(
            (
                "headline",
                "Headline",
                _kv(
                    (
                        k,
                        _value_with_interval(results[k], *lows_highs[k])
                        + ("  ⚠ interval contains 0" if spans_zero(*lows_highs[k]) else ""),
                    )
                    for k in headline
                ),
            )
        )
    prov = _kv(_provenance(config, tags, params, info, results, status))
    extractors = _read_csv(tables_dir / EXTRACTORS_TABLE)
    if extractors or _get(config, "mode.metrics") is not None:  # the features the metrics were computed in
        prov += "<h3>Feature extractors</h3>" + (_features(config, tags, extractors) or '<p class="muted">none</p>')
    sections.append(("provenance", "Provenance", prov))
    sections.append(("scalars", f"Scalars ({len(results)})", _scalars_html(results, tags)))
    samples = [p for p in plots if p.name == SAMPLES_PLOT]
    if samples:
        sections.append(("samples", "Sample grid", _figure(samples[0], f"plots/{SAMPLES_PLOT}")))
    per_prompt = [t for t in tables if t.name == PER_PROMPT_TABLE]
    if per_prompt:
        sections.append(("per-prompt", "Per-prompt breakdown", _csv_table(per_prompt[0], open_rows=MAX_ROWS)))
    others = [p for p in plots if p.name != SAMPLES_PLOT]
    if others:
        by_mode: dict[str, list[Path]] = {}
        for p in others:
            by_mode.setdefault(p.stem.split("_")[0], []).append(p)
        body = "".join(
            f"<h3>{_e(mode)}</h3>" + "".join(_figure(p, f"plots/{p.name}") for p in ps) for mode, ps in by_mode.items()
        )
        sections.append(("plots", f"Plots ({len(others)})", body))
    rest = [t for t in tables if t.name != PER_PROMPT_TABLE]
    if rest:
        parts = [
            _csv_table(t) if t.suffix == ".csv" else _text_block(t)
            for t in rest
            if t.suffix == ".csv" or t.suffix in TEXT_TABLES
        ]
        sections.append(("tables", f"Tables ({len(parts)})", "".join(parts)))
    config_file = run_dir / "config_resolved.yaml"
    extra = ""
    if config_file.is_file():
        extra += f"<details><summary>config_resolved.yaml</summary><pre>{_e(config_file.read_text())}</pre></details>"
    if tags:
        extra += (
            "<details><summary>all tags</summary>"
            + _table(["tag", "value"], [[_e(k), _e(v)] for k, v in sorted(tags.items())])
            + "</details>"
        )
    if extra:
        sections.append(("config", "Config and tags", extra))
    title = f"Run report: {tags.get('mlflow.runName') or run_dir.name}"
    subtitle = f"{run_dir.resolve()} · written {_now()}"
    return _write(run_dir / REPORT_NAME, _page(title, subtitle, sections))


# --------------------------------------------------------------------------------------------- sweeps
def checkpoint_steps(paths: Iterable[Any]) -> dict[str, int]:
    """``{model.path: training step}`` for a checkpoint sweep: the step parsed from the checkpoint directory name
    (``step_00250`` -> 250, :func:`pipeline.zoo.checkpoint_step`); a path without one (the final model) comes after
    the last checkpoint: last step + 1 (+ 2, ... for several, in the given order). {} when no path names a step
    (a sweep over different models, not over checkpoints)."""

    paths = list(dict.fromkeys(str(p) for p in paths if p is not None))
    steps = {p: checkpoint_step(p.rstrip("/")) for p in paths}
    known = [s for s in steps.values() if s is not None]
    if not known:
        return {}
    last = max(known)
    for p in paths:
        if steps[p] is None:
            last += 1
            steps[p] = last
    return steps


def _run_dir(run: Any) -> Optional[Path]:
    text = run.data.tags.get("run_dir")
    return Path(text) if text else None


def _sample_grid(run: Any) -> Optional[Path]:
    run_dir = _run_dir(run)
    grid = run_dir / "plots" / SAMPLES_PLOT if run_dir is not None else None
    return grid if grid is not None and grid.is_file() else None


def log_checkpoint_samples(tracker: Any, children: Sequence[Any]) -> dict[str, int]:
    """In a checkpoint sweep, each finished child's sample grid on the parent run (``tracker``) as MLflow image
    ``samples`` at the checkpoint's training step (:func:`checkpoint_steps`): the MLflow UI's image slider then
    steps through the checkpoints. Steps already logged (a resumed sweep) are not logged again. Returns
    ``{run name: step}`` of the grids logged ({} when the sweep does not vary checkpoints)."""
    from PIL import Image

    paths = [c.data.params.get("model.path") for c in children]
    if len(set(p for p in paths if p)) < 2:
        return {}
    steps = checkpoint_steps(p for p in paths if p)
    if not steps:
        return {}
    done = set(tracker.logged_image_steps(SAMPLES_KEY))
    logged = {}
    for child in sorted(children, key=lambda c: steps.get(c.data.params.get("model.path"), -1)):
        step = steps.get(child.data.params.get("model.path"))
        grid = _sample_grid(child)
        if step is None or child.info.status != "FINISHED" or step in done:
            continue
        if grid is None:
            log.info(
                "checkpoint samples: %s has no local %s (run dir %s)",
                child.info.run_name,
                SAMPLES_PLOT,
                _run_dir(child),
            )
            continue
        with Image.open(grid) as im:
            tracker.log_image(im.convert("RGB"), SAMPLES_KEY, step)
        done.add(step)
        logged[child.info.run_name] = step
    return logged


def write_sweep_report(sweep_dir: str | Path, parent_run: Any, children: Sequence[Any]) -> Path:
    """Write ``<sweep_dir>/report.html`` for a sweep: its provenance, the best values (:func:`_sweep_best`, the rule
    of the parent's ``best.*``), the frontier sentences (section "Quality versus cost"), one row per child run (name,
    status, swept params, headline and preference metrics with intervals, each ranked metric's best marked, error),
    the sweep plots (``sweep_*.png`` in ``sweep_dir``: the frontiers and the visited steps too) and each child's
    sample grid (``<child run_dir>/plots/metrics_samples.png``; in a checkpoint sweep in training order, labelled
    with the step). ``parent_run``: the parent's MLflow run (or
    None); ``children``: the child runs (``pipeline.record.tracking.Tracker.child_runs``). Returns the path."""

    sweep_dir = Path(sweep_dir)
    rows = child_rows(list(children))
    keys = swept(rows)
    primary = primary_extractor(rows)
    steps = checkpoint_steps(r.get(CHECKPOINT) for r in rows) if CHECKPOINT in keys else {}
    if steps:
        rows.sort(key=lambda r: steps.get(str(r.get(CHECKPOINT)), -1))
    sections = [("provenance", "Provenance", _sweep_provenance(sweep_dir, parent_run, rows, primary))]
    best = _sweep_best(rows)
    if best:
        sections.append(("best", "Best values", best))
    frontiers = _sweep_frontiers(rows)
    if frontiers:
        sections.append(("frontiers", "Quality versus cost", frontiers))
    sections.append(("runs", f"Runs ({len(rows)})", _sweep_runs(rows, keys, primary, steps)))
    sweep_plots = sorted(sweep_dir.glob("sweep_*.png"))
    if sweep_plots:
        sections.append(("plots", "Sweep plots", "".join(_figure(p, p.name) for p in sweep_plots)))
    samples = _sweep_samples(rows, {c.info.run_id: c for c in children}, steps)
    if samples:
        sections.append(("samples", "Sample grids", samples))
    title = f"Sweep report: {parent_run.info.run_name if parent_run is not None else sweep_dir.name}"
    return _write(sweep_dir / REPORT_NAME, _page(title, f"{sweep_dir.resolve()} · written {_now()}", sections))


def _sweep_provenance(sweep_dir: Path, parent_run: Any, rows: list[dict], primary: str | None) -> str:
    p_tags = dict(parent_run.data.tags) if parent_run is not None else {}
    p_params = dict(parent_run.data.params) if parent_run is not None else {}
    git = p_tags.get("git.commit")
    if git and p_tags.get("git.dirty") == "true":
        git += " (uncommitted changes)"
    statuses = [r["status"] for r in rows]
    prov = _kv(
        [
            (
                "MLflow parent run",
                " ".join(x for x in (parent_run.info.run_id, f"({parent_run.info.run_name})") if x)
                if parent_run is not None
                else None,
            ),
            (
                "jobs",
                f"{len(rows)}: " + ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
                if rows
                else "none recorded",
            ),
            ("sweep overrides", p_tags.get("sweep.overrides")),
            *[(f"swept {k[len('sweep.') :]}", v) for k, v in sorted(p_params.items()) if k.startswith("sweep.")],
            ("primary extractor", primary),
            ("git commit", git),
            (
                "package versions",
                ", ".join(f"{k[len('version.') :]} {v}" for k, v in sorted(p_tags.items()) if k.startswith("version."))
                or None,
            ),
            ("tracking store", p_tags.get("tracking.uri_effective")),
            ("sweep dir", str(sweep_dir.resolve())),
        ]
    )
    return prov + '<p class="muted">Each job has its own report.html among its artifacts and in its run dir.</p>'


def _sweep_best(rows: list[dict]) -> str | None:
    """Per ranked metric (:func:`pipeline.record.ranking.winners`: quality metrics only, never timings,
    ``cost/*``, counts or ``fd_floor``; the rule of the parent's ``best.<key>``): the best value, the better direction,
    the run (every run of a tie), the runner-up and the verdict; then the metrics equal across the finished runs,
    which are not ranked."""
    won = winners(rows)
    equal = equal_keys(rows)
    if not won and not equal:
        return None
    html = ""
    if won:
        html = _table(
            ["key", "best", "better", "run", "runner-up", "verdict"],
            [
                [
                    f"<code>{_e(w['metric'])}</code>",
                    f'<td class="num">{_e(_fmt(w["best_value"]))}</td>',
                    _e("higher" if higher_is_better(w["metric"]) else "lower"),
                    _e(("tie: " if len(w["best_runs"]) > 1 else "") + w["best"]),
                    _e(f"{w['runner_up']} ({_fmt(w['runner_up_value'])})"),
                    _e(VERDICTS[w["verdict"]]),
                ]
                for w in won
            ],
        )
    if equal:
        same = ", ".join(f"{k} ({_fmt(v)})" for k, v in equal.items())
        html += f'<p class="muted">equal across the finished jobs, not ranked: {_e(same)}</p>'
    return html


def _sweep_frontiers(rows: list[dict]) -> str | None:
    """The frontier sentences (:func:`pipeline.record.sweep_summary.frontier_lines`), escaped: per quality metric the
    best config and the cheapest one within its 95 % interval."""
    try:
        lines = frontier_lines(rows)
    except Exception:  # noqa: BLE001 - a report section must never cost the report
        log.warning("report: could not compute the frontier sentences", exc_info=True)
        return None
    if not lines:
        return None
    items = "".join(f"<li>{_e(line)}</li>" for line in lines)
    return (
        f"<ul>{items}</ul>"
        '<p class="muted">Cheapest by NFE (<code>cost/nfe</code>; by seconds per image where NFE was not recorded) '
        "among the configs whose value lies within the best's 95 % interval; sweep_frontiers.png marks "
        "the Pareto fronts.</p>"
    )


def _sweep_runs(rows: list[dict], keys: list[str], primary: str | None, steps: dict) -> str:
    """One row per child: name, status, (checkpoint step), swept values, headline metrics and preference scores with
    intervals, error. The best value(s) of each ranked column (:func:`pipeline.record.ranking.rank`: quality
    metrics only, not where every finished run has one value) are marked."""
    preference = [preference_key(s) for s in PREFERENCE_SCORERS]
    metric_cols = list(
        dict.fromkeys(
            [
                *(k for r in rows for k in headline_keys(r, primary)),
                *(k for k in preference if any(k in r for r in rows)),
            ]
        )
    )
    best = {k: {id(x) for x in ranking.best} for k in metric_cols if (ranking := rank(rows, k)) is not None}
    header = ["run", "status", *(("step",) if steps else ()), *keys, *metric_cols, "error"]
    body = []
    for r in rows:
        cells = [_e(r["run_name"]), f'<span class="status-{_e(r["status"])}">{_e(r["status"])}</span>']
        if steps:
            cells.append(f'<td class="num">{_e(steps.get(str(r.get(CHECKPOINT)), ""))}</td>')
        cells += [
            _e(checkpoint_label(r[k]) if k == CHECKPOINT and r.get(k) is not None else _fmt(r.get(k))) for k in keys
        ]
        flagged = False
        for k in metric_cols:
            low, high = (_number(r.get(k + s)) for s in CI_SUFFIXES)
            flag = spans_zero(low, high)
            flagged |= flag
            text = _value_with_interval(r[k], low, high) if k in r else ""
            css = "num best" if id(r) in best.get(k, ()) else "num"
            cells.append(f'<td class="{css}">{_e(text)}{" ⚠ contains 0" if flag else ""}</td>')
        cells.append(f'<span class="err">{_e(r.get("error", ""))}</span>')
        body.append((cells, "warn") if flagged else cells)
    warning = mixed_n_warning(rows)
    html = (f'<p class="note">⚠ {_e(warning)}</p>' if warning else "") + (
        _table(header, body) if rows else '<p class="muted">no child run was recorded</p>'
    )
    if best:
        html += (
            '<p class="muted">Marked: the best finished job(s) of each ranked metric (several: a tie); timings and '
            "metrics equal across the jobs are not ranked.</p>"
        )
    if any(r.get("status") != "FINISHED" for r in rows):
        html += '<p class="muted">Failed or killed jobs stay in this table and are left out of the plots.</p>'
    return html


def _sweep_samples(rows: list[dict], by_id: dict, steps: dict) -> str | None:
    """Each child's sample grid (labelled with its step in a checkpoint sweep); a note for metrics jobs without one."""
    grids, missing = [], []
    for r in rows:
        run = by_id.get(r["run_id"])
        grid = _sample_grid(run) if run is not None else None
        if grid is None:
            if r["status"] == "FINISHED" and any(k.startswith("metrics/") for k in r):  # a metrics job
                missing.append(str(r["run_name"]))
            continue
        label = r["run_name"] or r["run_id"]
        if steps:
            label = f"step {steps.get(str(r.get(CHECKPOINT)))}: {label}"
        grids.append(_figure(grid, label))
    note = (
        f'<p class="muted">no local {SAMPLES_PLOT} for: {_e(", ".join(missing))} (run dir not on this machine; '
        "see their MLflow artifacts)</p>"
        if missing
        else ""
    )  # e.g. jobs run on cluster nodes
    return f'<div class="grids">{"".join(grids)}</div>{note}' if grids or note else None
