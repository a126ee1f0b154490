"""Secrets never leave (issue 24, item 2): credentials in a tracking URI or in MLflow's environment variables work
against a password-protected MLflow server (a real `mlflow server --app-name basic-auth` on loopback), and the
password appears nowhere: not in the output, the run's tags and params, its run dir or its artifacts; a wrong
password is a one-line UserError that names the variables and shows the URI redacted. Plus unit tests of
redact_uri / redact_text and of the credentials the reachability check sends (a loopback recorder server)."""

from __future__ import annotations

import base64
import doctest
import http.server
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from pipeline.errors import UserError
from pipeline.record import tracking
from pipeline.record.tracking import (
    Tracker,
    _check_reachable,
    download_artifact,
    get_run,
    open_client,
    public_uri,
    redact_files,
    redact_text,
    redact_uri,
    run_links,
    ui_command,
    usable_uri,
)

ADMIN, PASSWORD = "admin", "Sekr1t-pa55-Q7zx"  # >= 12 characters: the auth app's rule for the bootstrap admin
CRED_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch):
    for name in (*CRED_ENV, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a dead port fails at once


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ redaction
def test_redact_uri_every_scheme_and_unchanged_without_credentials():
    cases = {
        "http://user:pass@host:5000": "http://user:***@host:5000",
        "http://user:pass@host:5000/mlflow/": "http://user:***@host:5000/mlflow/",
        "https://tok3n@mlflow.lab/": "https://***@mlflow.lab/",  # a token alone is the secret
        "postgresql://mlflow:pg-pw@db:5432/mlflow": "postgresql://mlflow:***@db:5432/mlflow",
        "mysql+pymysql://u:p@h/db?charset=utf8mb4": "mysql+pymysql://u:***@h/db?charset=utf8mb4",
        "http://u:p@ss@h:1/": "http://u:***@h:1/",  # an unencoded "@" in the password: the last one ends it
        "https://h/p?token=abc&x=1&X-Amz-Signature=zz&sig=q#f": "https://h/p?token=***&x=1&X-Amz-Signature=***&sig=***#f",
        "postgresql://db/mlflow?user=u&password=pg-pw": "postgresql://db/mlflow?user=u&password=***",
        "https://h/?access_token=a1&api_key=k": "https://h/?access_token=***&api_key=***",
    }
    for uri, shown in cases.items():
        assert redact_uri(uri) == public_uri(uri) == shown, uri
        assert redact_uri(shown) == shown  # idempotent
    for uri in [
        "http://127.0.0.1:5000",
        "https://mlflow.lab:8443/prefix/",
        "file:///tmp/mlruns",
        "sqlite:////o/mlflow.db",
        "sqlite:///relative.db",
        "databricks",
        "databricks://my-profile",
        "databricks://scope:prefix",
        "postgresql://db/mlflow?sslmode=require",
        "/plain/path",
        "",
    ]:
        assert redact_uri(uri) == uri, uri


def test_redact_text_finds_uris_in_messages_and_env_secrets(monkeypatch):
    msg = (
        "API request to http://admin:hunter2!@10.0.0.1:5000/api/2.0/mlflow/runs/get failed; store "
        "'postgresql://ml:pg-pw@db/mlflow' and (mysql+pymysql://u:p@h/db), token https://ghp_x@host/r?sig=abc"
    )
    out = redact_text(msg)
    for secret in ("hunter2", "pg-pw", "u:p@", "ghp_x", "sig=abc"):
        assert secret not in out
    assert (
        "http://admin:***@10.0.0.1:5000/api/2.0/mlflow/runs/get" in out
        and "'postgresql://ml:***@db/mlflow'" in out
        and "(mysql+pymysql://u:***@h/db)" in out
        and "https://***@host/r?sig=***" in out
    )
    plain = "no URI here: user@example.com, a=1&b=2, sqlite:////x.db"
    assert redact_text(plain) == plain
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "long-env-secret")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "short")  # under 8 characters: too likely to be ordinary text
    assert redact_text("header echoed long-env-secret, short") == "header echoed ***, short"
    assert doctest.testmod(tracking).failed == 0


