"""A run dir read back as data, for whoever continues or checks a run (runner, resume, reproduce): its
``run_info.json`` (validated), its saved config (``config_resolved.yaml`` through :func:`pipeline.config.load_saved`),
whether it may be resumed (status, the owner's lock) and which tracking store it may name.

Run dirs are data (docs/trust.md): nothing read here is executed or re-interpolated, and a tracking server named
only by a run dir is not contacted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.config import load_saved, rebuild
from pipeline.core import distributed as dist
from pipeline.core.progress import describe_owner, lock_owner
from pipeline.errors import UserError
from pipeline.record.tracking import flatten, is_server, public_uri, resolve_uri

log = logging.getLogger("pipeline.run.saved")

MAY_DIFFER = ("model.device", "tracking.", "paths.")  # what a resumed run may change (prefixes)


def may_differ(key: str) -> bool:
    return key == MAY_DIFFER[0] or key.startswith(MAY_DIFFER[1:])


def config_differences(saved: dict, new: dict) -> list[str]:
    """``key: saved -> new`` for every resolved key that differs (as MLflow params compare them: dot keys, string
    values), but for those in :data:`MAY_DIFFER`."""

    a, b = flatten(saved), flatten(new)
    return [
        f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k) and not may_differ(k)
    ]


def check_unchanged(saved: dict, new: dict, where: str) -> None:
    diffs = config_differences(saved, new)
    if diffs:
        raise UserError(
            f"{where}: a resumed run must have the saved config (only {', '.join(MAY_DIFFER)}* may "
            f"differ); these keys differ: {'; '.join(diffs)}"
        )


def saved_config(run_dir: Path, overrides: list[str] = ()):
    """The run's ``config_resolved.yaml`` as plain data through the schema (:func:`pipeline.config.load_saved`: no
    interpolation resolved, nothing instantiated, unknown keys refused naming the key and the file; ``paths.*`` and
    ``tracking.uri`` from this invocation), with ``overrides`` on top; None when the run never got that far."""

    file = run_dir / "config_resolved.yaml"
    return rebuild(load_saved(file), overrides) if file.is_file() else None


def previous_run(run_dir: Path) -> dict | None:
    """``run_info.json`` of the run that ran in ``run_dir`` before, if any, as checked data: ``run_id`` and
    ``parent_run_id`` MLflow ids (hex), ``choices`` group options (strings or lists of strings), ``tracking_uri`` a
    string; anything else in the file is ignored, a malformed one is a UserError naming the file and the key."""
    file = run_dir / "run_info.json"
    try:
        info = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        raise UserError(f"{file}: expected a JSON object with run_id, got {type(info).__name__}")
    out: dict = {}
    for key in ("run_id", "parent_run_id"):
        value = info.get(key)
        if value is not None and not (isinstance(value, str) and value.isalnum() and len(value) <= 64):
            raise UserError(f"{file}: {key}={str(value)[:80]!r}: expected an MLflow run id (hex)")
        out[key] = value
    uri = info.get("tracking_uri")
    out["tracking_uri"] = uri if isinstance(uri, str) else None
    choices = info.get("choices") or {}
    ok = lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))  # noqa: E731
    if not isinstance(choices, dict) or not all(isinstance(k, str) and ok(v) for k, v in choices.items()):
        raise UserError(f"{file}: choices: expected {{group: option or [options]}} strings")
    out["choices"] = choices
    return out


def resumable(run_dir: Path, run_id: str, status: str, check_owner: bool = True) -> bool:
    """False for a FINISHED run (nothing to do); True for FAILED/KILLED or RUNNING without a live owner;
    UserError naming the owner otherwise (``check_owner=False``: torchrun ranks other than 0, whose rank 0 holds
    the lock)."""

    if status == "FINISHED":
        return False
    owner = lock_owner(run_dir) if check_owner and dist.is_main() else None
    if owner is not None:
        raise UserError(
            f"run {run_id} in {run_dir} is {status} and its owner is alive: {describe_owner(owner)}; "
            "resume only a run whose process has ended"
        )
    return True


def trusted_store(recorded: str | None, run_dir: Path) -> str:
    """The store to resume a run dir in when the command line names none: the one it recorded when that is a local
    store (a SQLite file or a folder: nothing leaves the machine) or the server this invocation is configured for
    anyway (``MLFLOW_TRACKING_URI``); a server named only by the run dir is refused — the dir is data, and
    connecting would hand it this environment's MLflow credentials."""

    configured = resolve_uri(None, "outputs")
    if not recorded:
        return configured
    if not is_server(recorded) and not recorded.startswith("databricks"):
        return recorded
    if public_uri(configured) == public_uri(recorded):
        return configured  # the configured one carries the credentials (the recorded one is redacted)
    raise UserError(
        f"{run_dir / 'run_info.json'} names tracking server {public_uri(recorded)}; a run dir is data, "
        f"so its server is used only when you name it: add --tracking-uri {public_uri(recorded)}"
    )
