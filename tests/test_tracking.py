"""Logging into a temporary SQLite store: flattened params, choices, tags, metrics == results.json, artifacts,
run status on success, on failure midway and on Ctrl-C; the store's precedence (tracking.uri >
MLFLOW_TRACKING_URI > default), run names, deep links, the end-of-run summary, the sweep parent's best values."""

from __future__ import annotations

import doctest
import json
import logging
from types import SimpleNamespace

import pytest
from conftest import compose_cfg, sqlite_uri
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline.core import registry
from pipeline.core.metric_keys import is_progress
from pipeline.record import naming
from pipeline.record.tracking import Tracker, default_uri, flatten, public_uri, resolve_uri, run_links, ui_command
from pipeline.run.runner import RunOutcome, run_pipeline


def test_flatten_uses_dot_keys():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": {}}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "None",
        "e": "{}",
    }


def test_run_is_logged_completely(outputs, tmp_path, caplog):
    cfg = compose_cfg(["scheduler=euler", "sampler.num_inference_steps=20", "sampler.guidance_scale=5"], outputs)
    with caplog.at_level(logging.INFO):
        out = run_pipeline(
            cfg, tmp_path / "run", choices={"scheduler": "euler", "model": "sd15_scheduler", "mode": ["schedule"]}
        )
    client = MlflowClient(sqlite_uri(outputs))
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "schedule·shapes_sd·euler×20·g5"  # not MLflow's random name
    assert run.data.tags["tracking.uri_effective"] == sqlite_uri(outputs)
    # the solver used, not the class of the model's scheduler config it was built from
    assert "solver EulerDiscreteScheduler (scheduler=euler) from scheduler config" in caplog.text
    assert "(the model's DDIMScheduler)" in caplog.text and "(DDIMScheduler)" not in caplog.text
    # the summary is the run's last word: headline scalars, run dir, run id and name, deep links, mlflow ui
    summary = [r.getMessage() for r in caplog.records if r.name == "pipeline.run.runner"][-1].splitlines()
    runs_url = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs"
    assert summary == [
        "run FINISHED",
        f"  schedule/log_snr_max = {out.results['schedule/log_snr_max']:.4g}  ·  schedule/log_snr_min = "
        f"{out.results['schedule/log_snr_min']:.4g}  ·  schedule/terminal_snr = {out.results['schedule/terminal_snr']:.4g}",
        f"  run dir     {tmp_path / 'run'}",
        f"  MLflow run  {out.run_id}  (schedule·shapes_sd·euler×20·g5)",
        f"  runs table  {runs_url}",
        f"  this run    {runs_url}/{out.run_id}",
        f"  browse      mlflow ui --backend-store-uri {sqlite_uri(outputs)}",
    ]
    assert summary[1].startswith("  schedule/log_snr_max = 7.069  ·")
    p = run.data.params
    assert p["sampler.num_inference_steps"] == "20" and p["scheduler.cls"] == "EulerDiscreteScheduler"
    assert p["scheduler.timestep_spacing"] == "leading" and p["seed"] == "0"
    assert p["mode.schedule.compare"].startswith("['linear'")
    assert p["choice.scheduler"] == "euler" and p["choice.model"] == "sd15_scheduler"
    t = run.data.tags
    for key in [
        "git.commit",
        "git.dirty",
        "device",
        "version.torch",
        "version.diffusers",
        "version.transformers",
        "version.torchmetrics",
        "version.mlflow",
    ]:
        assert t[key], key
    assert t["device"] == "cpu"
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    logged = {k: v for k, v in run.data.metrics.items() if not is_progress(k)}  # not MLflow's system/ metrics
    assert results == logged and len(results) > 50
    arts = {a.path for a in client.list_artifacts(out.run_id)}
    assert {"config_resolved.yaml", "results.json", "plots", "tables"} <= arts
    plots = {a.path for a in client.list_artifacts(out.run_id, "plots")}
    assert "plots/schedule_log_snr_overlay.png" in plots
    tables = {a.path for a in client.list_artifacts(out.run_id, "tables")}
    assert "tables/schedule_summary.csv" in tables