def test_display_helpers_never_show_a_credential():
    assert run_links("abc", "https://me:token@mlflow.lab:8443/", "7") == (  # a link to click: no userinfo at all
        "https://mlflow.lab:8443/#/experiments/7/runs",
        "https://mlflow.lab:8443/#/experiments/7/runs/abc",
    )
    assert ui_command("http://me:pw@h:5000") == "open http://h:5000 (the tracking server serves the UI)"
    assert ui_command("postgresql://u:pg-pw@db/mlflow") == (
        "mlflow ui --backend-store-uri postgresql://u:***@db/mlflow  (credentials redacted: put yours back)"
    )
    assert ui_command("sqlite:////o/mlflow.db") == "mlflow ui --backend-store-uri sqlite:////o/mlflow.db"
    # a URI as a run dir saves it (redacted) connects without the "***" password, so the variables apply
    assert usable_uri("http://admin:***@h:5000/p") == usable_uri("http://***@h:5000/p") == "http://h:5000/p"
    assert usable_uri("http://admin:pw@h:5000") == "http://admin:pw@h:5000"


def test_redact_files_rewrites_only_what_quotes_a_credential(tmp_path):
    hydra_cfg, plain = tmp_path / "overrides.yaml", tmp_path / "plain.yaml"
    hydra_cfg.write_text("- tracking.uri=http://u:pw-123@h:5000\n- seed=1\n")
    plain.write_text("seed: 1\n")
    before = plain.stat().st_mtime_ns
    assert redact_files([hydra_cfg, plain, tmp_path / "missing.yaml"]) == [hydra_cfg]
    assert hydra_cfg.read_text() == "- tracking.uri=http://u:***@h:5000\n- seed=1\n"
    assert plain.stat().st_mtime_ns == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "overrides.yaml",
        "plain.yaml",
    ]


def test_hydra_files_are_redacted_when_the_job_starts(tmp_path):
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from pipeline.record.sweep import SweepCallback

    sweep, job = tmp_path / "sweep", tmp_path / "sweep" / "0"
    (job / ".hydra").mkdir(parents=True)
    typed = f"tracking.uri=http://{ADMIN}:{PASSWORD}@h:5000"
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (job / ".hydra" / name).write_text(f"- {typed}\n")
    (sweep / "multirun.yaml").write_text(f"hydra:\n  overrides:\n    task:\n    - {typed}\n")
    cfg = OmegaConf.create(
        {"hydra": {"runtime": {"output_dir": str(job)}, "output_subdir": ".hydra", "sweep": {"dir": str(sweep)}}}
    )
    cfg.hydra.mode = RunMode.MULTIRUN
    SweepCallback().on_job_start(config=cfg)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 4 and not [p for p in files if PASSWORD in p.read_text()]
    assert f"tracking.uri=http://{ADMIN}:***@h:5000" in (sweep / "multirun.yaml").read_text()


def test_errors_from_a_dead_server_never_quote_the_password():
    uri = f"http://{ADMIN}:{PASSWORD}@127.0.0.1:{_free_port()}"
    with pytest.raises(UserError) as e:
        _check_reachable(uri, 2.0)
    assert "cannot reach MLflow server" in str(e.value) and f"{ADMIN}:***@127.0.0.1" in str(e.value)
    with pytest.raises(Exception) as e:  # MLflow's own message quotes the request URL, userinfo included
        open_client(uri).get_experiment_by_name("x")
    text = "".join(traceback.format_exception(e.value))
    assert "API request to" in text and f"{ADMIN}:***@" in text and PASSWORD not in text
    with pytest.raises(UserError) as e:
        get_run(uri, "0" * 32)
    assert PASSWORD not in "".join(traceback.format_exception(e.value))


# ------------------------------------------------------------------ what the reachability check sends (recorder)
class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list = []
    status = {"/health": 200, "/api": 200}

    def do_GET(self):  # noqa: N802
        self.seen.append((self.path, self.headers.get("Authorization")))
        code = self.status["/health" if self.path.startswith("/health") else "/api"]
        body = b"{}" if code == 200 else b"denied"
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    _Recorder.seen, _Recorder.status = [], {"/health": 200, "/api": 200}
    try:
        yield server.server_address[1], _Recorder
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_check_sends_the_credentials_mlflow_would(recorder, monkeypatch):
    port, rec = recorder
    host = f"127.0.0.1:{port}"

    def sent(uri):
        rec.seen.clear()
        _check_reachable(uri, 5.0)
        assert [p.split("?")[0] for p, _ in rec.seen] == ["/health", "/api/2.0/mlflow/experiments/search"]
        return {auth for _, auth in rec.seen}

    assert sent(f"http://{host}") == {None}
    assert sent(f"http://u:p%40ss@{host}") == {_basic("u", "p@ss")}  # userinfo, percent-decoded, as requests does
    assert sent(f"http://tok3n@{host}") == {None}  # a lone token in the URI: requests (so MLflow) sends nothing
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "bearer-tok")
    assert sent(f"http://{host}") == {"Bearer bearer-tok"}
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "envuser")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "envpass")
    assert sent(f"http://{host}") == {_basic("envuser", "envpass")}  # Basic wins over the token, as in MLflow
    assert sent(f"http://envuser:***@{host}") == {_basic("envuser", "envpass")}  # a redacted URI: the variables
    assert sent(f"http://u:p@{host}") == {_basic("u", "p")}  # userinfo wins over the variables, as in MLflow


