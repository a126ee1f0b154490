"""Continue a run (or a sweep) that crashed, was killed or pre-empted, in the same MLflow run.

    python -m pipeline.resume <mlflow-run-id | run-dir | sweep-dir> [key=value ...] [--tracking-uri URI]

A run: its saved ``config_resolved.yaml`` is run again in its own run dir as the same MLflow run (status RUNNING,
then FINISHED; tag ``resumed`` = number of resumptions). The metrics mode generates only the batches whose shard
is not in ``<run dir>/progress/`` ("resuming at sample k of N"); the scalars equal an uninterrupted run's (timings
aside). Resumable: a FAILED or KILLED run, or a RUNNING one whose owner is gone (a SIGKILL leaves the MLflow run
RUNNING; its ``run.lock`` is then stale: pid gone, or no heartbeat for 2 minutes). A run whose owner is alive is
refused; a FINISHED one has nothing to resume.

Only ``model.device``, ``tracking.*`` and ``paths.*`` may differ from the saved config (a requeued job gets
another GPU); any other override, ``sampler.batch_size`` included, is refused naming the differing keys.

A sweep dir (``outputs/multirun/...``): the sweep is launched again with its saved overrides and launcher into
the same dir and parent run; finished jobs are skipped, unfinished ones resumed, never-started ones run. The same
happens to a job that a cluster requeues (``hydra/launcher=slurm``: submitit requeues a pre-empted job into its
own job dir).

Under ``torchrun`` (``torchrun --nproc_per_node K -m pipeline.resume RUN_DIR``) every rank regenerates only the
missing batches of its own shard.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.errors import UserError

log = logging.getLogger("pipeline.resume")

MAY_DIFFER = ("model.device", "tracking.", "paths.")  # what a resumed run may change (prefixes)


def may_differ(key: str) -> bool:
    return key == MAY_DIFFER[0] or key.startswith(MAY_DIFFER[1:])


def config_differences(saved: dict, new: dict) -> list[str]:
    """``key: saved -> new`` for every resolved key that differs (as MLflow params compare them: dot keys, string
    values), but for those in :data:`MAY_DIFFER`."""
    from pipeline.tracking import flatten

    a, b = flatten(saved), flatten(new)
    return [f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and not may_differ(k)]


def check_config(saved: dict, new: dict, where: str) -> None:
    diffs = config_differences(saved, new)
    if diffs:
        raise UserError(f"{where}: a resumed run must have the saved config (only {', '.join(MAY_DIFFER)}* may "
                        f"differ); these keys differ: {'; '.join(diffs)}")


def saved_config(run_dir: Path):
    """The run's ``config_resolved.yaml`` through the schema (keys added to it since the run are then no
    differences), None when the run never got that far."""
    from pipeline.config import validate

    file = run_dir / "config_resolved.yaml"
    return validate(OmegaConf.to_container(OmegaConf.load(file))) if file.is_file() else None


def previous_run(run_dir: Path) -> dict | None:
    """``run_info.json`` of the run that ran in ``run_dir`` before, if any."""
    file = run_dir / "run_info.json"
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def resumable(run_dir: Path, run_id: str, status: str, check_owner: bool = True) -> bool:
    """False for a FINISHED run (nothing to do); True for FAILED/KILLED or RUNNING without a live owner;
    UserError naming the owner otherwise (``check_owner=False``: torchrun ranks other than 0, whose rank 0 holds
    the lock)."""
    from pipeline import distributed as dist
    from pipeline.progress import describe_owner, lock_owner

    if status == "FINISHED":
        return False
    owner = lock_owner(run_dir) if check_owner and dist.is_main() else None
    if owner is not None:
        raise UserError(f"run {run_id} in {run_dir} is {status} and its owner is alive: {describe_owner(owner)}; "
                        "resume only a run whose process has ended")
    return True


def _locate(ref: str, tracking_uri: str | None) -> tuple[Path, dict, str]:
    """(run dir, run info, store) of a run dir or an MLflow run id."""
    from pipeline.tracking import get_run, resolve_uri

    path = Path(ref)
    if path.is_dir():
        info = previous_run(path)
        if info is None or not info.get("run_id"):
            raise UserError(f"run dir {ref!r} has no run_info.json; expected a run directory written by python -m "
                            "pipeline (or a sweep dir with mlflow_parent_run_id)")
        return path, info, tracking_uri or info.get("tracking_uri") or resolve_uri(None, "outputs")
    uri = resolve_uri(tracking_uri, "outputs")
    run = get_run(uri, ref)
    run_dir = run.data.tags.get("run_dir")
    if not run_dir or not Path(run_dir).is_dir():
        raise UserError(f"run {ref} in {uri}: its run dir {run_dir!r} is not on this machine; pass the run dir instead")
    info = previous_run(Path(run_dir)) or {"run_id": ref}
    return Path(run_dir), info, uri


def resume_run(ref: str, overrides: list[str], tracking_uri: str | None = None):
    """Resume one run; returns its :class:`~pipeline.runner.RunOutcome` (None when it had already finished)."""
    from pipeline.config import to_plain
    from pipeline.naming import override_key
    from pipeline.runner import run_pipeline
    from pipeline.tracking import get_run

    run_dir, info, store = _locate(ref, tracking_uri)
    uri_override = next((o.split("=", 1)[1] for o in overrides if override_key(o) == "tracking.uri"), None)
    store = uri_override or store
    run_id = info["run_id"]
    status = get_run(store, run_id).info.status
    if not resumable(run_dir, run_id, status):
        log.info("run %s (%s) already FINISHED: nothing to resume", run_id, run_dir)
        return None
    cfg = saved_config(run_dir)
    if cfg is None:
        raise UserError(f"run dir {run_dir} has no config_resolved.yaml (the run failed before its config resolved); "
                        "start it again instead")
    saved = to_plain(cfg)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    check_config(saved, to_plain(cfg), f"resume {run_id}")
    log.info("resuming run %s (%s) in %s", run_id, status, run_dir)
    return run_pipeline(cfg, run_dir, choices=info.get("choices"), parent_run_id=info.get("parent_run_id"),
                        tracking_uri=store, resume_run_id=run_id)


def sweep_command(sweep_dir: Path, overrides: list[str]) -> list[str]:
    """The command that relaunches the sweep of ``sweep_dir`` into it: its saved task overrides and launcher."""
    saved = OmegaConf.load(sweep_dir / "multirun.yaml")
    task = list(OmegaConf.select(saved, "hydra.overrides.task") or [])
    hydra = [o for o in OmegaConf.select(saved, "hydra.overrides.hydra") or []
             if not o.startswith(("hydra.mode=", "hydra.sweep.dir="))]
    return [sys.executable, "-m", "pipeline", "-m", *task, *hydra, f"hydra.sweep.dir={sweep_dir.resolve()}", *overrides]


def is_sweep_dir(path: Path) -> bool:
    from pipeline.tracking import PARENT_RUN_FILE

    return (path / PARENT_RUN_FILE).is_file() and (path / "multirun.yaml").is_file()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.resume", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="MLflow run id, run directory or sweep directory")
    parser.add_argument("overrides", nargs="*", help="key=value: only model.device, tracking.*, paths.* may change")
    parser.add_argument("--tracking-uri", default=None, help="store holding the run (default: the run's own)")
    args = parser.parse_intermixed_args(argv)  # options may come between the run and its overrides
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from pipeline.naming import override_key

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
        cmd = sweep_command(path, args.overrides)
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