def _with_stage(monkeypatch, fn):
    """Make the schedule mode run one more stage after its own."""
    registry.stage("test_extra")(fn)
    monkeypatch.setitem(
        registry.MODES,
        "schedule",
        registry.Mode("schedule", ("schedule", "test_extra"), registry.MODES["schedule"].schema),
    )
    return lambda: registry.STAGES.pop("test_extra", None)


def test_failure_midway_keeps_earlier_results_and_marks_run_failed(outputs, tmp_path, monkeypatch):
    def boom(ctx, cfg):
        raise RuntimeError("disk on fire")

    cleanup = _with_stage(monkeypatch, boom)
    try:
        with pytest.raises(RuntimeError, match="disk on fire"):
            run_pipeline(compose_cfg([], outputs), tmp_path / "run")
    finally:
        cleanup()
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["schedule/log_snr_max"] == pytest.approx(7.0694, abs=1e-3)  # the completed stage's results
    run = [
        r
        for r in MlflowClient(sqlite_uri(outputs)).search_runs(
            [MlflowClient(sqlite_uri(outputs)).get_experiment_by_name("diffusion-lens").experiment_id],
            filter_string=f"tags.run_dir = '{(tmp_path / 'run').resolve()}'",
        )
    ][0]
    assert run.info.status == "FAILED" and "disk on fire" in run.data.tags["error"]
    assert run.data.metrics["schedule/log_snr_max"] == saved["schedule/log_snr_max"]