def test_refusal_is_a_credentials_error_not_unreachable(recorder):
    port, rec = recorder
    rec.status = {"/health": 401, "/api": 401}  # a proxy that demands auth everywhere
    with pytest.raises(UserError) as e:
        _check_reachable(f"http://127.0.0.1:{port}", 5.0)
    assert "reachable but refused" in str(e.value) and "none were given" in str(e.value)
    rec.status = {"/health": 200, "/api": 403}  # MLflow's auth app: /health is open, the API is not
    with pytest.raises(UserError) as e:
        _check_reachable(f"http://u:wrong-pw@127.0.0.1:{port}", 5.0)
    msg = str(e.value)
    assert "HTTP 403" in msg and "credentials given were refused" in msg and "wrong-pw" not in msg
    assert all(v in msg for v in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"))
    with pytest.raises(UserError, match="alone in the URI .* is not sent.*MLFLOW_TRACKING_TOKEN"):
        _check_reachable(f"http://tok3n@127.0.0.1:{port}", 5.0)
    rec.status = {"/health": 502, "/api": 200}
    with pytest.raises(UserError, match="cannot reach MLflow server .*HTTP 502"):
        _check_reachable(f"http://127.0.0.1:{port}", 5.0)


# ---------------------------------------------------------------- a real password-protected MLflow server
@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """`mlflow server --app-name basic-auth` on 127.0.0.1 at a free port, admin's password PASSWORD; yields
    (host:port, server root). Skipped only when the auth app's extra (Flask-WTF) is not installed."""
    if importlib.util.find_spec("flask_wtf") is None:
        pytest.skip("MLflow's basic-auth app needs `pip install 'mlflow[auth]'` (Flask-WTF)")
    root = tmp_path_factory.mktemp("auth_server")
    (root / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
        f"admin_username = {ADMIN}\nadmin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
        "auth_cache_ttl_seconds = 60\n"  # one PBKDF2 check per (user, password), not one per request
    )
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in (*CRED_ENV, "MLFLOW_TRACKING_URI")}
    env.update(
        MLFLOW_AUTH_CONFIG_PATH=str(root / "auth.ini"),
        MLFLOW_FLASK_SERVER_SECRET_KEY="test-only-key",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )  # no job-runner processes
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--app-name",
        "basic-auth",
        "--backend-store-uri",
        f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with (root / "server.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        "mlflow server --app-name basic-auth did not start:\n"
                        + (root / "server.log").read_text()[-3000:]
                    )
                time.sleep(0.1)
        yield f"127.0.0.1:{port}", root
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # the CLI and the uvicorn worker it started
                proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def _admin_client(host: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"http://{ADMIN}:{PASSWORD}@{host}")


def _assert_no_password(run) -> None:
    values = {**run.data.params, **run.data.tags, "run name": run.info.run_name}
    leaks = {k: v for k, v in values.items() if PASSWORD in v}
    assert not leaks, f"the password is in the run's params/tags: {sorted(leaks)}"


