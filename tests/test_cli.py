"""The command line as a user meets it (subprocesses): main job, multirun parent/child runs, reproduce, bad
input (short message, non-zero exit, no run left RUNNING) and Ctrl-C mid-sweep."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, all_runs, run_cli, sqlite_uri


def _no_run_left_running(outputs):
    running = [r.info.run_name for r in all_runs(outputs) if r.info.status == "RUNNING"]
    assert not running, running


@pytest.fixture(scope="module")
def main_run(outputs):
    """The README's main job, once: python -m pipeline (default model, offline)."""
    proc = run_cli([f"paths.outputs={outputs}"], outputs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = sorted((outputs / "runs").glob("*/*"))[-1]
    return run_dir, json.loads((run_dir / "run_info.json").read_text())["run_id"]


def test_main_job_writes_run_dir_and_mlflow_run(main_run, outputs):
    run_dir, run_id = main_run
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "config_resolved.yaml").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sqlite_uri(outputs))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["choice.model"] == "shapes_sd" and run.data.params["choice.mode"] == "['schedule']"
    assert {a.path for a in client.list_artifacts(run_id, ".hydra")} >= {".hydra/config.yaml", ".hydra/overrides.yaml"}


def test_reproduce_by_run_id_and_by_run_dir(main_run, outputs, tmp_path, capsys):
    run_dir, run_id = main_run
    proc = run_cli(
        [run_id, "--tracking-uri", sqlite_uri(outputs), f"paths.outputs={outputs}"],
        outputs,
        module="pipeline.run.reproduce",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n = len(json.loads((run_dir / "results.json").read_text()))
    assert f"{n}/{n} scalars match" in proc.stdout
    reproduced = [r for r in all_runs(outputs) if r.data.tags.get("reproduced_from") == run_id]
    assert len(reproduced) == 1 and reproduced[0].info.status == "FINISHED"

    # a run dir whose recorded results differ must not pass (in-process: the command line is covered above)
    from pipeline.run import reproduce

    tampered = tmp_path / "tampered"
    shutil.copytree(run_dir, tampered)
    results = json.loads((tampered / "results.json").read_text())
    results["schedule/log_snr_max"] += 1e-9
    (tampered / "results.json").write_text(json.dumps(results))
    assert reproduce.main([str(tampered), f"paths.outputs={outputs}"]) == 1
    assert "MISMATCH schedule/log_snr_max" in capsys.readouterr().out


def _flat_schedule_model(root: Path) -> Path:
    """sd15_scheduler's scheduler with ᾱ flat over its first steps (β = 0): it passes every check before work and
    fails in the schedule stage (``mode.schedule.strict``), a job failing at run time."""
    import shutil

    from pipeline.models.builtin import BUILTIN_DIR

    flat = root / "flat"
    shutil.copytree(BUILTIN_DIR / "sd15_scheduler", flat)
    file = flat / "scheduler" / "scheduler_config.json"
    config = json.loads(file.read_text())
    config.update(trained_betas=[0.0] * 10 + [0.01] * 990, num_train_timesteps=1000)
    file.write_text(json.dumps(config))
    return flat


@pytest.mark.slow
def test_multirun_makes_one_parent_and_a_child_per_job_even_when_one_fails(outputs, tmp_path):
    from pipeline.models.builtin import BUILTIN_DIR

    good, flat = BUILTIN_DIR / "sd15_scheduler", _flat_schedule_model(tmp_path)
    before = {r.info.run_id for r in all_runs(outputs)}
    proc = run_cli(
        [
            "-m",
            f"paths.outputs={outputs}",
            "mode=[schedule]",
            "scheduler=ddim,euler",
            "model=hub",
            f"model.path={good},{flat}",
            "mode.schedule.compare=[linear]",
        ],
        outputs,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the sweep finished, but two jobs failed
    assert "is not strictly decreasing" in proc.stdout + proc.stderr
    new = [r for r in all_runs(outputs) if r.info.run_id not in before]
    parents = [r for r in new if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in new if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.status for r in children) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    assert all("not strictly decreasing" in r.data.tags["error"] for r in children if r.info.status == "FAILED")
    assert parents[0].data.tags["sweep.failed_jobs"] == "2"
    sweep_dir = Path(parents[0].data.tags["sweep.dir"])
    assert len((sweep_dir / "sweep_summary.csv").read_text().strip().splitlines()) == 1 + 4
    _no_run_left_running(outputs)
    # names: the parent by what it sweeps (also its params), each job by its swept overrides
    parent = parents[0]
    assert parent.data.params == {"sweep.scheduler": "ddim,euler", "sweep.model.path": f"{good},{flat}"}
    assert parent.data.metrics == {}  # schedule keys have no better direction: no best.<key>
    assert parent.info.run_name == "sweep·scheduler=ddim,euler·model.path=sd15_scheduler,flat"  # paths by their name
    assert sorted(r.info.run_name for r in children) == sorted(
        f"scheduler={s}·model.path={m}" for s in ("ddim", "euler") for m in ("sd15_scheduler", "flat")
    )
    assert parent.data.tags["tracking.uri_effective"] == sqlite_uri(outputs)
    runs_url = f"http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs"
    assert f"  this run    {runs_url}/{parent.info.run_id}" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last.endswith(
        "Sweep done: 2 of 4 jobs finished, 2 did not (scheduler=ddim·model.path=flat; "
        f"scheduler=euler·model.path=flat); summary table {sweep_dir / 'sweep_summary.csv'}, plots sweep_visited.png."
    ), last  # the children's visited steps, stacked (docs/sweeps.md)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["scheduler=ddim_fast"], "Could not find 'scheduler/ddim_fast'"),
        (["sampler.num_inference_stepz=3"], "num_inference_stepz"),
        (["model.path=/nonexistent/model"], "model.path: directory '/nonexistent/model' does not exist"),
        (["tracking.uri=http://127.0.0.1:9"], "tracking.uri: cannot reach MLflow server"),
        ([f"seed={2**64}", "sampler.guidance_scale=nan"], "seed=18446744073709551616: expected >= 0 and < 2**32"),
    ],
    ids=["unknown-option", "misspelled-key", "missing-model-path", "unreachable-server", "out-of-range"],
)
def test_bad_input_gives_a_short_error_and_leaves_nothing_running(args, expected, outputs):
    """Refused before any work: one message, no traceback, no new run dir and no new MLflow run."""
    dirs = set((outputs / "runs").rglob("*")) if (outputs / "runs").exists() else set()
    before = {r.info.run_id for r in all_runs(outputs)} if (outputs / "mlflow.db").exists() else set()
    proc = run_cli([f"paths.outputs={outputs}", *args], outputs, timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert expected in text, text
    assert "Traceback" not in text
    assert (set((outputs / "runs").rglob("*")) if (outputs / "runs").exists() else set()) <= dirs
    assert not (outputs / "mlflow.db").exists() or {r.info.run_id for r in all_runs(outputs)} == before


@pytest.mark.slow
def test_ctrl_c_mid_sweep_leaves_no_run_running(outputs):
    """Ctrl-C when the second job's schedule stage starts (sent by the process itself at that point: no sleep, no
    race with a store write) and with SIGINT at its default whatever way the suite was launched (``nohup … &``
    leaves it ignored)."""
    from conftest import default_signals

    cmd = [sys.executable, "-m", "pipeline", "-m", f"paths.outputs={outputs}", "scheduler=ddim,euler,heun"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "DIFFUSION_LENS_CRASH_AT": "stage_schedule:2:SIGINT",
    }
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, preexec_fn=default_signals
    )
    assert proc.returncode == 130, proc.stdout[-3000:] + proc.stderr[-3000:]
    _no_run_left_running(outputs)
    runs = all_runs(outputs)
    parent = max((r for r in runs if r.data.tags.get("sweep.role") == "parent"), key=lambda r: r.info.start_time)
    assert parent.info.status == "KILLED"
    statuses = sorted(r.info.status for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert "FINISHED" in statuses and "KILLED" in statuses  # the finished job keeps its results
