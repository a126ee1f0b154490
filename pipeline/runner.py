"""Resolve the stages a run needs, run each once, always close the run.

``run_pipeline`` is the task function: the Hydra entry point, ``pipeline.reproduce`` and the tests call it
directly with a composed config and a run directory.

Under ``torchrun`` (``pipeline.distributed``) every rank runs the same stages (so their collectives match), but
only rank 0 creates the MLflow run and writes the run directory; the other ranks log nothing to MLflow and write
into a throwaway temporary directory.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from pipeline import distributed as dist
from pipeline.config import check_keys, to_plain
from pipeline.context import RunContext
from pipeline.errors import ModeSkipped, UserError
from pipeline.progress import LOCK_FILE, PROGRESS_DIR, RunLock
from pipeline.registry import MODES, STAGES, load_stages, producer_of

log = logging.getLogger(__name__)

FAILED_JOBS: list[str] = []  # jobs of this process that failed; the CLI exits non-zero if any


@dataclass
class RunOutcome:
    run_id: str | None
    status: str
    run_dir: Path
    results: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    error: str | None = None


def seed_everything(seed: int) -> None:
    """One seed for python, numpy and torch; stages derive their own generators from ``cfg.seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve(cfg: Any) -> dict:
    """The fully resolved config as plain containers; a missing ``???`` value names its key."""
    try:
        return to_plain(cfg)
    except MissingMandatoryValue as e:
        raise UserError(f"{e.full_key}: missing mandatory value (???); set it, e.g. {e.full_key}=...") from None
    except InterpolationResolutionError as e:
        raise UserError(f"{e.full_key}: cannot resolve interpolation: {e.msg}") from None


def selected_modes(cfg: Any, choices: dict[str, Any] | None = None) -> list[str]:
    modes = [name for name, block in cfg.mode.items() if block is not None]
    order = (choices or {}).get("mode")
    if isinstance(order, (list, tuple)):
        modes.sort(key=lambda m: list(order).index(m) if m in order else len(order))
    if not modes:
        raise UserError(f"mode: no mode selected; expected e.g. mode=[schedule] (known: {sorted(MODES)})")
    return modes