@pytest.mark.parametrize("via", ["userinfo", "env", "redacted uri + env"])
def test_tracker_logs_a_run_with_credentials(auth_server, via, monkeypatch, tmp_path, capfd):
    host, _ = auth_server
    uri = f"http://{ADMIN}:{PASSWORD}@{host}"
    if via != "userinfo":
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
        uri = f"http://{host}" if via == "env" else f"http://{ADMIN}:***@{host}"
    cfg = SimpleNamespace(uri=None, experiment="secrets", connect_timeout_s=10.0)
    tracker = Tracker(cfg, tmp_path, uri=uri)
    tracker.start(f"secrets {via}", tags={"where": uri, "tracking.uri_effective": public_uri(uri)})
    tracker.log_params({"a": "1", "store": uri})
    tracker.log_metrics({"m": 0.5, "n": 2.0})
    tracker.set_tags({"t": "x", "error": f"API request to {uri}/api failed"})
    (tmp_path / "note.txt").write_text("artifact through the server's proxy")
    tracker.log_artifact(tmp_path / "note.txt")
    tracker.end("FINISHED")

    run = _admin_client(host).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["a"] == "1" and run.data.metrics == {"m": 0.5, "n": 2.0} and run.data.tags["t"] == "x"
    assert [a.path for a in _admin_client(host).list_artifacts(tracker.run_id)] == ["note.txt"]
    got = download_artifact(uri, tracker.run_id, "note.txt", tmp_path / "back")  # reproduce's way back
    assert got.read_text() == "artifact through the server's proxy"
    if via == "userinfo":
        assert run.data.tags["tracking.uri_effective"] == f"http://{ADMIN}:***@{host}"
    _assert_no_password(run)
    out, err = capfd.readouterr()  # MLflow's own "View run ... at: <URI>" would quote the password
    assert PASSWORD not in out + err


def test_wrong_or_missing_password_is_one_line_user_error(auth_server, tmp_path):
    host, _ = auth_server
    cfg = SimpleNamespace(uri=None, experiment="secrets", connect_timeout_s=10.0)
    with pytest.raises(UserError) as e:
        Tracker(cfg, tmp_path, uri=f"http://{ADMIN}:not-the-password@{host}")
    msg = str(e.value)
    assert "\n" not in msg and "not-the-password" not in msg
    assert f"'http://{ADMIN}:***@{host}'" in msg and "reachable but refused" in msg and "HTTP 401" in msg
    assert "credentials" in msg and "MLFLOW_TRACKING_USERNAME" in msg and "MLFLOW_TRACKING_PASSWORD" in msg
    with pytest.raises(UserError, match="none were given"):
        Tracker(cfg, tmp_path, uri=f"http://{host}")
    with pytest.raises(UserError, match="redaction mark"):  # a URI as a run dir saves it, no variable set
        Tracker(cfg, tmp_path, uri=f"http://{ADMIN}:***@{host}")


def test_a_run_on_a_password_protected_server_leaks_nothing(auth_server, tmp_path, capfd, caplog):
    """A whole run (in process: the CLI adds Hydra's own .hydra/*.yaml, redacted by SweepCallback.on_job_start,
    tested above) with the password in tracking.uri: nothing printed, logged, tagged or written holds it."""
    from conftest import compose_cfg

    from pipeline.run.runner import run_pipeline

    host, root = auth_server
    out = tmp_path / "outputs"
    cfg = compose_cfg(
        [
            "model=sd15_scheduler",
            "mode=[schedule]",
            "mode.schedule.compare=[linear]",
            "tracking=server",
            f"tracking.uri=http://{ADMIN}:{PASSWORD}@{host}",
            "tracking.experiment=secrets-cli",
        ],
        out,
    )
    with caplog.at_level("INFO"):
        assert run_pipeline(cfg, out / "run").status == "FINISHED"
    printed = "".join(capfd.readouterr()) + caplog.text
    assert PASSWORD not in printed
    assert f"http://{host}/#/experiments/" in printed  # the summary's links, no userinfo
    client = _admin_client(host)
    exp = client.get_experiment_by_name("secrets-cli")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["tracking.uri_effective"] == f"http://{ADMIN}:***@{host}"
    _assert_no_password(run)
    # every file the run wrote locally, and every artifact the server stored for it
    files = [p for p in out.rglob("*") if p.is_file() and p.suffix != ".db"]
    files += [p for p in (root / "artifacts").rglob("*") if p.is_file() and run.info.run_id in str(p)]
    assert any(p.name == "config_resolved.yaml" for p in files)
    leaks = sorted(
        str(p.relative_to(out if out in p.parents else root)) for p in files if PASSWORD.encode() in p.read_bytes()
    )
    # config_resolved.yaml (runner.py) and Hydra's .hydra/*.yaml (SweepCallback.on_job_start) included
    assert not leaks, f"the password is written to: {leaks}"
