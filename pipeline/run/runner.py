"""Resolve the stages a run needs, run each once, always close the run.

``run_pipeline`` is the task function: the Hydra entry point, ``pipeline.run.reproduce`` and the tests call it
directly with a composed config and a run directory.

Under ``torchrun`` (``pipeline.core.distributed``) every rank runs the same stages (so their collectives match), but
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
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from pipeline.config import check_config, check_sweep, to_plain
from pipeline.core import distributed as dist
from pipeline.core.context import RunContext
from pipeline.core.metric_keys import headline_keys, interval_text
from pipeline.core.progress import LOCK_FILE, PROGRESS_DIR, RunLock, crash_point
from pipeline.core.registry import MODES, STAGES, load_modes, load_stages, producer_of
from pipeline.core.repeats import once_per_cause
from pipeline.core.threads import available_cpus
from pipeline.errors import ModeSkipped, UserError
from pipeline.models.loading import resolve_device
from pipeline.models.stages import check_model
from pipeline.record.entities import model_record, run_datasets
from pipeline.record.naming import job_name
from pipeline.record.naming import run_name as default_run_name
from pipeline.record.report import write_run_report
from pipeline.record.tracking import (
    EFFECTIVE_URI_TAG,
    Tracker,
    deferred_interrupts,
    environment_tags,
    flatten,
    format_value,
    get_run,
    public_uri,
    read_parent_run_id,
    read_sweep_params,
    redact_text,
    resolve_uri,
    summary_lines,
)
from pipeline.run.saved import check_unchanged, previous_run, resumable, saved_config

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
    crash_point(f"stage_{name}")  # tests: a signal at a stage start
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
            for name in MODES[mode].stages_for(ctx.cfg):
                _run_stage(name, ctx, done)
        except ModeSkipped as e:
            log.warning("mode %s skipped: %s", mode, e)
            skipped[mode] = str(e)
            ctx.tag(f"skipped.{mode}", str(e))
    return skipped


def preflight(cfg: DictConfig, choices: dict[str, Any] | None = None) -> tuple[dict, list[str]]:
    """Every check that needs no weights and no work, before any lock, run-dir file or MLflow run exists: the schema's
    keys and value ranges (:func:`pipeline.config.check_config`), every interpolation and ``???``, the selected
    modes and each mode's cross-key checks, the device and the solver against the model's scheduler config
    (:func:`pipeline.models.stages.check_model`). Returns (the resolved config as plain containers, the modes)."""
    load_modes()  # every mode's schema and checks (its stages are imported when the run executes them)
    check_config(cfg)
    plain = resolve(cfg)
    modes = selected_modes(cfg, choices)
    for mode in modes:
        if MODES[mode].validate is not None:
            MODES[mode].validate(cfg)

    check_model(cfg)  # device, scheduler config, solver vs model: no weights read
    return plain, modes


class SweepPreflight(Callback):
    """Hydra callback (``conf/config.yaml``, before ``mlflow_sweep``): every job of a multirun passes :func:`preflight`
    before the first one starts, so a sweep with one impossible job (a value out of range, a solver that does not
    fit one of the models) is refused whole, naming the job, before any run dir or MLflow run exists."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:

        try:
            check_sweep(config, job_check=preflight)
        except UserError as e:
            log.error("error: %s", e)
            raise SystemExit(2) from None


