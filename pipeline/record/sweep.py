"""A sweep's parent MLflow run, as a Hydra callback (``conf/config.yaml`` ``hydra.callbacks.mlflow_sweep``): opened
when the multirun starts (each job then names its run from the swept values and nests under it), closed when it ends
with the sweep summary (``sweep_summary``: table, plots, best runs) and ``report.html`` (``report``) logged to it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from pipeline.core import distributed
from pipeline.core.metric_keys import headline_keys
from pipeline.errors import UserError
from pipeline.record.naming import sweep_name, swept_values
from pipeline.record.ranking import best_label, best_runs
from pipeline.record.report import log_checkpoint_samples, write_sweep_report
from pipeline.record.sweep_summary import child_rows, primary_extractor, summarise
from pipeline.record.tracking import (
    _OPEN_PARENTS,
    EFFECTIVE_URI_TAG,
    PARENT_RUN_FILE,
    SWEEP_PARAMS_FILE,
    Tracker,
    environment_tags,
    format_value,
    public_uri,
    read_parent_run_id,
    redact_files,
    summary_lines,
)

log = logging.getLogger(__name__)


class SweepCallback(Callback):
    """Opens one parent MLflow run per multirun and closes it with a summary of its children. For every job (single
    runs too) it also redacts the files Hydra wrote with the overrides as typed (:meth:`on_job_start`)."""

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        """Hydra has just saved ``.hydra/{config,hydra,overrides}.yaml`` (and a sweep's ``multirun.yaml``) with the
        command line as typed, ``tracking.uri=http://user:password@...`` included, and the run dir is uploaded as
        artifacts: redact them before the task runs. A resume replays ``user:***@host``, which connects with MLflow's
        credential variables (:func:`usable_uri`) or a ``tracking.uri=`` given again."""
        from hydra.types import RunMode
        from omegaconf import OmegaConf

        files: list[Path] = []
        out, sub = OmegaConf.select(config, "hydra.runtime.output_dir"), OmegaConf.select(config, "hydra.output_subdir")
        if out and sub:
            files += sorted((Path(out) / sub).glob("*.yaml"))
        if OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN and OmegaConf.select(config, "hydra.sweep.dir"):
            files.append(Path(config.hydra.sweep.dir) / "multirun.yaml")
        redact_files(files)

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:

        # every job's config was checked by pipeline.run.runner.SweepPreflight, the callback before this one
        if not distributed.is_main():  # under torchrun only rank 0 records the sweep
            return
        try:
            tracker = Tracker(config.tracking, config.paths.outputs)
        except UserError as e:
            log.error("%s", e)
            raise SystemExit(2) from None
        from omegaconf import OmegaConf

        sweep_dir = Path(config.hydra.sweep.dir)
        earlier = read_parent_run_id(sweep_dir)
        if earlier:  # python -m pipeline.run.resume SWEEP_DIR: the same parent run, its finished jobs skipped
            prior = tracker.reopen(earlier)
            tracker.set_tags({"resumed": int(prior.tags.get("resumed", "0")) + 1})
            if "error" in prior.tags:
                tracker.delete_tag("error")
            _OPEN_PARENTS[earlier] = tracker
            log.info("MLflow parent run %s resumed (%s)", earlier, public_uri(tracker.uri))
            return
        overrides = " ".join(config.hydra.overrides.task)
        swept = swept_values(
            config.hydra.overrides.task, OmegaConf.select(config, "hydra.sweeper.params", default=None)
        )
        run_id = tracker.start(
            run_name=config.tracking.run_name or sweep_name(swept) or f"sweep {sweep_dir.name}",
            tags={
                "sweep.role": "parent",
                "sweep.dir": str(sweep_dir.resolve()),
                "sweep.overrides": overrides,
                EFFECTIVE_URI_TAG: public_uri(tracker.uri),
                **environment_tags("n/a"),
            },
        )
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_RUN_FILE).write_text(run_id)
        (sweep_dir / SWEEP_PARAMS_FILE).write_text(json.dumps(swept))
        _OPEN_PARENTS[run_id] = tracker
        tracker.log_params({f"sweep.{k}": ",".join(v) for k, v in swept.items()})
        log.info("MLflow parent run %s (%s)", run_id, public_uri(tracker.uri))

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        run_id = read_parent_run_id(sweep_dir)
        tracker = _OPEN_PARENTS.pop(run_id, None) if run_id else None
        if tracker is None:
            return

        sentence, lines = None, []
        try:
            children = tracker.child_runs(run_id)
            statuses = [c.info.status for c in children]
            tracker.set_tags({"sweep.jobs": len(children), "sweep.failed_jobs": statuses.count("FAILED")})
            best = best_runs(children)  # {result key: (value, run id)} over the finished children, by direction
            tracker.log_metrics({f"best.{k}": v for k, (v, _) in best.items()})
            tracker.set_tags({f"best.{k}.run_id": rid for k, (_, rid) in best.items()})
            names = {c.info.run_id: c.info.run_name for c in children}
            primary = primary_extractor(child_rows(children))
            scalars = [
                f"best {k} = {format_value(best[k][0])} ({best_label(best[k][1], names)})"  # a tie: every run
                for k in headline_keys(best, primary)
            ]
            lines = summary_lines(tracker, "sweep summary:", scalars, "sweep dir", sweep_dir)
            sentence = summarise(tracker, children, sweep_dir)
            # ---- sweep report.html and checkpoint sample grids (pipeline.record.report); neither may change the sweep
            try:
                report = write_sweep_report(sweep_dir, tracker.get_run(), children)
                tracker.log_artifact(report)
                log.info("sweep report %s", report)
            except Exception:  # noqa: BLE001
                log.warning("could not write the sweep report of %s", sweep_dir, exc_info=True)
            try:
                logged = log_checkpoint_samples(tracker, children)
                if logged:
                    log.info("sample grids on the parent run, image 'samples' at steps %s", sorted(logged.values()))
            except Exception:  # noqa: BLE001
                log.warning("could not log the checkpoint sample grids of %s", sweep_dir, exc_info=True)
            # ---- end of sweep report
        finally:
            tracker.end("FINISHED")
        if lines:
            log.info("%s", "\n".join(lines))
        if sentence:
            log.info("%s", sentence)
