"""MLflow tracking. The only module that imports mlflow.

Every run is an MLflow run. The store (:func:`resolve_uri`): a non-null ``tracking.uri`` (any config or the command
line) wins, then the environment variable ``MLFLOW_TRACKING_URI``, then the embedded SQLite store
``<paths.outputs>/mlflow.db`` (artifacts under ``<paths.outputs>/mlartifacts``). A multirun gets one parent run
(opened by :class:`SweepCallback`) and one child run per job (tag ``mlflow.parentRunId``). Runs are always
ended, with FAILED/KILLED and an ``error`` tag when something goes wrong.

MLflow 3 opens an experiment on its GenAI overview page; :func:`run_links` gives the deep links to the runs table
(``<ui>/#/experiments/<id>/runs``) and to one run, and :func:`ui_command` the command that serves a local store.

Credentials. A store URI may carry them (``http://user:password@host:5000``, ``postgresql://user:password@db/mlflow``),
or MLflow's own environment variables may (``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD`` for HTTP
Basic, ``MLFLOW_TRACKING_TOKEN`` for a Bearer token; also MLflow's ``~/.mlflow/credentials``). The URI is handed to
MLflow as given: MLflow (through ``requests``) sends a URI's ``user:password`` as Basic auth to that host only, and the
variables otherwise; userinfo wins over the variables, as in MLflow. A lone ``https://token@host`` is sent by neither
(``requests`` ignores a userinfo without ``:``): a token goes in ``MLFLOW_TRACKING_TOKEN``. Nothing is copied into the
environment, so credentials never follow the process to another store or into child processes.
:func:`_check_reachable` asks the server through MLflow's own HTTP layer with the same credentials, so it fails
exactly where :class:`MlflowClient` would: a 401/403 is "reachable but refused, check the credentials", not
"unreachable". A URI whose password is the redaction mark (``user:***@host``, as saved in a run dir) has its userinfo
dropped, so the variables apply. Every URI this module prints, logs, tags, raises or returns for display goes through
:func:`redact_uri` / :func:`redact_text` (``user:***@host``, secret query values ``***``), and every exception raised
by a :class:`Tracker`'s client leaves with its message (and its chain's) redacted.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.core.metric_keys import FD_BIASED_TAG, PROGRESS_PREFIX, PROMPT_PROTOCOL_TAG
from pipeline.errors import UserError

# Fail fast on an unreachable server instead of MLflow's default minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
# MLflow prints "View run ... at: <tracking URI>/#/..." when a server run ends, userinfo (the password) included; the
# project prints its own links (summary_lines, no credential), so MLflow's are always off.
os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"

import mlflow  # noqa: E402
from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput, Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

try:  # MLflow's system metrics need psutil (a dependency of mlflow, not of mlflow-skinny)
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # noqa: E402
except ImportError as _missing:  # pragma: no cover - reported when a run asks for system metrics
    SystemMetricsMonitor, _NO_SYSTEM_METRICS = None, _missing

log = logging.getLogger(__name__)
for noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking._tracking_service", "mlflow.system_metrics"):
    logging.getLogger(noisy).setLevel(logging.WARNING)

PARENT_RUN_FILE = "mlflow_parent_run_id"
SWEEP_PARAMS_FILE = "mlflow_sweep_params.json"  # {swept key: [values]}, read by each job to name its run
ENV_URI = "MLFLOW_TRACKING_URI"
DEFAULT_UI = "http://127.0.0.1:5000"  # where a plain `mlflow ui` serves
EFFECTIVE_URI_TAG = "tracking.uri_effective"
MODEL_IDENTITY_TAG = "diffusion_lens.checkpoint"  # a logged model's checkpoint identity (pipeline.record.entities)
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
MAX_PARAM_KEY = 250
MAX_TAG_VALUE = 5000
MAX_RUN_NAME = 250
REPO_ROOT = Path(__file__).resolve().parents[2]  # pipeline/record/tracking.py -> the checkout


def default_uri(outputs_dir: str | Path) -> str:
    return f"sqlite:///{Path(outputs_dir).resolve() / 'mlflow.db'}"


def resolve_uri(configured: str | None, outputs_dir: str | Path) -> str:
    """The store to use: ``configured`` (``tracking.uri``, or a CLI's ``--tracking-uri``) when set, else the
    environment variable ``MLFLOW_TRACKING_URI``, else ``sqlite:///<outputs_dir>/mlflow.db``."""
    return configured or os.environ.get(ENV_URI) or default_uri(outputs_dir)


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


REDACTED = "***"
# scheme://userinfo@ : userinfo runs to the last "@" before the host's end ("/", "?", "#", whitespace, a quote)
_USERINFO = re.compile(
    r"""(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#@'"<>`]*(?:@[^\s/?#@'"<>`]*)*)@"""
)
# ?key=value / &key=value / ;key=value whose key names a secret (case-insensitive, "-" and "_" ignored)
_QUERY = re.compile(r"""(?P<lead>[?&;])(?P<key>[A-Za-z0-9_.\-]+)=(?P<value>[^&;#\s'"<>`]+)""")
_SECRET_KEY_EXACT = {"sig", "key", "pass", "pw", "sas", "code", "auth"}
_SECRET_KEY_PARTS = (
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "signature",
    "credential",
    "apikey",
    "accesskey",
    "privatekey",
    "authorization",
    "sessionkey",
)
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def _secret_key(key: str) -> bool:
    k = key.lower().replace("-", "").replace("_", "")
    return k in _SECRET_KEY_EXACT or any(part in k for part in _SECRET_KEY_PARTS)


def _redact_userinfo(m: re.Match) -> str:
    user, sep, _password = m["userinfo"].partition(":")
    # user:password -> user:***, a lone token (https://token@host) -> ***
    return f"{m['scheme']}{user}:{REDACTED}@" if sep else f"{m['scheme']}{REDACTED}@"


def _redact_query(m: re.Match) -> str:
    return f"{m['lead']}{m['key']}={REDACTED}" if _secret_key(m["key"]) else m[0]


def redact_text(text: Any) -> str:
    """``text`` with every credential in it replaced by ``***``: the userinfo of any ``scheme://user:password@host``
    (``user:***@host``; a token alone: ``***@host``), the values of query keys that name a secret (``password``,
    ``token``, ``access_token``, ``sig``, ``X-Amz-Signature``, ``api_key``...), and the values of
    ``MLFLOW_TRACKING_PASSWORD``/``MLFLOW_TRACKING_TOKEN`` (8 characters or more) wherever they appear. Safe to print,
    log, tag and write. Text without credentials comes back unchanged.

    >>> redact_text("cannot reach 'http://me:pa55@host:5000/' (refused)")
    "cannot reach 'http://me:***@host:5000/' (refused)"
    """
    text = str(text)
    if "@" in text:
        text = _USERINFO.sub(_redact_userinfo, text)
    if "=" in text:
        text = _QUERY.sub(_redact_query, text)
    for name in _SECRET_ENV:
        value = os.environ.get(name) or ""
        if len(value) >= 8 and value in text:
            text = text.replace(value, REDACTED)
    return text


def redact_uri(uri: str) -> str:
    """``uri`` safe to log, tag and show: credentials replaced by ``***`` (``http://user:pass@h:5000/p`` ->
    ``http://user:***@h:5000/p``, ``https://token@h`` -> ``https://***@h``, ``?password=x`` -> ``?password=***``),
    for any scheme (``postgresql://``, ``mysql+pymysql://``...). A URI without credentials comes back unchanged.

    >>> redact_uri("postgresql://mlflow:s3cret@db:5432/mlflow?sslmode=require")
    'postgresql://mlflow:***@db:5432/mlflow?sslmode=require'
    """
    return redact_text(uri)


public_uri = redact_uri  # the name the rest of the project uses


class _RedactingFilter(logging.Filter):
    """Log records of MLflow's own threads (the system-metrics monitor quotes its errors, URLs included) redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logged as it is
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


for _name in ("mlflow.system_metrics.system_metrics_monitor", "mlflow.utils.autologging_utils"):
    logging.getLogger(_name).addFilter(_RedactingFilter())

_WARNED: set[str] = set()  # MLflow 3 features that failed in this process (warned once, never again)


def _warn_once(feature: str, exc: BaseException, consequence: str) -> None:
    """One warning per ``feature`` per process (a sweep of 14 jobs on an old server: one line, not 14)."""
    if feature in _WARNED:
        log.debug("%s failed again: %s", feature, redact_text(exc))
        return
    _WARNED.add(feature)
    log.warning(  # the feature in the template: each feature is its own cause (pipeline.core.repeats)
        f"MLflow {feature} failed (%s); %s. The run goes on (a store or server older than MLflow 3 lacks it).",
        _short_reason(exc),
        consequence,
    )


def _split_userinfo(uri: str) -> tuple[str | None, str]:
    """``(userinfo or None, uri without it)``; the userinfo ends at the last "@" of the authority, as in urllib."""
    scheme, sep, rest = uri.partition("://")
    end = min([i for i in (rest.find(c) for c in "/?#") if i >= 0], default=len(rest))
    netloc = rest[:end]
    if not sep or "@" not in netloc:
        return None, uri
    info, _, host = netloc.rpartition("@")
    return info, f"{scheme}://{host}{rest[end:]}"


def usable_uri(uri: str) -> str:
    """The store URI to connect with: ``uri`` itself, except that a redacted one (``user:***@host``, as a run dir
    saves it) loses its userinfo, so that MLflow's credential variables apply instead of the password ``***``."""
    info, bare = _split_userinfo(uri)
    if info is not None and (info == REDACTED or info.partition(":")[2] == REDACTED):
        return bare
    return uri


def ui_base(uri: str) -> str:
    """The MLflow UI of store ``uri``: the server itself, or what ``mlflow ui`` serves for a local store. A link to
    click: no userinfo at all (the browser asks for the credentials), secret query values redacted."""
    return redact_uri(_split_userinfo(uri)[1]).rstrip("/") if is_server(uri) else DEFAULT_UI


def run_links(run_id: str, uri: str, experiment_id: str | None = None) -> tuple[str, str]:
    """``(experiment runs table, the run)`` in the MLflow UI of ``uri``. MLflow 3 opens an experiment on its GenAI
    overview ("Traces 0"); these go straight to the runs. ``experiment_id`` defaults to the run's own."""
    if experiment_id is None:
        experiment_id = get_run(uri, run_id).info.experiment_id
    runs = f"{ui_base(uri)}/#/experiments/{experiment_id}/runs"
    return runs, f"{runs}/{run_id}"


def ui_command(uri: str) -> str:
    """How to browse store ``uri``: ``mlflow ui --backend-store-uri <uri>`` for a local store; a server is its UI.
    Credentials are redacted: the command then says to put them back."""
    if is_server(uri):
        return f"open {ui_base(uri)} (the tracking server serves the UI)"
    shown = redact_uri(uri)
    return f"mlflow ui --backend-store-uri {shown}" + (
        "  (credentials redacted: put yours back)" if shown != uri else ""
    )


def redact_files(paths: Iterable[str | Path]) -> list[Path]:
    """Rewrite each text file in ``paths`` through :func:`redact_text` (atomically; unchanged files are not touched):
    for files written by others that quote a URI as typed (Hydra's ``.hydra/*.yaml``, a sweep's ``multirun.yaml``).
    Returns the files changed."""
    changed = []
    for path in map(Path, paths):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        clean = redact_text(text)
        if clean != text:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.redact.tmp")  # parallel jobs redact one multirun.yaml
            try:
                tmp.write_text(clean, encoding="utf-8")
                os.replace(tmp, path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                log.warning("could not redact the credentials in %s: %s", path, e)
                continue
            changed.append(path)
    return changed


def _redact_exception(exc: BaseException) -> BaseException:
    """Redact, in place, the message of ``exc`` and of the exceptions it chains (a traceback prints them all):
    MLflow's HTTP errors quote the request URL, userinfo included."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen and len(seen) < 16:
        seen.add(id(e))
        try:
            e.args = tuple(redact_text(a) if isinstance(a, str) else a for a in e.args)
            if isinstance(getattr(e, "message", None), str):
                e.message = redact_text(e.message)
        except Exception:  # noqa: BLE001 - an exception type with read-only attributes keeps its text
            pass
        for attr in ("url", "filename"):  # requests' / OSError's own copies
            if isinstance(getattr(e, attr, None), str):
                try:
                    setattr(e, attr, redact_text(getattr(e, attr)))
                except Exception:  # noqa: BLE001
                    pass
        e = e.__cause__ or e.__context__
    return exc


class _RedactingClient:
    """An :class:`MlflowClient` whose every method call re-raises its exception with credentials redacted."""

    def __init__(self, client: MlflowClient):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except Exception as e:
                raise _redact_exception(e)  # noqa: B904 - the same exception, redacted in place

        call.__name__ = getattr(attr, "__name__", name)
        call.__doc__ = getattr(attr, "__doc__", None)
        return call


def open_client(uri: str) -> Any:
    """An :class:`MlflowClient` of store ``uri`` (:func:`usable_uri`) whose errors never quote a credential."""
    return _RedactingClient(MlflowClient(tracking_uri=usable_uri(uri)))


def _short_reason(exc: BaseException) -> str:
    """The innermost cause of a failed request, one line (``[Errno 111] Connection refused``), redacted."""
    e, seen = exc, set()
    reason: Any = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        reason = getattr(e, "reason", None) or e
        e = e.__cause__ or e.__context__
    text = str(reason)
    text = re.sub(r"^<[^>]*>:\s*", "", text)  # urllib3's "<HTTPConnection object at 0x...>: " prefix
    return redact_text(text.splitlines()[0] if text else type(reason).__name__)


def _check_reachable(uri: str, timeout: float) -> None:
    """A clear error now rather than a hang later when a tracking server is down or refuses the credentials.

    Asks ``/health`` (is it up?) then ``experiments/search`` (do the credentials open it? A basic-auth server answers
    ``/health`` to anyone) through MLflow's own HTTP layer and credentials (URI userinfo, the ``MLFLOW_TRACKING_*``
    variables, TLS settings), so the check passes and fails where :class:`MlflowClient` does."""
    if not is_server(uri):
        return
    redacted_mark = usable_uri(uri) != uri
    uri = usable_uri(uri)
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    shown = redact_uri(uri)
    creds = get_default_host_creds(uri.rstrip("/"))
    try:
        resp = http_request(creds, "/health", "GET", max_retries=0, timeout=timeout, raise_on_status=False)
        if resp.ok:
            resp = http_request(
                creds,
                "/api/2.0/mlflow/experiments/search",
                "GET",
                max_retries=0,
                timeout=timeout,
                raise_on_status=False,
                params={"max_results": 1},
            )
            if resp.status_code not in (401, 403):
                return  # any other answer is the client's to report
    except Exception as e:  # noqa: BLE001 - MlflowException around requests' errors, an invalid URL...
        raise UserError(
            f"tracking.uri: cannot reach MLflow server {shown!r} ({_short_reason(e)}); start one "
            "(`mlflow server --backend-store-uri sqlite:///outputs/mlflow.db --host 127.0.0.1 --port 5000`) "
            "or leave tracking.uri unset to use the embedded SQLite store"
        ) from None
    status = f"HTTP {resp.status_code} {resp.reason or ''}".strip()
    if resp.status_code in (401, 403):
        info = _split_userinfo(uri)[0]
        if info is not None and ":" not in info and not (creds.username or creds.token):
            given = (
                "a user name or token alone in the URI (https://TOKEN@host) is not sent, neither by MLflow nor by "
                "this check: give user:password, or the token in MLFLOW_TRACKING_TOKEN"
            )
        elif info is not None or creds.username or creds.password or creds.token:
            given = "the credentials given were refused"
        elif redacted_mark:
            given = "the URI's password is the redaction mark *** (a URI as a run dir saves it) and no variable is set"
        else:
            given = "it needs credentials and none were given"
        raise UserError(
            f"tracking.uri: MLflow server {shown!r} is reachable but refused access ({status}): {given}. Check the "
            "credentials: user and password in the URI (http://USER:PASSWORD@host:port, special characters "
            "percent-encoded) or in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or a bearer token in "
            "MLFLOW_TRACKING_TOKEN"
        )
    raise UserError(
        f"tracking.uri: cannot reach MLflow server {shown!r} ({status} from /health); start one "
        "(`mlflow server --backend-store-uri sqlite:///outputs/mlflow.db --host 127.0.0.1 --port 5000`) "
        "or leave tracking.uri unset to use the embedded SQLite store"
    )


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a nested dict to dot keys (MLflow does not: a dict param becomes its repr)."""
    flat: dict[str, str] = {}
    if isinstance(tree, Mapping):
        if not tree and prefix:
            flat[prefix] = "{}"
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    else:
        flat[prefix] = str(tree)
    return flat


def _clip_param(key: str, value: str) -> tuple[str, str]:
    if len(value) > MAX_PARAM_VALUE:
        value = value[: MAX_PARAM_VALUE - 20] + "...[truncated]"
    return key[:MAX_PARAM_KEY], value


def git_info() -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (subprocess.SubprocessError, OSError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(dirty).lower(), "mlflow.source.git.commit": commit}


def environment_tags(device: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    tags = {**git_info(), "device": device, "version.python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "torchmetrics", "mlflow", "hydra-core"):
        try:
            tags[f"version.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            tags[f"version.{pkg}"] = "not installed"
    return tags


class deferred_interrupts:
    """Hold SIGINT/SIGTERM while a block runs and deliver them (as KeyboardInterrupt) when it ends: a store write
    cut by Ctrl-C leaves SQLite mid-transaction (the next write of the process then waits on its own lock) and a
    run's closing steps half done. Main thread only (signals are delivered there); elsewhere a no-op. Nests."""

    _depth = 0

    def __enter__(self) -> "deferred_interrupts":
        import signal
        import threading

        self.active = threading.current_thread() is threading.main_thread() and deferred_interrupts._depth == 0
        if threading.current_thread() is threading.main_thread():
            deferred_interrupts._depth += 1
        if self.active:
            self.received: list[int] = []
            self.previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
            for sig in self.previous:
                if self.previous[sig] not in (signal.SIG_IGN, None):
                    signal.signal(sig, lambda signum, frame: self.received.append(signum))
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            deferred_interrupts._depth -= 1
        if not self.active:
            return
        for sig, handler in self.previous.items():
            if handler not in (signal.SIG_IGN, None):
                signal.signal(sig, handler)
        if self.received and exc[0] is None:  # the block finished: now the interrupt, through the usual handler
            signum = self.received[0]
            handler = self.previous[signum]
            if callable(handler):
                handler(signum, None)
            else:
                raise KeyboardInterrupt


def _retry_locked(call, *args, attempts: int = 8, **kwargs):
    """Call a store write, retrying when SQLite reports a lock. MLflow's busy_timeout (20 s) covers most waits,
    but SQLite returns "database is locked" at once when two readers both try to upgrade to writers; parallel
    jobs (hydra/launcher=joblib) on one mlflow.db hit that, and a retry is then safe. Ctrl-C and SIGTERM wait for
    the write to end (:class:`deferred_interrupts`)."""
    for attempt in range(attempts):
        try:
            with deferred_interrupts():
                return call(*args, **kwargs)
        except MlflowException as e:
            if "database is locked" not in str(e) or attempt == attempts - 1:
                raise
            log.info("MLflow store locked, retrying (%d/%d)", attempt + 1, attempts)
            time.sleep(0.2 * 2**attempt)


class Tracker:
    """One MLflow run, addressed by id (never MLflow's global active run, so jobs cannot leak into each other)."""

    def __init__(self, tracking_cfg: Any, outputs_dir: str | Path, uri: str | None = None):
        """``uri``: the store, when the caller has already chosen it (``pipeline.run.reproduce``); otherwise
        :func:`resolve_uri` of ``tracking.uri``. Credentials: see the module's docstring; ``self.uri`` holds them, show
        ``public_uri(self.uri)``."""
        given = uri or resolve_uri(tracking_cfg.uri, outputs_dir)
        self.uri = usable_uri(given)
        self.local_store = not self.uri.startswith(("http://", "https://", "databricks"))
        _check_reachable(given, float(getattr(tracking_cfg, "connect_timeout_s", 5.0)))
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        self.artifact_root = (Path(outputs_dir).resolve() / "mlartifacts").as_uri() if self.local_store else None
        self.client = open_client(self.uri)
        self.tags_set: dict[str, str] = {}  # what this process tagged the run with (the summary reads some)
        self.experiment_id = self._experiment(tracking_cfg.experiment)
        self.run_id: str | None = None
        self.run_name: str | None = None
        self._logged_params: dict[str, str] = {}  # a reopened run's params (never logged twice)
        self.model_id: str | None = None  # the run's logged model (use_logged_model): results are logged against it
        self._monitor: Any = None  # MLflow's system-metrics monitor while it runs (start_system_metrics)
        self._reopened = False

    def _experiment(self, name: str) -> str:
        for attempt in range(5):
            try:
                exp = self.client.get_experiment_by_name(name)
                if exp is not None:
                    return exp.experiment_id
                return self.client.create_experiment(name, artifact_location=self.artifact_root)
            except MlflowException:
                # another process created it (or migrated the store) between our get and create
                time.sleep(0.2 * (attempt + 1))
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            raise UserError(
                f"tracking.experiment: could not create MLflow experiment {name!r} at {redact_uri(self.uri)}"
            )
        return exp.experiment_id

    def start(
        self, run_name: str | None, tags: Mapping[str, str] | None = None, parent_run_id: str | None = None
    ) -> str:
        # MLflow's limits (tag value 5000 in SQL stores, run name 250): cut here, never a refused run
        tags = {k[:MAX_PARAM_KEY]: redact_text(v)[:MAX_TAG_VALUE] for k, v in (tags or {}).items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run_name = redact_text(run_name)[:MAX_RUN_NAME] if run_name else run_name
        run = _retry_locked(self.client.create_run, self.experiment_id, run_name=run_name, tags=tags)
        self.run_id, self.run_name = run.info.run_id, run.info.run_name
        return self.run_id

    def reopen(self, run_id: str, status: str = "RUNNING") -> Any:
        """Continue an existing run (``pipeline.run.resume``): its status back to RUNNING; returns its data (params, tags).
        Later :meth:`log_params` calls skip params the run already has (MLflow refuses to change a logged value)."""
        run = _retry_locked(self.client.get_run, run_id)
        _retry_locked(self.client.update_run, run_id, status=status)
        self.run_id, self.run_name = run_id, run.info.run_name
        self._logged_params = dict(run.data.params)
        self._reopened = True
        return run.data

    def log_params(self, params: Mapping[str, str]) -> dict[str, tuple[str, str]]:
        """Returns {key: (logged, new)} for params of a reopened run whose value differs (kept as logged). Values are
        stored through :func:`redact_text`: no credential reaches the store."""
        items = [Param(*_clip_param(k, redact_text(v))) for k, v in params.items()]
        logged = self._logged_params
        changed = {p.key: (logged[p.key], p.value) for p in items if p.key in logged and logged[p.key] != p.value}
        items = [p for p in items if p.key not in logged]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            _retry_locked(self.client.log_batch, self.run_id, params=items[i : i + 100])
        return changed

    def _metric(self, key: str, value: float, timestamp: int, step: int) -> Metric:
        """A result scalar carries the run's logged model (:meth:`use_logged_model`): MLflow then records it once,
        in the run's history and as that model's metric (the UI's Models tab); live progress does not."""
        model_id = None if key.startswith(PROGRESS_PREFIX) else self.model_id
        return Metric(key, float(value), timestamp, int(step), model_id=model_id)

    def log_metric(self, key: str, value: float, step: int = 0) -> None:
        _retry_locked(
            self.client.log_batch, self.run_id, metrics=[self._metric(key, value, int(time.time() * 1000), step)]
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """One round trip per 1000 metrics (MLflow's batch cap), not one per scalar."""
        now = int(time.time() * 1000)
        items = [self._metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            _retry_locked(self.client.log_batch, self.run_id, metrics=items[i : i + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Values through :func:`redact_text` (an ``error`` tag quoting a URI, the overrides of a sweep)."""
        items = [RunTag(k, redact_text(v)[:MAX_TAG_VALUE]) for k, v in tags.items()]
        if items:
            _retry_locked(self.client.log_batch, self.run_id, tags=items)
            self.tags_set.update({t.key: t.value for t in items})

    def delete_tag(self, key: str) -> None:
        _retry_locked(self.client.delete_tag, self.run_id, key)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(
        self, directory: str | Path, artifact_path: str | None = None, exclude: Iterable[str] = ()
    ) -> None:
        """Upload ``directory``; top-level entries named in ``exclude`` stay local (a run's progress shards)."""
        directory, exclude = Path(directory), set(exclude)
        if not exclude:
            self.client.log_artifacts(self.run_id, str(directory), artifact_path)
            return
        for entry in sorted(directory.iterdir()):
            if entry.name in exclude:
                continue
            sub = "/".join(p for p in (artifact_path, entry.name) if p)
            if entry.is_dir():
                self.client.log_artifacts(self.run_id, str(entry), sub)
            else:
                self.client.log_artifact(self.run_id, str(entry), artifact_path)

    # ---- run reports (pipeline.record.report): the run as stored, and images stepped for MLflow's image slider
    def get_run(self) -> Any:
        """This run as the store holds it now (``info``, ``data.params/metrics/tags``)."""
        return _retry_locked(self.client.get_run, self.run_id)

    def run_tags(self) -> dict[str, str]:
        """This run's tags as stored ({} when the store cannot be read: a report then shows fewer tags)."""
        try:
            return dict(self.get_run().data.tags)
        except Exception:  # noqa: BLE001 - a report's provenance must never fail a run
            log.debug("could not read the tags of run %s", self.run_id, exc_info=True)
            return {}

    def log_image(self, image: Any, key: str, step: int) -> None:
        """A PIL image as MLflow image ``key`` at ``step`` (the UI's image slider steps through them); written
        before returning, so a parent run closed next holds it."""
        self.client.log_image(self.run_id, image, key=key, step=int(step), synchronous=True)

    def logged_image_steps(self, key: str) -> set[int]:
        """Steps at which image ``key`` is already logged on this run (``images/<key>+step+<n>+...``)."""
        try:
            files = self.client.list_artifacts(self.run_id, "images")
        except Exception:  # noqa: BLE001 - no images yet, or a store that cannot list: log them all
            return set()
        steps = set()
        for f in files:
            name = f.path.rsplit("/", 1)[-1]
            for sep in ("+", "%"):  # MLflow 3 uses "+", earlier versions "%"
                parts = name.split(sep)
                if len(parts) > 2 and parts[0] == key.replace("/", "~") and parts[1] == "step" and parts[2].isdigit():
                    steps.add(int(parts[2]))
        return steps

    # ---- end of run reports

    # ---- MLflow 3 entities: datasets, logged models, system metrics (what they describe: pipeline.record.entities)
    def log_datasets(self, records: Iterable[Any]) -> int:
        """Log :class:`pipeline.record.entities.DatasetRecord` s as the run's dataset inputs (``mlflow.log_input``'s
        entities: name, digest, source, profile; input tag ``mlflow.data.context`` = the record's context). MLflow
        keeps one input per (name, digest), so a resumed run logs nothing twice. Returns how many were logged; a
        store that refuses (an old server) is one warning per process, never a failed run."""
        inputs = []
        for r in records:
            dataset = Dataset(
                name=redact_text(r.name)[:500],
                digest=r.digest,
                source_type=r.source_type,
                source=redact_text(json.dumps(r.source, sort_keys=True)),
                profile=json.dumps(r.profile, sort_keys=True) if r.profile else None,
            )
            inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", r.context)]))
        if not inputs or self.run_id is None:
            return 0
        try:
            _retry_locked(self.client.log_inputs, self.run_id, datasets=inputs)
        except Exception as e:  # noqa: BLE001 - datasets are a view of the run, never its outcome
            _warn_once("dataset logging (log_inputs)", e, "the run has no Datasets section")
            return 0
        return len(inputs)

    def use_logged_model(self, record: Any) -> str | None:
        """The logged model of checkpoint ``record`` (:class:`pipeline.record.entities.ModelRecord`) in this
        experiment: found by its identity tag (``diffusion_lens.checkpoint``) when an earlier run created it, else
        created (source run: this one; status READY). It becomes one of this run's model inputs, and every result
        scalar logged afterwards is logged against it (:meth:`log_metrics`), so the experiment's Models tab compares
        checkpoints. Returns its id; None (one warning per process) when the store lacks logged models."""
        if record is None or self.run_id is None:
            return None
        try:
            model_id = self._find_or_create_model(record)
            _retry_locked(self.client.log_inputs, self.run_id, models=[LoggedModelInput(model_id)])
        except Exception as e:  # noqa: BLE001 - an old server without the logged-model API
            _warn_once("logged models", e, "results are logged on the run only, not per checkpoint")
            return None
        self.model_id = model_id
        return model_id

    def _find_or_create_model(self, record: Any) -> str:
        tag = f"tags.`{MODEL_IDENTITY_TAG}` = '{record.identity}'"  # hex: nothing to quote
        found = _retry_locked(self.client.search_logged_models, [self.experiment_id], filter_string=tag, max_results=1)
        if found:
            return found[0].model_id
        params = {k: redact_text(v)[:MAX_PARAM_VALUE] for k, v in record.params.items()}
        model = _retry_locked(
            self.client.create_logged_model,
            self.experiment_id,
            name=record.name,
            source_run_id=self.run_id,
            tags={MODEL_IDENTITY_TAG: record.identity},
            params=params,
            model_type=record.model_type,
        )
        _retry_locked(self.client.finalize_logged_model, model.model_id, "READY")  # no artifacts to wait for
        return model.model_id

    def start_system_metrics(self, interval_s: float = 2.0) -> bool:
        """MLflow's system metrics for this run (``system/cpu_utilization_percentage``, memory, disk, network, and
        per-GPU ``system/gpu_*`` where ``nvidia-ml-py`` is installed), one sample every ``interval_s`` seconds,
        through :class:`mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor` on this run's id and
        store (the per-run ``log_system_metrics=True`` of ``mlflow.start_run`` needs MLflow's global active run,
        which this tracker never uses). :meth:`end` stops it; a resumed run continues its steps. Returns whether
        it started."""
        if self.run_id is None or self._monitor is not None:
            return self._monitor is not None
        try:
            if SystemMetricsMonitor is None:
                raise _NO_SYSTEM_METRICS
            monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=float(interval_s),
                samples_before_logging=1,
                resume_logging=self._reopened,
                tracking_uri=self.uri,
            )
            monitor.start()
        except Exception as e:  # noqa: BLE001 - psutil missing, a store that cannot be read
            _warn_once("system metrics", e, "the run has no System metrics tab")
            return False
        self._monitor = monitor
        return True

    def stop_system_metrics(self) -> None:
        """Stop the monitor (joins its thread), then log one last sample, so every run that had it on has at least
        one ``system/...`` value however short it was. Never raises."""
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        try:
            monitor.finish()
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as e:  # noqa: BLE001
            _warn_once("system metrics", e, "the last system-metrics sample is missing")

    # ---- end of MLflow 3 entities

    def end(self, status: str = "FINISHED") -> None:
        """Stop the system-metrics monitor (whatever happens next), then set the run's final status."""
        self.stop_system_metrics()
        if self.run_id is not None:
            _retry_locked(self.client.set_terminated, self.run_id, status=status)

    def links(self, run_id: str | None = None) -> tuple[str, str]:
        """:func:`run_links` of this tracker's run (or ``run_id``) in its experiment."""
        return run_links(run_id or self.run_id, self.uri, self.experiment_id)

    def child_runs(self, parent_run_id: str) -> list:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10000
        )


# --------------------------------------------------------------------------------------------- sweeps
_OPEN_PARENTS: dict[str, Tracker] = {}


def close_open_parents(status: str = "KILLED", error: str | None = None) -> None:
    """End every parent run this process opened and did not close (Ctrl-C, crash at exit)."""
    for run_id, tracker in list(_OPEN_PARENTS.items()):
        try:
            tracker.set_tags({"error": error or f"sweep ended early ({status})"})
            tracker.end(status)
        except Exception:  # noqa: BLE001 - best effort at exit
            log.warning("could not close parent run %s", run_id)
        _OPEN_PARENTS.pop(run_id, None)


atexit.register(close_open_parents)


def read_parent_run_id(sweep_dir: str | Path) -> str | None:
    file = Path(sweep_dir) / PARENT_RUN_FILE
    return file.read_text().strip() if file.is_file() else None


def read_sweep_params(sweep_dir: str | Path) -> dict[str, list[str]]:
    """``{key: [values]}`` the sweep in ``sweep_dir`` varies (written by :class:`SweepCallback`); {} without one."""
    file = Path(sweep_dir) / SWEEP_PARAMS_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def format_value(value: Any) -> str:
    """A scalar for a summary line: whole numbers without ``.0``, others to 4 significant digits."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary_lines(
    tracker: Tracker, title: str, scalars: Iterable[str], dir_label: str, directory: str | Path
) -> list[str]:
    """The end-of-run summary of ``tracker``'s run: title, headline scalars, its directory, the MLflow run id and name,
    the deep links (runs table of the experiment, the run) and how to browse the store."""
    runs_url, run_url = tracker.links()
    scalars = list(scalars)
    name = f"  ({tracker.run_name})" if tracker.run_name else ""
    native = tracker.tags_set.get("generation.path") == "native_call"
    notes = [  # how the headline was measured, where it changes its meaning (metrics runs)
        f"  {label:<11} {tracker.tags_set[tag]}"
        for label, tag in (("prompts", PROMPT_PROTOCOL_TAG), ("biased", FD_BIASED_TAG))
        if tag in tracker.tags_set
    ]
    return [
        title,
        "  " + ("  ·  ".join(scalars) if scalars else "(no headline scalars)"),
        *notes,
        *(
            [f"  {'generation':<11} native_call: the images are the pipeline's own __call__ (no family driver)"]
            if native
            else []
        ),
        f"  {dir_label:<11} {directory}",
        f"  {'MLflow run':<11} {tracker.run_id}{name}",
        f"  {'runs table':<11} {runs_url}",
        f"  {'this run':<11} {run_url}",
        f"  {'browse':<11} {ui_command(tracker.uri)}",
    ]


def iter_artifact_files(directory: Path) -> Iterable[Path]:
    return (p for p in sorted(directory.rglob("*")) if p.is_file())


def download_artifact(uri: str, run_id: str, path: str, dst: str | Path) -> Path:
    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=str(dst), tracking_uri=usable_uri(uri)
            )
        )
    except Exception as e:
        raise _redact_exception(e)  # noqa: B904 - the same exception, redacted in place


def get_run(uri: str, run_id: str):
    try:
        return open_client(uri).get_run(run_id)
    except MlflowException as e:
        raise UserError(
            f"run id {run_id!r} not found in tracking store {redact_uri(uri)}: {redact_text(e.message)}"
        ) from e
