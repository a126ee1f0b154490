"""Logging into a temporary SQLite store: flattened params, choices, tags, metrics == results.json, artifacts,
run status on success, on failure midway and on Ctrl-C."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from conftest import compose_cfg, sqlite_uri
from pipeline import registry
from pipeline.runner import run_pipeline
from pipeline.tracking import flatten


def test_flatten_uses_dot_keys():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": {}}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None", "e": "{}"}


def test_run_is_logged_completely(outputs, tmp_path):
    cfg = compose_cfg(["scheduler=euler", "sampler.num_inference_steps=20"], outputs)
    out = run_pipeline(cfg, tmp_path / "run", choices={"scheduler": "euler", "model": "sd15_scheduler", "mode": ["schedule"]})
    client = MlflowClient(sqlite_uri(outputs))
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["sampler.num_inference_steps"] == "20" and p["scheduler.cls"] == "EulerDiscreteScheduler"
    assert p["scheduler.timestep_spacing"] == "leading" and p["seed"] == "0"
    assert p["mode.schedule.compare"].startswith("['linear'")
    assert p["choice.scheduler"] == "euler" and p["choice.model"] == "sd15_scheduler"
    t = run.data.tags
    for key in ["git.commit", "git.dirty", "device", "version.torch", "version.diffusers", "version.transformers",
                "version.torchmetrics", "version.mlflow"]:
        assert t[key], key
    assert t["device"] == "cpu"
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results == run.data.metrics and len(results) > 50
    arts = {a.path for a in client.list_artifacts(out.run_id)}
    assert {"config_resolved.yaml", "results.json", "plots", "tables"} <= arts
    plots = {a.path for a in client.list_artifacts(out.run_id, "plots")}
    assert "plots/schedule_log_snr_overlay.png" in plots
    tables = {a.path for a in client.list_artifacts(out.run_id, "tables")}
    assert "tables/schedule_summary.csv" in tables


def _with_stage(monkeypatch, fn):
    """Make the schedule mode run one more stage after its own."""
    registry.stage("test_extra")(fn)
    monkeypatch.setitem(registry.MODES, "schedule", registry.Mode("schedule", ("schedule", "test_extra"),
                                                                  registry.MODES["schedule"].schema))
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
    run = [r for r in MlflowClient(sqlite_uri(outputs)).search_runs(
        [MlflowClient(sqlite_uri(outputs)).get_experiment_by_name("diffusion-lens").experiment_id],
        filter_string=f"tags.run_dir = '{(tmp_path / 'run').resolve()}'")][0]
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
