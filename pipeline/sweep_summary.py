"""Summary of a sweep for its parent MLflow run: one table row per child run (choices, status, scalars)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def child_rows(children: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for run in sorted(children, key=lambda r: r.info.start_time or 0):
        row: dict[str, Any] = {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status}
        row.update({k: v for k, v in sorted(run.data.params.items()) if k.startswith("choice.") and not k.startswith("choice.hydra")})
        row.update(dict(sorted(run.data.metrics.items())))
        if "error" in run.data.tags:
            row["error"] = run.data.tags["error"]
        rows.append(row)
    return rows


def write_table(rows: list[dict[str, Any]], path: Path) -> Path:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def summarise(tracker: Any, children: list[Any], sweep_dir: Path) -> None:
    rows = child_rows(children)
    path = write_table(rows, Path(sweep_dir) / "sweep_summary.csv")
    tracker.log_artifact(path, "tables")
    failed = [r["run_name"] for r in rows if r["status"] != "FINISHED"]
    log.info("sweep: %d jobs, %d not finished %s; summary %s", len(rows), len(failed), failed or "", path)
