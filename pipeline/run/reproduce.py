"""Re-run a past run from its saved resolved config and check every scalar.

    python -m pipeline.run.reproduce <mlflow-run-id | run-dir> [key=value ...] [--tracking-uri URI] [--rtol 0]

The saved ``config_resolved.yaml`` (run dir, or the run's MLflow artifacts) is read as data
(:func:`pipeline.config.load_saved`: no interpolation resolved again, nothing instantiated, every key and value
checked against the schema) and run as a new MLflow run tagged ``reproduced_from=<run id>``. Each scalar is printed
with whether it matches; exit code 0 only if all match (exactly, by default: on CPU with the same seed they must).
Trailing ``key=value`` overrides (e.g. ``paths.outputs=/tmp/x``) apply on top of the saved config. Where the new run
writes and logs (``paths.*``, ``tracking.uri``) comes from this command line or the project's defaults, never from
the saved config.

A run id is read from ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///outputs/mlflow.db``, and
the new run is logged to that same store unless ``tracking.uri=...`` is overridden. A run dir is re-run into
``--tracking-uri`` when given, else ``tracking.uri=...``, else ``MLFLOW_TRACKING_URI``, else
``<paths.outputs>/mlflow.db``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from pipeline.config import load_saved, rebuild
from pipeline.core.metric_keys import is_timing
from pipeline.errors import UserError
from pipeline.record.naming import override_key, run_name
from pipeline.record.tracking import download_artifact, get_run, redact_uri, resolve_uri
from pipeline.run.runner import run_pipeline, selected_modes
from pipeline.run.saved import previous_run

log = logging.getLogger("pipeline.run.reproduce")


def load_source(ref: str, tracking_uri: str | None, workdir: Path) -> tuple[dict, dict, dict]:
    """(resolved config, results, run info) of a run dir or an MLflow run id."""
    path = Path(ref)
    if path.is_dir():
        files = {name: path / name for name in ("config_resolved.yaml", "results.json", "run_info.json")}
        missing = [str(f) for f in list(files.values())[:2] if not f.is_file()]
        if missing:
            raise UserError(f"run dir {ref!r} lacks {missing}; expected a run directory written by python -m pipeline")
    else:
        uri = resolve_uri(tracking_uri, "outputs")
        get_run(uri, ref)  # clear error for an unknown id
        files = {}
        for name in ("config_resolved.yaml", "results.json", "run_info.json"):
            try:
                files[name] = download_artifact(uri, ref, name, workdir)
            except Exception as e:  # noqa: BLE001
                if name == "run_info.json":
                    continue
                raise UserError(f"run {ref!r} in {redact_uri(uri)} has no artifact {name!r}: {e}") from e

    cfg = load_saved(files["config_resolved.yaml"])  # data: nothing resolved or instantiated, paths/tracking.uri ours
    results = _read_results(files["results.json"])
    info = (
        previous_run(files["run_info.json"].parent)
        if files.get("run_info.json") and files["run_info.json"].is_file()
        else {}
    )
    info = dict(info or {})
    if not path.is_dir():
        info["run_id"] = ref
    return cfg, results, info


def _read_results(file: Path) -> dict[str, float]:
    """``results.json`` as data: a JSON object of ``<mode>/<name>`` keys and numbers (NaN and inf as Python's json
    writes them); anything else is a UserError naming the file and the key."""
    try:
        results = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{file}: not a readable JSON object of scalars ({type(e).__name__})") from None
    if not isinstance(results, dict):
        raise UserError(f"{file}: expected a JSON object of scalars, got {type(results).__name__}")
    for key, value in results.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UserError(f"{file}: {key!r}: expected a number, got {type(value).__name__}")
    return {k: float(v) for k, v in results.items()}


# shown, never compared: wall-clock figures (TIMING: they differ between any two runs; pipeline.core.metric_keys.is_timing)
# and how the run was split (SETUP: metrics/num_shards, the world size; a sharded run reproduced in one process
# measures the same thing)
SETUP_KEYS = ("metrics/num_shards",)


def kind(key: str) -> str:
    """``TIMING``, ``SETUP`` (both shown, not compared) or ``RESULT``."""
    return "SETUP" if key in SETUP_KEYS else "TIMING" if is_timing(key) else "RESULT"


def same(a: float | None, b: float | None, rtol: float) -> bool:
    if a is None or b is None:
        return False
    if math.isnan(a) and math.isnan(b):
        return True
    return a == b or abs(a - b) <= rtol * max(abs(a), abs(b))


def compare(original: dict[str, float], new: dict[str, float], rtol: float) -> tuple[bool, list[str]]:
    lines, ok = [], True
    width = max((len(k) for k in original.keys() | new.keys()), default=10)
    for key in sorted(original.keys() | new.keys()):
        a, b = original.get(key), new.get(key)
        if kind(key) != "RESULT" and a is not None and b is not None:
            lines.append(f"{kind(key):<8} {key:<{width}}  {a!s:>22}  {b!s:>22}")
            continue
        match = same(a, b, rtol)
        ok &= match
        lines.append(f"{'MATCH   ' if match else 'MISMATCH'} {key:<{width}}  {a!s:>22}  {b!s:>22}")
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.run.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="MLflow run id or run directory")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to the saved config")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="store holding the run id, and of the new run unless tracking.uri=... is given "
        "(default: $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db)",
    )
    parser.add_argument("--rtol", type=float, default=0.0, help="relative tolerance per scalar (default: exact)")
    args = parser.parse_intermixed_args(argv)  # options may come between the run and its overrides
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")

    try:
        with tempfile.TemporaryDirectory() as tmp:
            saved, original, info = load_source(args.run, args.tracking_uri, Path(tmp))
        cfg = rebuild(saved, args.overrides)
        source_id = info.get("run_id", str(args.run))
        run_dir = Path(cfg.paths.outputs) / "reproduce" / datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")
        # the new run goes where the source was read from, unless the command line names a store
        store = None
        if not any(override_key(o) == "tracking.uri" for o in args.overrides) and (
            args.tracking_uri or not Path(args.run).is_dir()
        ):
            store = resolve_uri(args.tracking_uri, "outputs")
        try:
            modes = selected_modes(cfg, info.get("choices"))
        except UserError:
            modes = []  # fails in run_pipeline with its message
        what = run_name(cfg, modes, info.get("choices"))
        log.info("reproducing %s in %s", source_id, run_dir)
        outcome = run_pipeline(
            cfg,
            run_dir,
            choices=info.get("choices"),
            extra_tags={"reproduced_from": source_id},
            run_name=f"reproduce {source_id[:8]}" + (f"·{what}" if what else ""),
            tracking_uri=store,
        )
    except UserError as e:
        log.error("error: %s", e)
        return 2
    ok, lines = compare(original, outcome.results, args.rtol)
    print(f"reproduced {source_id} as run {outcome.run_id} ({run_dir})")
    print(f"{'':8} {'scalar':<{max((len(l) for l in original), default=6)}}  {'original':>22}  {'reproduced':>22}")
    print("\n".join(lines))
    n_bad = sum(1 for l in lines if l.startswith("MISMATCH"))
    compared = [l for l in lines if not l.startswith(("TIMING", "SETUP"))]
    print(
        f"{len(compared) - n_bad}/{len(compared)} scalars match"
        + ("" if ok else " — NOT reproduced")
        + (
            f" ({len(lines) - len(compared)} timing/setup figure(s) shown, not compared)"
            if len(compared) < len(lines)
            else ""
        )
    )
    return 0 if ok and lines else 1


if __name__ == "__main__":
    sys.exit(main())
