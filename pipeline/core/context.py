"""The run context: named artifacts shared between stages, and the one place scalars/plots/tables go.

Every scalar goes to ``results.json`` (rewritten after each scalar, so nothing is lost when a later stage
fails) and to MLflow under the same ``<mode>/<name>`` key.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.core.escape import csv_cell, csv_row

log = logging.getLogger(__name__)


class RunContext:
    def __init__(self, cfg: Any, run_dir: Path, tracker: Any = None, device: Any = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.tracker = tracker
        self.device = device
        self.artifacts: dict[str, Any] = {}
        self.results: dict[str, float] = {}
        self.plots_dir = self.run_dir / "plots"
        self.tables_dir = self.run_dir / "tables"

    # ------------------------------------------------------------------ artifacts between stages
    def get(self, name: str) -> Any:
        if name not in self.artifacts:
            raise KeyError(f"artifact {name!r} not in run context (have {sorted(self.artifacts)})")
        return self.artifacts[name]

    def put(self, name: str, value: Any) -> None:
        self.artifacts[name] = value

    # ------------------------------------------------------------------ outputs
    def log_scalar(self, key: str, value: float) -> None:
        if "/" not in key:
            raise ValueError(f"scalar key {key!r}: expected '<mode>/<name>'")
        value = float(value)
        if not math.isfinite(value):
            # -inf log-SNR and the like are findings, but JSON/MLflow want finite numbers: say so loudly
            log.warning("scalar %s is %s", key, value)
        self.results[key] = value
        self.write_results()
        if self.tracker is not None:
            self.tracker.log_metric(key, value)

    def log_scalars(self, scalars: Mapping[str, float]) -> None:
        """Like :meth:`log_scalar` for each, with one results.json write and one MLflow batch."""
        values = {}
        for key, value in scalars.items():
            if "/" not in key:
                raise ValueError(f"scalar key {key!r}: expected '<mode>/<name>'")
            values[key] = float(value)
            if not math.isfinite(values[key]):
                log.warning("scalar %s is %s", key, values[key])
        self.results.update(values)
        self.write_results()
        if self.tracker is not None and values:
            if hasattr(self.tracker, "log_metrics"):
                self.tracker.log_metrics(values)
            else:
                for key, value in values.items():
                    self.tracker.log_metric(key, value)

    def write_results(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=2, sort_keys=True))
        tmp.replace(self.run_dir / "results.json")

    def save_figure(self, fig: Any, name: str) -> Path:
        import matplotlib.pyplot as plt

        self.plots_dir.mkdir(parents=True, exist_ok=True)
        path = self.plots_dir / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        if self.tracker is not None:
            self.tracker.log_artifact(path, "plots")
        return path

    def save_table(self, rows: Iterable[Mapping[str, Any]], name: str) -> Path:
        """``tables/<name>.csv``: one column per key seen (first-seen order), a missing key an empty cell. Text cells
        that a spreadsheet would evaluate (``=``, ``+``, ``-``, ``@``, tab, CR first) get a leading ``'``
        (:func:`pipeline.core.escape.csv_cell`, OWASP); numbers are written as they are."""
        rows = list(rows)
        self.tables_dir.mkdir(parents=True, exist_ok=True)
        path = self.tables_dir / f"{name}.csv"
        fields: list[str] = []
        for row in rows:
            fields += [k for k in row if k not in fields]
        with path.open("w", newline="") as f:
            # cells (captions, prompts, names) may be user text: formula starts neutralised (pipeline.core.escape)
            writer = csv.writer(f)
            writer.writerow([csv_cell(k) for k in fields])
            writer.writerows(csv_row(row, fields) for row in rows)
        if self.tracker is not None:
            self.tracker.log_artifact(path, "tables")
        return path

    def save_text(self, text: str, name: str) -> Path:
        self.tables_dir.mkdir(parents=True, exist_ok=True)
        path = self.tables_dir / name
        path.write_text(text)
        if self.tracker is not None:
            self.tracker.log_artifact(path, "tables")
        return path

    def tag(self, key: str, value: Any) -> None:
        if self.tracker is not None:
            self.tracker.set_tags({key: value})