def test_ctrl_c_ends_the_run_killed(outputs, tmp_path, monkeypatch):
    def interrupt(ctx, cfg):
        raise KeyboardInterrupt

    cleanup = _with_stage(monkeypatch, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(compose_cfg([], outputs), tmp_path / "run")
    finally:
        cleanup()
    client = MlflowClient(sqlite_uri(outputs))
    exp = client.get_experiment_by_name("diffusion-lens").experiment_id
    run = client.search_runs([exp], filter_string=f"tags.run_dir = '{(tmp_path / 'run').resolve()}'")[0]
    assert run.info.status == "KILLED"


def test_store_precedence_tracking_uri_then_env_then_default(outputs, tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI is the store when tracking.uri is null, for a run, pipeline.run.reproduce and pipeline.record.compare;
    a configured tracking.uri (or --tracking-uri) wins; config_resolved.yaml keeps tracking.uri as configured."""
    from pipeline.record.compare import open_store
    from pipeline.run import reproduce

    env_uri = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    assert resolve_uri(None, tmp_path) == env_uri and resolve_uri("http://h:5000", tmp_path) == "http://h:5000"
    out_dir = tmp_path / "out"
    out = run_pipeline(compose_cfg(["mode.schedule.compare=[linear]"], out_dir), tmp_path / "run")
    run = MlflowClient(env_uri).get_run(out.run_id)
    assert run.data.tags["tracking.uri_effective"] == env_uri and not (out_dir / "mlflow.db").exists()
    assert OmegaConf.load(tmp_path / "run" / "config_resolved.yaml").tracking.uri is None  # as configured
    configured = OmegaConf.create({"uri": sqlite_uri(outputs), "experiment": "diffusion-lens"})
    assert Tracker(configured, out_dir).uri == sqlite_uri(outputs)  # tracking.uri wins over the variable

    assert open_store(None, tmp_path / "elsewhere")[1] == env_uri  # compare: the variable, then --outputs' default
    assert open_store(sqlite_uri(outputs), tmp_path)[1] == sqlite_uri(outputs)  # --tracking-uri wins
    # reproduce by run id without --tracking-uri: read from the variable's store, the new run logged there too
    assert reproduce.main([out.run_id, f"paths.outputs={out_dir}"]) == 0
    again = MlflowClient(env_uri).search_runs([run.info.experiment_id], f"tags.reproduced_from = '{out.run_id}'")
    assert len(again) == 1 and again[0].data.tags["tracking.uri_effective"] == env_uri
    assert again[0].info.run_name == f"reproduce {out.run_id[:8]}·schedule·shapes_sd·native×25·g7.5"

    # ... unless tracking.uri= is overridden (the store then follows the override, i.e. the runner decides)
    seen = {}

    def fake_run(cfg, run_dir, **kw):
        seen.update(kw, uri=cfg.tracking.uri)
        return RunOutcome("x", "FINISHED", run_dir, dict(out.results))

    monkeypatch.setattr("pipeline.run.reproduce.run_pipeline", fake_run)
    assert reproduce.main([out.run_id, f"tracking.uri={sqlite_uri(outputs)}", f"paths.outputs={out_dir}"]) == 0
    assert seen["tracking_uri"] is None and seen["uri"] == sqlite_uri(outputs)
    assert reproduce.main([out.run_id, "--tracking-uri", env_uri, f"paths.outputs={out_dir}"]) == 0
    assert seen["tracking_uri"] == env_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_uri(None, tmp_path) == default_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_deep_links_skip_the_genai_overview_and_keep_no_secret():
    assert run_links("abc", "sqlite:///x.db", "3") == (
        "http://127.0.0.1:5000/#/experiments/3/runs",
        "http://127.0.0.1:5000/#/experiments/3/runs/abc",
    )
    assert run_links("abc", "https://me:token@mlflow.lab:8443/", "7") == (
        "https://mlflow.lab:8443/#/experiments/7/runs",
        "https://mlflow.lab:8443/#/experiments/7/runs/abc",
    )
    assert public_uri("https://me:token@mlflow.lab/") == "https://me:***@mlflow.lab/"  # redacted, the user kept
    assert ui_command("sqlite:////o/mlflow.db") == "mlflow ui --backend-store-uri sqlite:////o/mlflow.db"
    assert "mlflow ui" not in ui_command("http://h:5000") and "http://h:5000" in ui_command("http://h:5000")


def test_run_names():
    assert doctest.testmod(naming).failed == 0
    cfg = compose_cfg(["model=hub", "model.path=org/my-model", "sampler.guidance_scale=2.0"])
    assert naming.run_name(cfg, ["metrics", "latent"], {"scheduler": "ddim"}) == "metrics+latent·my-model·ddim×25·g2"
    assert naming.run_name(compose_cfg(["tracking.run_name=mine"]), ["schedule"]) == "mine"  # still wins
    assert len(naming.job_name([f"model.path=/{'x' * 300}"], ["model.path"])) == naming.MAX_NAME
    # what a multirun sweeps: preset params, overridden by the command line; a plain override fixes a key
    swept = naming.swept_values(
        ["scheduler=ddim,euler", "model.path=/c/a", "sampler.num_inference_steps=range(5,15,5)"],
        {"model.path": "/c/a,/c/b", "sampler.guidance_scale": "1,7.5"},
    )
    assert swept == {
        "sampler.guidance_scale": ["1", "7.5"],
        "scheduler": ["ddim", "euler"],
        "sampler.num_inference_steps": ["5", "10"],
    }


def test_sweep_parent_best_per_direction_and_closing_sentence(tmp_path):
    from pipeline.record.ranking import best_runs
    from pipeline.record.sweep_summary import sentence

    def run(rid, status, start, **metrics):
        return SimpleNamespace(
            info=SimpleNamespace(run_id=rid, status=status, start_time=start),
            data=SimpleNamespace(metrics={k.replace("__", "/"): v for k, v in metrics.items()}),
        )

    children = [
        run("a", "FINISHED", 1, metrics__fd_shapes_net=40.0, metrics__prompt_accuracy=0.5, metrics__num_samples=8),
        run("b", "FINISHED", 2, metrics__fd_shapes_net=30.0, metrics__prompt_accuracy=0.5, schedule__log_snr_max=7.0),
        run("c", "FAILED", 3, metrics__fd_shapes_net=1.0, metrics__prompt_accuracy=1.0),
    ]
    # lower FD; accuracy equal across the finished jobs: nothing to rank; counts, schedule keys, failed runs: no best
    assert best_runs(children) == {"metrics/fd_shapes_net": (30.0, "b")}
    rows = [{"run_name": "scheduler=ddim", "status": "FINISHED"}, {"run_name": "scheduler=x", "status": "FAILED"}]
    table = tmp_path / "sweep_summary.csv"
    assert sentence(rows, table, [tmp_path / "sweep_frontier.png"]) == (
        f"Sweep done: 1 of 2 jobs finished, 1 did not (scheduler=x); summary table {table}, plots sweep_frontier.png."
    )
    assert sentence(rows[:1] * 4, table, []) == f"Sweep done: all 4 jobs finished; summary table {table}."
