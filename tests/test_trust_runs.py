"""Issue 24 (trust): run and sweep dirs are data, inputs are refused before anything exists, and failures end cleanly.

Every fault here is injected at a point the test controls (a patched store call, a full disk raised by a patched
write), never by timing."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import all_runs, compose_cfg

FAST = ["mode.schedule.compare=[linear]"]  # a schedule run: under a second warm


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """One finished schedule run (its dir and store), the source the tampered copies are made from."""
    from pipeline.run.runner import run_pipeline

    root = tmp_path_factory.mktemp("trust_runs")
    out = run_pipeline(compose_cfg(FAST, root / "out"), root / "run")
    assert out.status == "FINISHED"
    return root, out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_config(run_dir: Path, edit) -> None:
    file = run_dir / "config_resolved.yaml"
    tree = yaml.safe_load(file.read_text())
    edit(tree)
    file.write_text(yaml.safe_dump(tree))


# --------------------------------------------------------------------------------- saved files are data
def test_reproduce_never_resolves_a_planted_interpolation_nor_writes_where_the_dir_says(
    source_run, tmp_path, monkeypatch, caplog, capsys
):
    from pipeline.run import reproduce

    root, src = source_run
    monkeypatch.setenv("DL_TEST_SECRET", "hunter2-secret")
    planted = _copy(src.run_dir, tmp_path / "planted")
    _edit_config(planted, lambda t: t["dataset"].update(name="${oc.env:DL_TEST_SECRET}"))
    with caplog.at_level("ERROR"):
        assert reproduce.main([str(planted), f"paths.outputs={tmp_path / 'o1'}"]) == 2
    assert "dataset.name" in caplog.text and "config_resolved.yaml" in caplog.text and "interpolation" in caplog.text
    assert "hunter2" not in caplog.text + capsys.readouterr().out
    assert not (tmp_path / "o1" / "mlflow.db").exists()  # refused before any MLflow run

    for key, bad in (("model", {"_target_": "os.system"}), ("sampler", {"num_inference_step": 3})):
        tampered = _copy(src.run_dir, tmp_path / f"tampered_{key}")
        _edit_config(tampered, lambda t: t[key].update(bad))
        caplog.clear()
        with caplog.at_level("ERROR"):
            assert reproduce.main([str(tampered), f"paths.outputs={tmp_path / 'o1'}"]) == 2
        assert f"{key}.{next(iter(bad))}" in caplog.text and "config_resolved.yaml" in caplog.text

    # a planted paths.outputs / tracking.uri is ignored: the run goes where this command line says, scalars match
    elsewhere = tmp_path / "elsewhere"
    moved = _copy(src.run_dir, tmp_path / "moved")
    _edit_config(
        moved,
        lambda t: (
            t["paths"].update(outputs=str(elsewhere), cache=str(elsewhere / "c")),
            t["tracking"].update(uri=f"sqlite:///{elsewhere / 'x.db'}"),
        ),
    )
    assert reproduce.main([str(moved), f"paths.outputs={tmp_path / 'o2'}"]) == 0
    assert not elsewhere.exists() and (tmp_path / "o2" / "mlflow.db").is_file()


def test_resume_refuses_a_tampered_run_dir_naming_key_and_file(source_run, tmp_path, caplog):
    from pipeline.run import resume

    root, src = source_run
    unknown = _copy(src.run_dir, tmp_path / "unknown")
    _edit_config(unknown, lambda t: t["sampler"].update(warp_speed=9))
    with caplog.at_level("ERROR"):
        assert resume.main([str(unknown)]) in (0, 2)  # FINISHED runs have nothing to resume ...
    info = json.loads((unknown / "run_info.json").read_text())
    from mlflow.tracking import MlflowClient

    MlflowClient(info["tracking_uri"]).set_terminated(info["run_id"], "FAILED")  # ... so make it resumable
    caplog.clear()
    with caplog.at_level("ERROR"):
        assert resume.main([str(unknown)]) == 2
    assert "sampler.warp_speed" in caplog.text and "config_resolved.yaml" in caplog.text

    server = _copy(src.run_dir, tmp_path / "server")  # a run dir naming a server: never contacted on its word
    info["tracking_uri"] = "http://127.0.0.1:9/"
    (server / "run_info.json").write_text(json.dumps(info))
    caplog.clear()
    with caplog.at_level("ERROR"):
        assert resume.main([str(server)]) == 2
    assert "--tracking-uri http://127.0.0.1:9/" in caplog.text


def _sweep_dir(tmp_path: Path, task: list[str], hydra: list[str]) -> Path:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "mlflow_parent_run_id").write_text("0123abcd")
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task, "hydra": hydra}}}))
    return sweep


@pytest.mark.parametrize(
    "task, hydra, named",
    [
        (["mode=[schedule]"], ["hydra.mode=MULTIRUN", "+hydra.callbacks.x._target_=builtins.print"], "hydra.callbacks"),
        (["mode=[schedule]", "dataset.name=${oc.env:HOME}"], ["hydra.mode=MULTIRUN"], "oc.env"),
        (["hydra.job.chdir=true"], [], "hydra.job.chdir"),
        (["model=../../evil"], [], "model=../../evil"),
        (["sampler.num_inference_step=3,4"], [], "sampler.num_inference_step"),
    ],
)
def test_a_crafted_sweep_dir_is_refused_before_anything_runs(tmp_path, monkeypatch, caplog, task, hydra, named):
    from pipeline.run import resume

    launched = []
    monkeypatch.setattr(resume.subprocess, "call", lambda cmd, **kw: launched.append(cmd) or 0)
    sweep = _sweep_dir(tmp_path, task, hydra)
    with caplog.at_level("ERROR"):
        assert resume.main([str(sweep)]) == 2
    assert not launched and named in caplog.text and "multirun.yaml" in caplog.text


def test_a_sweep_dir_replays_its_task_and_launcher_settings(tmp_path, monkeypatch):
    from pipeline.run import resume

    launched = []
    monkeypatch.setattr(resume.subprocess, "call", lambda cmd, **kw: launched.append(cmd) or 0)
    task = ["mode=[schedule]", "scheduler=ddim,euler", f"paths.outputs={tmp_path / 'o'}"]
    sweep = _sweep_dir(
        tmp_path,
        task,
        ["hydra.mode=MULTIRUN", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path}"],
    )
    assert resume.main([str(sweep), "model.device=cpu"]) == 0
    assert launched[0][4:] == [
        *task,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={sweep.resolve()}",
        "model.device=cpu",
    ]


# --------------------------------------------------------------------------------- refused before anything exists
@pytest.mark.parametrize(
    "override, key",
    [
        ("sampler.num_inference_steps=0", "sampler.num_inference_steps"),
        ("sampler.batch_size=0", "sampler.batch_size"),
        ("seed=-1", "seed"),
        (f"seed={2**64 + 1}", "seed"),
        ("sampler.guidance_scale=-0.5", "sampler.guidance_scale"),
        ("sampler.guidance_scale=nan", "sampler.guidance_scale"),
        ("sampler.eta=inf", "sampler.eta"),
        ("mode.metrics.num_samples=0", "mode.metrics.num_samples"),
        ("features.shapes_net.batch_size=-3", "batch_size"),
    ],
)
def test_out_of_range_values_name_their_key(override, key):
    from pipeline.errors import UserError

    extra = ["mode=[metrics]"] if override.startswith("mode.metrics") else []
    with pytest.raises(UserError, match=re.escape(key)):
        compose_cfg([*extra, override])


def _suggestions(message: str) -> list[str]:
    """Every ``e.g. key=value`` / ``set key=value`` a message suggests."""
    return re.findall(r"(?:e\.g\.|set|add|use) ((?:[\w/]+\.)*[\w/]+=[^\s;,)]+)", message)


@pytest.mark.parametrize(
    "overrides",
    [
        ["sampler.num_inference_step=5"],
        ["+num_inference_steps=5"],
        ["features.weights_path=/w.pth"],
        ["model=hub", "features=[inception]", "features.batch_size=8"],
        ["model.pth=x"],
    ],
)
def test_every_suggested_override_is_accepted_by_the_cli(overrides, capsys):
    """The first message already names the right key; fed back, the suggestion composes."""
    from pipeline.__main__ import _check_overrides

    with pytest.raises(SystemExit) as e:
        _check_overrides(overrides)
    assert e.value.code == 2
    message = capsys.readouterr().err
    suggested = _suggestions(message)
    assert suggested and "+" not in suggested[0].split("=")[0], message
    keep = [o for o in overrides if f"(in {o})" not in message]  # the refused override goes, its suggestion comes
    compose_cfg([*keep, suggested[0]])  # no UserError, no Hydra error


# --------------------------------------------------------------------------------- failures end cleanly
def _status(out: Path, run_id: str):
    [run] = [r for r in all_runs(out) if r.info.run_id == run_id]
    return run


def test_disk_full_while_closing_ends_failed_then_resumes(tmp_path, monkeypatch):
    from pipeline.core.context import RunContext
    from pipeline.errors import UserError
    from pipeline.run import resume, runner

    real_execute, real_write = runner.execute, RunContext.write_results
    state = {"full": False}

    def execute(ctx, modes):
        skipped = real_execute(ctx, modes)
        state["full"] = True  # the work is done: now the disk fills
        return skipped

    def write_results(self):
        if state["full"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.run_dir / "results.json"))
        return real_write(self)

    monkeypatch.setattr(runner, "execute", execute)
    monkeypatch.setattr(RunContext, "write_results", write_results)
    out, run_dir = tmp_path / "out", tmp_path / "run"
    with pytest.raises(UserError) as e:
        runner.run_pipeline(compose_cfg(FAST, out), run_dir)
    message = str(e.value)
    assert "results.json" in message and f"python -m pipeline.run.resume {run_dir.resolve()}" in message
    assert "\n" not in message
    run_id = json.loads((run_dir / "run_info.json").read_text())["run_id"]
    run = _status(out, run_id)
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["error"]
    assert not (run_dir / "run.lock").exists() and not list(run_dir.glob("*.tmp"))

    monkeypatch.undo()  # the disk has space again
    assert resume.main([str(run_dir), f"paths.outputs={out}"]) == 0
    run = _status(out, run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "1"
    assert json.loads((run_dir / "results.json").read_text())


def test_a_store_that_refuses_writes_is_one_paragraph_and_leaves_no_lock(tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException

    from pipeline.errors import UserError
    from pipeline.record import tracking
    from pipeline.run import runner

    def readonly(*a, **k):
        raise MlflowException(
            "(sqlite3.OperationalError) attempt to write a readonly database\n[SQL: INSERT INTO runs "
            + "x" * 2000
            + "]"
        )

    monkeypatch.setattr(tracking.Tracker, "start", readonly)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as e:
        runner.run_pipeline(compose_cfg(FAST, tmp_path / "out"), run_dir)
    assert "readonly database" in str(e.value) and "[SQL" not in str(e.value) and len(str(e.value)) < 700
    assert not (run_dir / "run.lock").exists()


def test_a_store_lost_mid_run_ends_with_the_resume_command_and_no_lock(tmp_path, monkeypatch, caplog):
    from pipeline.record import tracking
    from pipeline.run import runner

    def down(*a, **k):
        raise ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded")

    real_set_tags = tracking.Tracker.set_tags

    def set_tags(self, tags):  # the server goes down once the run has started its work
        if "device" in tags:
            for name in ("log_params", "log_metric", "log_metrics", "set_tags", "end", "log_artifact", "log_artifacts"):
                monkeypatch.setattr(tracking.Tracker, name, down)
            raise ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded")
        return real_set_tags(self, tags)

    monkeypatch.setattr(tracking.Tracker, "set_tags", set_tags)
    run_dir = tmp_path / "run"
    with caplog.at_level("ERROR"), pytest.raises(ConnectionError):
        runner.run_pipeline(compose_cfg(FAST, tmp_path / "out"), run_dir)
    assert f"python -m pipeline.run.resume {run_dir.resolve()}" in caplog.text
    assert not (run_dir / "run.lock").exists()
    assert runner.environment_failure(ConnectionError("x"), run_dir) is not None


def test_ctrl_c_ends_killed_with_the_resume_command(tmp_path, monkeypatch, caplog):
    from pipeline.run import runner

    def interrupted(ctx, modes):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "execute", interrupted)
    run_dir = tmp_path / "run"
    with caplog.at_level("INFO"), pytest.raises(KeyboardInterrupt):
        runner.run_pipeline(compose_cfg(FAST, tmp_path / "out"), run_dir)
    assert f"python -m pipeline.run.resume {run_dir.resolve()}" in caplog.text
    assert "incomplete" in caplog.text and "run KILLED" in caplog.text
    run_id = json.loads((run_dir / "run_info.json").read_text())["run_id"]
    assert _status(tmp_path / "out", run_id).info.status == "KILLED" and not (run_dir / "run.lock").exists()


def test_sigterm_during_the_closing_steps_waits_for_them(tmp_path, monkeypatch):
    """SIGTERM (a cluster's pre-emption) arriving while the run closes — sent by the process itself at that point
    (``crash_point("closing")``): every closing step still runs (results, report, artifacts, the MLflow status, the
    lock), then the interrupt ends the call; nothing RUNNING, no lock, no temp file."""
    import signal

    from pipeline.core import progress
    from pipeline.run.runner import run_pipeline

    def terminate(signum, frame):  # as the CLI's handler: SIGTERM ends runs like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    monkeypatch.setenv(progress.CRASH_ENV, "closing:1:SIGTERM")
    monkeypatch.setattr(progress, "_CRASH_COUNTS", {})
    out, run_dir = tmp_path / "out", tmp_path / "run"
    try:
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(compose_cfg(FAST, out), run_dir)
    finally:
        signal.signal(signal.SIGTERM, previous)
    [run] = all_runs(out)
    assert run.info.status == "FINISHED" and json.loads((run_dir / "results.json").read_text())  # the work was done
    assert (run_dir / "report.html").is_file() and not (run_dir / "run.lock").exists()
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp"))