def resume_command(run_dir: Path) -> str:
    """The command that finishes an interrupted or failed run (``pipeline.run.resume``), quoted for a POSIX shell."""
    import shlex

    return f"python -m pipeline.run.resume {shlex.quote(str(Path(run_dir).resolve()))}"


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
    """Run every selected mode of ``cfg`` as one MLflow run; log a short summary at the end either way.

    A config failing :func:`preflight` raises before anything exists (no lock, MLflow run or file). Once the MLflow
    run exists it always ends FINISHED, FAILED or KILLED and the lock is released; a failure while closing (full disk,
    unreachable store) is reported in one paragraph and the run stays resumable. ``run_name`` defaults to
    :func:`pipeline.record.naming.run_name`; ``tracking_uri`` (the caller's store) to ``tracking.uri``, then
    ``MLFLOW_TRACKING_URI``, then the embedded store (tagged ``tracking.uri_effective``, credentials redacted).
    ``resume_run_id``: continue that MLflow run in ``run_dir`` (tag ``resumed`` counts resumptions; the metrics mode
    generates only the batches without a shard in ``run_dir/progress/``, which is deleted when the run finishes)."""

    choices = {k: v for k, v in (choices or {}).items() if v is not None}
    plain, modes = preflight(cfg, choices)  # a bad config: UserError, nothing created
    main = dist.is_main()  # True unless this is a non-zero rank of a torchrun launch
    run_dir, scratch, lock = _claim_run_dir(run_dir, main)
    try:
        tracker, run_id, tags = _open_mlflow_run(
            cfg, run_dir, main, modes, choices, parent_run_id, extra_tags, run_name, tracking_uri, resume_run_id
        )
    except BaseException:
        _leave_run_dir(lock, scratch)
        raise
    ctx = RunContext(cfg, run_dir, tracker if main else None)
    outcome = RunOutcome(run_id, "FAILED", run_dir)
    failure: BaseException | None = None
    with once_per_cause():  # each warning cause printed once, its count at the end of the run's work
        try:
            _start_entities(tracker, cfg, main)
            _record_setup(ctx, tracker, plain, modes, choices, parent_run_id)
            _start_device(ctx, tracker, modes)
            seed_everything(cfg.seed)
            outcome.skipped = execute(ctx, modes)
            outcome.status = "FINISHED"
        except KeyboardInterrupt as e:
            outcome.status, outcome.error, failure = "KILLED", "KeyboardInterrupt (Ctrl-C or SIGTERM)", e
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the run is closed
            outcome.error, failure = redact_text(f"{type(e).__name__}: {e}"), e

    with deferred_interrupts():  # a Ctrl-C or SIGTERM now waits for the run to be closed, then ends it KILLED
        closing_error = _close_run(ctx, outcome, tracker, lock, scratch, main, tags, choices, cfg)
    if failure is not None:
        raise failure
    if closing_error is not None:
        raise UserError(closing_error)
    return outcome


def _claim_run_dir(run_dir: str | Path, main: bool) -> tuple[Path, Path | None, RunLock | None]:
    """The run dir, created and locked (a live owner: UserError, nothing touched); a non-zero torchrun rank runs the
    same stages in a throwaway dir (``scratch``) and records nothing."""
    scratch = None
    if not main:
        scratch = run_dir = Path(tempfile.mkdtemp(prefix=f"diffusion-lens-rank{dist.rank()}-"))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire() if main else None
    return run_dir, scratch, lock


def _leave_run_dir(lock: RunLock | None, scratch: Path | None) -> None:
    """The other half of :func:`_claim_run_dir`: the lock released, a non-zero rank's throwaway dir removed."""
    if lock is not None:
        lock.release()
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


def _open_mlflow_run(
    cfg, run_dir: Path, main: bool, modes, choices, parent_run_id, extra_tags, run_name, tracking_uri, resume_run_id
) -> tuple[Any, str | None, dict]:
    """Start (or reopen, when resuming) the MLflow run: (tracker, run id, tags). An unreachable server or a store
    refusing writes is a UserError (the caller releases the lock; nothing was run)."""
    store = tracking_uri or resolve_uri(cfg.tracking.uri, cfg.paths.outputs)
    try:
        tracker = Tracker(cfg.tracking, cfg.paths.outputs, uri=store) if main else _NoTracker()
        tags = {
            **environment_tags(str(cfg.model.device)),
            "run_dir": str(run_dir.resolve()),
            EFFECTIVE_URI_TAG: public_uri(tracker.uri),
            **(extra_tags or {}),
        }
        if dist.launched():
            tags["distributed.world_size"] = str(dist.world_size())
        if resume_run_id is not None and main:
            return tracker, _reopen(tracker, resume_run_id, tags, run_dir), tags
        run_id = tracker.start(
            run_name or default_run_name(cfg, modes, choices), tags=tags, parent_run_id=parent_run_id
        )
        log.info("MLflow run %s (%s) in %s (%s)", run_id, tracker.run_name, public_uri(tracker.uri), run_dir)
        return tracker, run_id, tags
    except BaseException as e:
        if isinstance(e, (UserError, KeyboardInterrupt)):
            raise
        raise UserError(
            f"tracking store {public_uri(store)}: {_first_line(e)}; nothing was run. Check that the "
            "store is reachable and writable (a read-only or full disk, a server down), or choose another "
            "with tracking.uri=..."
        ) from e


def _reopen(tracker, run_id: str, tags: dict, run_dir: Path) -> str:
    """The resumed run: RUNNING again, ``resumed`` counts the resumptions, the last attempt's error becomes history."""
    prior = tracker.reopen(run_id)
    resumed = int(prior.tags.get("resumed", "0")) + 1
    tracker.set_tags({**tags, "resumed": resumed})
    if "error" in prior.tags:
        tracker.set_tags({"resumed.previous_error": prior.tags["error"]})
        tracker.delete_tag("error")
    log.info("resuming MLflow run %s (%s), resumption %d, in %s", run_id, tracker.run_name, resumed, run_dir)
    return run_id