class _NoTracker:
    """The tracker of a non-zero rank: accepts every call, records nothing (rank 0 owns the MLflow run)."""

    uri = "none (rank != 0)"
    run_id = None
    run_name = None

    def start(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _run_stage(name: str, ctx: RunContext, done: set[str], chain: tuple[str, ...] = ()) -> None:
    if name in done:
        return
    if name in chain:
        raise RuntimeError(f"stage dependency cycle: {' -> '.join(chain + (name,))}")
    load_stages()  # every mode's stage module (idempotent)
    st = STAGES[name]
    for need in st.needs:
        if need not in ctx.artifacts:
            _run_stage(producer_of(need).name, ctx, done, chain + (name,))
    log.info("stage %s", name)
    tic = time.perf_counter()
    produced = st.fn(ctx, ctx.cfg) or {}
    if set(produced) != set(st.produces):
        raise RuntimeError(f"stage {name!r} declared {sorted(st.produces)} but produced {sorted(produced)}")
    ctx.artifacts.update(produced)
    done.add(name)
    log.info("stage %s done in %.2f s", name, time.perf_counter() - tic)


def execute(ctx: RunContext, modes: list[str]) -> dict[str, str]:
    """Run every stage of every mode once. Returns {mode: reason} for modes that did not apply."""
    load_stages()
    done: set[str] = set()
    skipped: dict[str, str] = {}
    for mode in modes:
        try:
            for name in MODES[mode].stages:
                _run_stage(name, ctx, done)
        except ModeSkipped as e:
            log.warning("mode %s skipped: %s", mode, e)
            skipped[mode] = str(e)
            ctx.tag(f"skipped.{mode}", str(e))
    return skipped


def run_pipeline(
    cfg: DictConfig,
    run_dir: str | Path,
    choices: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    run_name: str | None = None,
    tracking_uri: str | None = None,
    resume_run_id: str | None = None,
) -> RunOutcome:
    """Run every selected mode of ``cfg`` as one MLflow run. Raises on failure after closing the run; logs a short
    summary (headline scalars, run dir, MLflow run id, deep links, ``mlflow ui`` command) at the end either way.

    ``run_name``: the MLflow run name (default :func:`pipeline.naming.run_name`); ``tracking_uri``: the store, when
    the caller has chosen it (default: ``tracking.uri``, then ``MLFLOW_TRACKING_URI``, then the embedded store). The
    store used is tagged ``tracking.uri_effective``; ``config_resolved.yaml`` keeps ``tracking.uri`` as configured.

    ``resume_run_id`` (``pipeline.resume``): continue that MLflow run in ``run_dir`` instead of starting one (status
    RUNNING again, tag ``resumed`` = number of resumptions); the metrics mode then generates only the batches that
    have no shard in ``run_dir/progress/``. The run dir is locked (``run.lock``, heartbeat) while the run is in it;
    its ``progress/`` is deleted when the run finishes and never uploaded."""
    from pipeline.models.loading import resolve_device
    from pipeline.naming import run_name as default_run_name
    from pipeline.tracking import EFFECTIVE_URI_TAG, Tracker, environment_tags, flatten, public_uri

    load_stages()  # every mode and stage registered (the config schema needs only the modes)
    check_keys(cfg)  # a key the schema lacks (added with `+`) fails before any work or MLflow run
    main = dist.is_main()  # True unless this is a non-zero rank of a torchrun launch
    scratch = None
    if not main:  # same stages, nothing recorded: a throwaway run dir, no MLflow run
        scratch = run_dir = Path(tempfile.mkdtemp(prefix=f"diffusion-lens-rank{dist.rank()}-"))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    choices = {k: v for k, v in (choices or {}).items() if v is not None}
    lock = RunLock(run_dir).acquire() if main else None  # a live owner of this run dir: UserError, nothing touched
    try:
        # unreachable server: UserError
        tracker = Tracker(cfg.tracking, cfg.paths.outputs, uri=tracking_uri) if main else _NoTracker()
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    tags = {**environment_tags(str(cfg.model.device)), "run_dir": str(run_dir.resolve()),
            EFFECTIVE_URI_TAG: public_uri(tracker.uri), **(extra_tags or {})}
    if dist.launched():
        tags["distributed.world_size"] = str(dist.world_size())
    try:
        name_modes = selected_modes(cfg, choices)
    except Exception:  # noqa: BLE001 - no mode selected: the run fails on it below, with its own message
        name_modes = []
    if resume_run_id is not None and main:
        prior = tracker.reopen(resume_run_id)
        run_id, resumed = resume_run_id, int(prior.tags.get("resumed", "0")) + 1
        tracker.set_tags({**tags, "resumed": resumed})
        if "error" in prior.tags:  # the last attempt's failure is history now
            tracker.set_tags({"resumed.previous_error": prior.tags["error"]})
            tracker.delete_tag("error")
        log.info("resuming MLflow run %s (%s), resumption %d, in %s", run_id, tracker.run_name, resumed, run_dir)
    else:
        run_id = tracker.start(run_name or default_run_name(cfg, name_modes, choices), tags=tags, parent_run_id=parent_run_id)
        log.info("MLflow run %s (%s) in %s (%s)", run_id, tracker.run_name, public_uri(tracker.uri), run_dir)
    info = {"run_id": run_id, "tracking_uri": public_uri(tracker.uri), "choices": choices, "parent_run_id": parent_run_id}
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2, default=str))
    ctx = RunContext(cfg, run_dir, tracker if main else None)
    ctx.write_results()
    outcome = RunOutcome(run_id, "FAILED", run_dir)
    try:
        # the group choices first: a job that fails on its config still shows what it was in a sweep's table
        tracker.log_params({f"choice.{k}": str(v) for k, v in choices.items() if k != "mode"})
        plain = resolve(cfg)  # every interpolation and ??? now: a bad one fails before any work
        OmegaConf.save(OmegaConf.create(plain), run_dir / "config_resolved.yaml")
        modes = selected_modes(cfg, choices)
        params = flatten(plain)
        params["choice.mode"] = str(choices.get("mode", modes))  # Hydra does not record list-valued group choices
        choices.setdefault("mode", modes)
        changed = tracker.log_params(params)  # a resumed run: the allowed changes (model.device, ...) become a tag
        if changed:
            tracker.set_tags({"resumed.changed": "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in sorted(changed.items()))})
        ctx.device = dist.local_device(resolve_device(cfg.model.device))  # cuda:LOCAL_RANK under torchrun
        dist.init(ctx.device)  # once per process; a no-op unless launched by torchrun
        tracker.set_tags({"device": str(ctx.device), "modes": ",".join(modes)})
        for mode in modes:  # cross-key checks of every mode before any work
            if MODES[mode].validate is not None:
                MODES[mode].validate(cfg)
        seed_everything(cfg.seed)
        outcome.skipped = execute(ctx, modes)
        outcome.status = "FINISHED"
    except KeyboardInterrupt:
        outcome.status, outcome.error = "KILLED", "KeyboardInterrupt"
        raise
    except BaseException as e:
        outcome.error = f"{type(e).__name__}: {e}"
        raise
    finally:
        outcome.results = dict(ctx.results)
        ctx.write_results()
        try:
            if outcome.error:
                tracker.set_tags({"error": outcome.error})
            if outcome.status == "FINISHED":  # nothing left to resume: the shards go (they hold every sample's features)
                shutil.rmtree(run_dir / PROGRESS_DIR, ignore_errors=True)
            if main:  # report.html before the upload, so it is one of the artifacts (pipeline.report)
                _write_report(run_dir, outcome, tracker, tags, choices)
            tracker.log_artifacts(run_dir, exclude=(PROGRESS_DIR, LOCK_FILE))
        except Exception:  # noqa: BLE001 - never let artifact upload hide the real outcome
            log.warning("could not upload artifacts of %s:\n%s", run_dir, traceback.format_exc())
        finally:
            tracker.end(outcome.status)
            if lock is not None:
                lock.release()
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            if main:
                log_summary(tracker, outcome, cfg)
    return outcome


def _write_report(run_dir: Path, outcome: RunOutcome, tracker: Any, tags: dict, choices: dict) -> None:
    """``<run_dir>/report.html`` (:func:`pipeline.report.write_run_report`) with the run's tags as stored; a report
    that cannot be written is a warning, never a change of the run's outcome."""
    try:
        from pipeline.report import write_run_report

        write_run_report(run_dir, outcome.results, tags={**tags, **tracker.run_tags()},
                         params={f"choice.{k}": str(v) for k, v in choices.items()}, status=outcome.status)
    except Exception:  # noqa: BLE001
        log.warning("could not write the report of %s:\n%s", run_dir, traceback.format_exc())


def log_summary(tracker: Any, outcome: RunOutcome, cfg: Any) -> None:
    """The run's last log lines: status, headline scalars (``pipeline.metric_keys.headline_keys``), run dir, MLflow
    run id and name, the links to the experiment's runs table and to the run, and how to open the MLflow UI."""
    from pipeline.metric_keys import headline_keys, interval_text
    from pipeline.tracking import format_value, summary_lines

    try:
        scalars = [f"{k} = {format_value(outcome.results[k])}{interval_text(outcome.results, k)}"
                   for k in headline_keys(outcome.results, cfg)]
        title = f"run {outcome.status}" + (f": {outcome.error}" if outcome.error else "")
        log.info("%s", "\n".join(summary_lines(tracker, title, scalars, "run dir", outcome.run_dir)))
    except Exception:  # noqa: BLE001 - a summary must never hide the run's outcome
        log.warning("could not write the run summary:\n%s", traceback.format_exc())


def share_cores(launcher: Any) -> None:
    """Parallel local jobs split the cores: each of P joblib workers gets cpus // P torch threads. Left alone,
    every worker starts one thread per core and P workers oversubscribe the machine (torch's OpenMP threads
    slow down many-fold when they compete for cores)."""
    import os

    if "joblib" not in str(OmegaConf.select(launcher, "_target_", default="")).lower():
        return
    from pipeline.threads import available_cpus

    cpus = available_cpus()
    n_jobs = int(OmegaConf.select(launcher, "n_jobs", default=-1) or 1)
    parallel = min(cpus, n_jobs if n_jobs > 0 else max(1, cpus + 1 + n_jobs))  # joblib: -1 = all cores
    torch.set_num_threads(max(1, cpus // parallel))
    log.info("joblib launcher, %d parallel jobs on %d CPUs: %d torch thread(s) per job", parallel, cpus, torch.get_num_threads())


def run_from_hydra(cfg: DictConfig) -> RunOutcome | None:
    """Hydra task function: user errors become one short line; in a multirun a failed job never stops the sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from pipeline.naming import job_name
    from pipeline.tracking import read_parent_run_id, read_sweep_params

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun:
        share_cores(hc.launcher)
    choices = OmegaConf.to_container(hc.runtime.choices)
    parent = read_parent_run_id(hc.sweep.dir) if multirun else None
    job = f"job {hc.job.num}: {' '.join(hc.overrides.task)}" if multirun else None
    # a sweep job is named by its swept overrides (scheduler=euler·sampler.num_inference_steps=10)
    name = job_name(hc.overrides.task, read_sweep_params(hc.sweep.dir)) if multirun else None
    try:
        resume_id = _earlier_attempt(cfg, Path(hc.runtime.output_dir)) if multirun else None
        if resume_id == "FINISHED":
            log.info("%s finished in an earlier attempt of this sweep: skipped", job)
            return None
        return run_pipeline(cfg, hc.runtime.output_dir, choices, parent_run_id=parent,
                            run_name=cfg.tracking.run_name or name, resume_run_id=resume_id)
    except UserError as e:
        log.error("error: %s", e)
        FAILED_JOBS.append(job or "run")
        if not multirun:
            raise SystemExit(2) from None
    except Exception:
        if not multirun:
            raise  # a bug, not a user error: keep the traceback
        log.exception("job failed: %s", job)
        FAILED_JOBS.append(job)
    return None


def _earlier_attempt(cfg: DictConfig, job_dir: Path) -> str | None:
    """A sweep job whose dir holds an earlier attempt (a resumed sweep, a job requeued by the cluster): "FINISHED"
    when that attempt finished (skip the job), its run id when it can be resumed, None for a fresh job."""
    from pipeline.resume import check_config, previous_run, resumable, saved_config
    from pipeline.tracking import get_run, resolve_uri

    info = previous_run(job_dir)
    if not info or not info.get("run_id"):
        return None
    status = get_run(resolve_uri(cfg.tracking.uri, cfg.paths.outputs), info["run_id"]).info.status
    # every rank of a torchrun sweep decides alike (same job dir, same store); only rank 0 owns the lock
    if not resumable(job_dir, info["run_id"], status, check_owner=dist.is_main()):
        return "FINISHED"
    saved = saved_config(job_dir)
    if saved is not None:
        check_config(to_plain(saved), resolve(cfg), str(job_dir))
    log.info("resuming %s (MLflow run %s, %s)", job_dir, info["run_id"], status)
    return info["run_id"]
