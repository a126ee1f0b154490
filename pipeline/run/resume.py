"""Continue a run (or a sweep) that crashed, was killed or pre-empted, in the same MLflow run.

    python -m pipeline.run.resume <mlflow-run-id | run-dir | sweep-dir> [key=value ...] [--tracking-uri URI]

A run: its saved ``config_resolved.yaml`` is run again in its own run dir as the same MLflow run (status RUNNING,
then FINISHED; tag ``resumed`` = number of resumptions). The metrics mode generates only the batches whose shard
is not in ``<run dir>/progress/`` ("resuming at sample k of N"); the scalars equal an uninterrupted run's (timings
aside). Resumable: a FAILED or KILLED run, or a RUNNING one whose owner is gone (a SIGKILL leaves the MLflow run
RUNNING; its ``run.lock`` is then stale: pid gone, or no heartbeat for 2 minutes). A run whose owner is alive is
refused; a FINISHED one has nothing to resume.

Only ``model.device``, ``tracking.*`` and ``paths.*`` may differ from the saved config (a requeued job gets
another GPU); any other override, ``sampler.batch_size`` included, is refused naming the differing keys.

Run and sweep dirs are data (README, *Trust model*): the saved config is read as plain values (no interpolation is
resolved again, nothing is instantiated, a key the schema lacks is refused naming it and the file); ``paths.*`` and
``tracking.uri`` come from this command line or the defaults; a tracking server named only by the run dir is not
contacted; a sweep replays only task overrides of the project's schema and groups and the launcher's plain settings.

A sweep dir (``outputs/multirun/...``): the sweep is launched again with its saved overrides and launcher into
the same dir and parent run; finished jobs are skipped, unfinished ones resumed, never-started ones run. The same
happens to a job that a cluster requeues (``hydra/launcher=slurm``: submitit requeues a pre-empted job into its
own job dir).

Under ``torchrun`` (``torchrun --nproc_per_node K -m pipeline.run.resume RUN_DIR``) every rank regenerates only the
missing batches of its own shard.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import subprocess
import sys
from pathlib import Path

from pipeline.config import (
    CONF_DIR,
    check_list_choices,
    check_override_keys,
    group_options,
    load_saved,
    rebuild,
    to_plain,
)
from pipeline.errors import UserError
from pipeline.record.naming import override_key
from pipeline.record.tracking import PARENT_RUN_FILE, get_run, public_uri, resolve_uri
from pipeline.run.runner import run_pipeline
from pipeline.run.saved import MAY_DIFFER, check_unchanged, may_differ, previous_run, resumable, trusted_store

log = logging.getLogger("pipeline.run.resume")


def _locate(ref: str, tracking_uri: str | None) -> tuple[Path, dict, str]:
    """(run dir, run info, store) of a run dir or an MLflow run id."""

    path = Path(ref)
    if path.is_dir():
        info = previous_run(path)
        if info is None or not info.get("run_id"):
            raise UserError(
                f"run dir {ref!r} has no run_info.json; expected a run directory written by python -m "
                "pipeline (or a sweep dir with mlflow_parent_run_id)"
            )
        return path, info, tracking_uri or trusted_store(info.get("tracking_uri"), path)
    uri = resolve_uri(tracking_uri, "outputs")
    run = get_run(uri, ref)
    run_dir = run.data.tags.get("run_dir")
    if not run_dir or not Path(run_dir).is_dir():
        raise UserError(
            f"run {ref} in {public_uri(uri)}: its run dir {run_dir!r} is not on this machine; pass the run dir instead"
        )
    info = previous_run(Path(run_dir)) or {"run_id": ref}
    return Path(run_dir), info, uri


def resume_run(ref: str, overrides: list[str], tracking_uri: str | None = None):
    """Resume one run; returns its :class:`~pipeline.run.runner.RunOutcome` (None when it had already finished)."""

    run_dir, info, store = _locate(ref, tracking_uri)
    uri_override = next((o.split("=", 1)[1] for o in overrides if override_key(o) == "tracking.uri"), None)
    store = uri_override or store
    run_id = info["run_id"]
    status = get_run(store, run_id).info.status
    if not resumable(run_dir, run_id, status):
        log.info("run %s (%s) already FINISHED: nothing to resume", run_id, run_dir)
        return None
    file = run_dir / "config_resolved.yaml"
    if not file.is_file():
        raise UserError(
            f"run dir {run_dir} has no config_resolved.yaml (the run failed before its config resolved); "
            "start it again instead"
        )
    saved = load_saved(file)  # read and checked once; the overrides go on top of the same data
    cfg = rebuild(saved, overrides)
    check_unchanged(to_plain(rebuild(saved)), to_plain(cfg), f"resume {run_id}")
    log.info("resuming run %s (%s) in %s", run_id, status, run_dir)
    return run_pipeline(
        cfg,
        run_dir,
        choices=info.get("choices"),
        parent_run_id=info.get("parent_run_id"),
        tracking_uri=store,
        resume_run_id=run_id,
    )


def sweep_command(sweep_dir: Path, overrides: list[str]) -> list[str]:
    """The command that relaunches the sweep of ``sweep_dir`` into it: its saved overrides (:func:`replayable`)."""
    task, hydra = replayable(sweep_dir / "multirun.yaml")
    return [sys.executable, "-m", "pipeline", "-m", *task, *hydra, f"hydra.sweep.dir={sweep_dir.resolve()}", *overrides]


# Hydra settings a sweep dir may carry back: the launcher (an option of the project's conf/hydra/launcher group) and
# its plain settings (n_jobs, timeout_min, ...); nothing that names code (_target_, callbacks) or other Hydra nodes.
REPLAYED_HYDRA = ("hydra/launcher=", "hydra.launcher.", "hydra.sweeper.params.")


def replayable(multirun_yaml: Path) -> tuple[list[str], list[str]]:
    """(task overrides, Hydra overrides) of a sweep's ``multirun.yaml``, read as data and checked, so that a crafted
    sweep dir cannot run code or read the environment: the task overrides must be keys of the schema or options of
    the project's config groups (:func:`pipeline.config.check_override_keys`, ``check_list_choices``); of Hydra's own
    overrides only :data:`REPLAYED_HYDRA` ones are replayed (``hydra.mode``/``hydra.sweep.dir`` are set again); no
    value may hold an interpolation. Anything else is a UserError naming the override and the file."""
    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        saved = yaml.safe_load(multirun_yaml.read_text())
        task = saved["hydra"]["overrides"]["task"] or []
        hydra = saved["hydra"]["overrides"]["hydra"] or []
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise UserError(
            f"{multirun_yaml}: expected hydra.overrides.task and .hydra lists, as Hydra writes them "
            f"({type(e).__name__})"
        ) from None
    if not all(isinstance(o, str) for o in [*task, *hydra]):
        raise UserError(f"{multirun_yaml}: hydra.overrides: expected lists of key=value strings")
    for o in [*task, *hydra]:
        if "${" in o:
            raise UserError(
                f"{multirun_yaml}: override {o[:80]!r} refused: a saved override is replayed as typed and "
                "never resolves an interpolation"
            )
    bad_task = [o for o in task if o.lstrip("+~").startswith("hydra")]
    if bad_task:
        raise UserError(
            f"{multirun_yaml}: hydra.overrides.task: {bad_task[0]!r} refused: Hydra's settings are not task overrides"
        )
    try:
        parsed = OverridesParser.create().parse_overrides(list(task))
    except Exception as e:  # noqa: BLE001 - Hydra's parse error, named with the file
        raise UserError(f"{multirun_yaml}: hydra.overrides.task does not parse: {str(e).splitlines()[0]}") from None
    for o in parsed:  # a group choice must be one of the project's options
        group = o.key_or_group
        if (
            (CONF_DIR / group).is_dir()
            and not o.is_sweep_override()
            and isinstance(o.value(), str)
            and o.value() not in group_options(group)
            and o.value() != "null"
        ):
            raise UserError(
                f"{multirun_yaml}: {o.input_line!r}: {o.value()!r} is not an option of {group} "
                f"({', '.join(group_options(group))})"
            )
    try:
        check_list_choices(task)
        check_override_keys(task)
    except UserError as e:
        raise UserError(f"{multirun_yaml}: {e}") from None
    replayed = []
    for o in hydra:
        if o.startswith(("hydra.mode=", "hydra.sweep.dir=")):
            continue  # set again by the relaunch
        key = o.split("=", 1)[0]
        ok = (
            o.startswith(REPLAYED_HYDRA)
            and "_target_" not in key
            and not any(p.startswith("_") for p in key.split("."))
        )
        if ok and o.startswith("hydra/launcher="):  # an option name: a config on Hydra's search path, not code
            ok = re.fullmatch(r"[A-Za-z0-9_]+", o.split("=", 1)[1]) is not None
        if not ok:
            raise UserError(
                f"{multirun_yaml}: hydra.overrides.hydra: {o[:120]!r} refused: only the launcher "
                "(hydra/launcher=<option>) and its plain settings are replayed from a sweep dir; Hydra's "
                "other settings come from the project's config"
            )
        replayed.append(o)
    return list(task), replayed


def is_sweep_dir(path: Path) -> bool:

    return (path / PARENT_RUN_FILE).is_file() and (path / "multirun.yaml").is_file()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.run.resume", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="MLflow run id, run directory or sweep directory")
    parser.add_argument("overrides", nargs="*", help="key=value: only model.device, tracking.*, paths.* may change")
    parser.add_argument("--tracking-uri", default=None, help="store holding the run (default: the run's own)")
    args = parser.parse_intermixed_args(argv)  # options may come between the run and its overrides
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")

    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        log.error("error: expected key=value overrides, got %s", bad)
        return 2
    path = Path(args.run)
    if path.is_dir() and is_sweep_dir(path):
        wrong = [o for o in args.overrides if not may_differ(override_key(o))]
        if wrong:
            log.error("error: a resumed sweep may only change %s*; refused: %s", ", ".join(MAY_DIFFER), wrong)
            return 2
        try:
            cmd = sweep_command(path, args.overrides)
        except UserError as e:
            log.error("error: %s", e)
            return 2
        log.info("resuming sweep %s: %s", path, " ".join(cmd[2:]))
        return subprocess.call(cmd)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        outcome = resume_run(args.run, args.overrides, args.tracking_uri)
    except UserError as e:
        log.error("error: %s", e)
        return 2
    except KeyboardInterrupt:
        return 130  # the run ended KILLED and stays resumable
    return 0 if outcome is None or outcome.status == "FINISHED" else 1


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (pre-emption) ends the run KILLED, as in python -m pipeline


if __name__ == "__main__":
    sys.exit(main())