def _record_setup(ctx: RunContext, tracker, plain: dict, modes: list[str], choices: dict, parent_run_id) -> None:
    """``run_info.json``, an empty ``results.json``, ``config_resolved.yaml`` and the params, before any stage."""
    run_dir = ctx.run_dir
    info = {
        "run_id": tracker.run_id,
        "tracking_uri": public_uri(tracker.uri),
        "choices": choices,
        "parent_run_id": parent_run_id,
    }
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2, default=str))
    ctx.write_results()
    # the group choices first: a job that fails on its config still shows what it was in a sweep's table
    tracker.log_params({f"choice.{k}": str(v) for k, v in choices.items() if k != "mode"})
    saved = _redacted_config(plain)
    OmegaConf.save(OmegaConf.create(saved), run_dir / "config_resolved.yaml")
    params = flatten(saved)
    params["choice.mode"] = str(choices.get("mode", modes))  # Hydra does not record list-valued group choices
    choices.setdefault("mode", modes)
    changed = tracker.log_params(params)  # a resumed run: the allowed changes (model.device, ...) become a tag
    if changed:
        tracker.set_tags({"resumed.changed": "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in sorted(changed.items()))})


def _start_entities(tracker, cfg, main: bool) -> None:
    """MLflow 3 entities at the run's start: system metrics (``tracking.system_metrics``; stopped by
    ``tracker.end`` on every exit path) and the checkpoint's logged model (every result scalar is then logged
    against it). Neither can fail the run (:mod:`pipeline.record.tracking` warns once)."""
    if not main:
        return
    if cfg.tracking.get("system_metrics", True):
        tracker.start_system_metrics(float(cfg.tracking.get("system_metrics_interval_s", 2.0)))
    try:
        record = model_record(cfg.model)
    except Exception:  # noqa: BLE001 - an unreadable model path is the model stage's to report
        log.debug("no logged model for %s", cfg.model.get("path"), exc_info=True)
        record = None
    tracker.use_logged_model(record)


def _log_datasets(ctx: RunContext, tracker, cfg) -> None:
    """The reference and prompt sets the stages used, as the run's MLflow datasets (:func:`run_datasets`); a
    warning, never a change of the run's outcome."""
    try:
        tracker.log_datasets(run_datasets(ctx.artifacts, cfg))
    except Exception:  # noqa: BLE001
        log.warning("could not describe the datasets of %s:\n%s", ctx.run_dir, traceback.format_exc())


def _start_device(ctx: RunContext, tracker, modes: list[str]) -> None:
    ctx.device = dist.local_device(resolve_device(ctx.cfg.model.device))  # cuda:LOCAL_RANK under torchrun
    dist.init(ctx.device)  # once per process; a no-op unless launched by torchrun
    tracker.set_tags({"device": str(ctx.device), "modes": ",".join(modes)})


def _first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (a store's error can carry a page of SQL)."""

    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return redact_text(f"{type(e).__name__}: {text}"[:500])


def _redacted_config(plain: dict) -> dict:
    """The resolved config as saved and logged: credentials in ``tracking.uri`` redacted (``user:***@host``)."""

    uri = (plain.get("tracking") or {}).get("uri")
    if not uri:
        return plain
    return {**plain, "tracking": {**plain["tracking"], "uri": public_uri(str(uri))}}


def _close_run(
    ctx: RunContext,
    outcome: RunOutcome,
    tracker: Any,
    lock: Any,
    scratch: Path | None,
    main: bool,
    tags: dict,
    choices: dict,
    cfg: Any,
) -> str | None:
    """Close the run whatever happened: results.json, the ``error`` tag, progress shards (deleted only when the run
    FINISHED and its results are on disk), report.html, artifacts, the MLflow status, the lock, the summary. Each
    step that fails is reported and the rest still run; never raises. Returns one paragraph when closing failed a
    run whose work had finished (it then ends FAILED and stays resumable), else None."""

    run_dir = outcome.run_dir
    outcome.results = dict(ctx.results)
    problems: list[str] = []
    crash_point("closing")  # tests: a signal during the closing steps (held until they are done)

    def step(what: str, fn: Any) -> bool:
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001 - one failed step must not stop the others
            problems.append(f"{what} failed ({_first_line(e)})")
            log.debug("closing step %s failed", what, exc_info=True)
            return False

    wrote = step(f"writing {run_dir / 'results.json'}", ctx.write_results)
    if outcome.status == "FINISHED" and not wrote:  # the scalars are not on disk: the run is not done
        outcome.status, outcome.error = "FAILED", f"results.json could not be written: {problems[-1]}"
    if outcome.error:
        step("tagging the error", lambda: tracker.set_tags({"error": outcome.error}))
    if outcome.status == "FINISHED":  # nothing left to resume: the shards go (they hold every sample's features)
        shutil.rmtree(run_dir / PROGRESS_DIR, ignore_errors=True)
    if main:  # report.html before the upload, so it is one of the artifacts (pipeline.record.report)
        _log_datasets(ctx, tracker, cfg)
        _write_report(run_dir, outcome, tracker, tags, choices)
        step("uploading the artifacts", lambda: tracker.log_artifacts(run_dir, exclude=(PROGRESS_DIR, LOCK_FILE)))
    ended = step(f"ending the MLflow run as {outcome.status}", lambda: tracker.end(outcome.status))
    _leave_run_dir(lock, scratch)
    for p in run_dir.glob(".*.tmp"):  # an atomic write cut short (disk full) leaves its temp file
        p.unlink(missing_ok=True)
    for p in run_dir.glob("*.tmp"):
        p.unlink(missing_ok=True)
    paragraph = None
    if problems:
        store = (
            ""
            if ended
            else (
                f" The MLflow run {outcome.run_id} may still show RUNNING in "
                f"{public_uri(str(getattr(tracker, 'uri', '')))}; resuming it sets its status."
            )
        )
        paragraph = (
            f"run {outcome.run_id} in {run_dir}: closing the run did not complete: {'; '.join(problems)}."
            f"{store} Free disk space or fix the store, then finish it with: {resume_command(run_dir)}"
        )
        log.error("%s", paragraph)
    if main:
        log_summary(tracker, outcome, cfg)
        if outcome.status in ("KILLED", "FAILED"):
            log.error(
                "run %s %s; once the cause is fixed, finish it (same MLflow run, finished batches kept) with: %s",
                outcome.run_id,
                outcome.status,
                resume_command(run_dir),
            )
    unfinished = not ended or (outcome.error or "").startswith("results.json")
    return paragraph if problems and unfinished else None


def _write_report(run_dir: Path, outcome: RunOutcome, tracker: Any, tags: dict, choices: dict) -> None:
    """``<run_dir>/report.html`` (:func:`pipeline.record.report.write_run_report`) with the run's tags as stored; a report
    that cannot be written is a warning, never a change of the run's outcome."""
    try:
        write_run_report(
            run_dir,
            outcome.results,
            tags={**tags, **tracker.run_tags()},
            params={f"choice.{k}": str(v) for k, v in choices.items()},
            status=outcome.status,
        )
    except Exception:  # noqa: BLE001
        log.warning("could not write the report of %s:\n%s", run_dir, traceback.format_exc())


def log_summary(tracker: Any, outcome: RunOutcome, cfg: Any) -> None:
    """The run's last log lines: status, headline scalars (``pipeline.core.metric_keys.headline_keys``), run dir, MLflow
    run id and name, the links to the experiment's runs table and to the run, and how to open the MLflow UI."""

    try:
        scalars = [
            f"{k} = {format_value(outcome.results[k])}{interval_text(outcome.results, k)}"
            for k in headline_keys(outcome.results, cfg)
        ]
        title = f"run {outcome.status}" + (f": {outcome.error}" if outcome.error else "")
        if outcome.status != "FINISHED":  # values logged before it stopped: not the run's results
            title += " — incomplete: " + (
                "the values below are from the stages that finished, not final" if scalars else "no results"
            )
        log.info("%s", "\n".join(summary_lines(tracker, title, scalars, "run dir", outcome.run_dir)))
    except Exception:  # noqa: BLE001 - a summary must never hide the run's outcome
        log.warning("could not write the run summary:\n%s", traceback.format_exc())


def share_cores(launcher: Any) -> None:
    """Parallel local jobs split the cores: each of P joblib workers gets cpus // P torch threads. Left alone,
    every worker starts one thread per core and P workers oversubscribe the machine (torch's OpenMP threads
    slow down many-fold when they compete for cores)."""
    if "joblib" not in str(OmegaConf.select(launcher, "_target_", default="")).lower():
        return

    cpus = available_cpus()
    n_jobs = int(OmegaConf.select(launcher, "n_jobs", default=-1) or 1)
    parallel = min(cpus, n_jobs if n_jobs > 0 else max(1, cpus + 1 + n_jobs))  # joblib: -1 = all cores
    torch.set_num_threads(max(1, cpus // parallel))
    log.info(
        "joblib launcher, %d parallel jobs on %d CPUs: %d torch thread(s) per job",
        parallel,
        cpus,
        torch.get_num_threads(),
    )


def run_from_hydra(cfg: DictConfig) -> RunOutcome | None:
    """Hydra task function: user errors become one short line; in a multirun a failed job never stops the sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

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
        return run_pipeline(
            cfg,
            hc.runtime.output_dir,
            choices,
            parent_run_id=parent,
            run_name=cfg.tracking.run_name or name,
            resume_run_id=resume_id,
        )
    except UserError as e:
        log.error("error: %s", e)
        FAILED_JOBS.append(job or "run")
        _remove_if_untouched(Path(hc.runtime.output_dir))  # refused before any work: leave no empty run dir
        if not multirun:
            raise SystemExit(2) from None
    except Exception as e:
        paragraph = environment_failure(e, Path(hc.runtime.output_dir))
        if paragraph is not None:  # disk full, read-only file system: the user's to fix, no traceback
            log.error("error: %s", paragraph)
            FAILED_JOBS.append(job or "run")
            if not multirun:
                raise SystemExit(1) from None
            return None
        if not multirun:
            raise  # a bug, not a user error: keep the traceback
        log.exception("job failed: %s", job)
        FAILED_JOBS.append(job)
    return None


ENVIRONMENT_ERRNOS = {
    "ENOSPC": "the disk is full",
    "EDQUOT": "the disk quota is exceeded",
    "EROFS": "the file system is read-only",
    "EACCES": "permission denied",
    "EIO": "an I/O error",
}


def environment_failure(e: BaseException, run_dir: Path) -> str | None:
    """One paragraph for a failure of the machine rather than of the code (a full disk, a read-only file system,
    permissions) anywhere in ``e``'s chain, naming the file and the resume command; None for anything else."""
    import errno as errno_mod

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        # the tracking store (MLflow's client, its HTTP or SQL layer) lost or refusing writes
        if isinstance(e, ConnectionError) or type(e).__module__.split(".")[0] in (
            "mlflow",
            "requests",
            "sqlalchemy",
            "urllib3",
        ):
            return (
                f"the tracking store failed ({_first_line(e)}); the run stopped and its finished batches are kept. "
                f"Once the store is reachable and writable again, finish it with: {resume_command(run_dir)}"
            )
        if isinstance(e, OSError) and e.errno is not None:
            name = errno_mod.errorcode.get(e.errno, "")
            if name in ENVIRONMENT_ERRNOS:
                where = f" writing {e.filename}" if e.filename else ""
                return (
                    f"{ENVIRONMENT_ERRNOS[name]}{where} ({name}); the run stopped and its finished batches are "
                    f"kept. Free space or fix the permissions, then finish it with: {resume_command(run_dir)}"
                )
        e = e.__cause__ or e.__context__
    return None


def _remove_if_untouched(run_dir: Path) -> None:
    """Remove a run dir that holds only what Hydra wrote before the task ran (``.hydra/``, the job log): a run refused
    by its checks leaves nothing behind. A dir with anything else (an earlier attempt's files) is kept."""
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return
    if entries and all(p.name == ".hydra" or (p.is_file() and p.suffix == ".log") for p in entries):
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in (run_dir.parent, run_dir.parent.parent):  # runs/<date>/ that Hydra made for it, when now empty
            try:
                parent.rmdir()
            except OSError:
                break


def _earlier_attempt(cfg: DictConfig, job_dir: Path) -> str | None:
    """A sweep job whose dir holds an earlier attempt (a resumed sweep, a job requeued by the cluster): "FINISHED"
    when that attempt finished (skip the job), its run id when it can be resumed, None for a fresh job."""

    info = previous_run(job_dir)
    if not info or not info.get("run_id"):
        return None
    status = get_run(resolve_uri(cfg.tracking.uri, cfg.paths.outputs), info["run_id"]).info.status
    # every rank of a torchrun sweep decides alike (same job dir, same store); only rank 0 owns the lock
    if not resumable(job_dir, info["run_id"], status, check_owner=dist.is_main()):
        return "FINISHED"
    saved = saved_config(job_dir)
    if saved is not None:
        check_unchanged(to_plain(saved), resolve(cfg), str(job_dir))
    log.info("resuming %s (MLflow run %s, %s)", job_dir, info["run_id"], status)
    return info["run_id"]
