"""Resume after a crash: runs SIGKILLed at several points (mid-generation, half-way through a shard write, after
the shards are assembled, at a random moment from outside) resume in the same MLflow run and end with the scalars
of an uninterrupted run, exactly (CPU), timings aside; a live owner and a changed config are refused; a killed
sweep resumes under its parent with only its unfinished jobs run. Every killed process runs at once (one fixture)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, all_runs, compose_cfg

CRASH_POINTS = ("shard_written:2", "shard_half_written:3", "metrics_assembled", "external")


def _name(point: str) -> str:
    return point.split(":")[0]


def _launch(args, out: Path, crash: str | None, *hydra) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    if crash:
        env["DIFFUSION_LENS_CRASH_AT"] = crash
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *hydra, *args, f"paths.outputs={out}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Tiny metrics runs killed at each crash point, and a 2-job sweep killed inside its first job (each its own
    store: a fresh SQLite store is not built by five processes at once)."""
    from tiny import tiny_models

    root = tmp_path_factory.mktemp("resume")
    models = tiny_models(root / "models")
    args = [
        "model=hub",
        "features=[shapes_net]",
        "dataset=shapes",
        f"model.path={models['sd']}",
        "mode=[metrics]",
        f"features.shapes_net.model={models['net']}",
        "mode.metrics.num_samples=14",
        "dataset.num_images=16",
        "sampler.num_inference_steps=2",
        "sampler.batch_size=4",
        "mode.metrics.kid_subsets=3",
        "mode.metrics.grid=2",
        "mode.metrics.cache=false",
    ]
    procs = {
        p: _launch(args, root / f"out_{_name(p)}", None if p == "external" else p, f"hydra.run.dir={root / _name(p)}")
        for p in CRASH_POINTS
    }
    procs["sweep"] = _launch(
        args,
        root / "out_sweep",
        "shard_written:2",
        "-m",
        f"hydra.sweep.dir={root / 'sweep'}",
        "sampler.guidance_scale=3,5",
    )
    shards = root / "external" / "progress" / "metrics"  # killed from outside once its first shard is on disk
    deadline = time.time() + 120
    while not list(shards.glob("batch_*.npz")) and procs["external"].poll() is None and time.time() < deadline:
        time.sleep(0.05)
    procs["external"].send_signal(signal.SIGKILL)
    for point, proc in procs.items():
        log = proc.communicate(timeout=240)[0]
        assert proc.returncode == -signal.SIGKILL, f"{point}: {proc.returncode}\n{log[-3000:]}"
    return root, args


def _results(run_dir: Path) -> dict:
    from pipeline.core.metric_keys import is_timing

    return {k: v for k, v in json.loads((run_dir / "results.json").read_text()).items() if not is_timing(k)}


def test_killed_runs_resume_to_the_uninterrupted_result(killed, caplog, monkeypatch):
    import torch

    monkeypatch.setenv("DIFFUSION_LENS_THREAD_POLICY", "off")  # one thread throughout, as the subprocesses
    from pipeline.core import progress
    from pipeline.record.ranking import best_runs
    from pipeline.record.sweep_summary import child_rows
    from pipeline.run import resume
    from pipeline.run.runner import run_pipeline

    root, args = killed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses: the same BLAS reduction order
    try:
        monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)  # live progress after every batch
        baseline = run_pipeline(compose_cfg(args, root / "out_baseline"), root / "baseline")
        monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 30.0)
        from mlflow.tracking import MlflowClient

        [run] = all_runs(root / "out_baseline")
        history = MlflowClient(f"sqlite:///{root / 'out_baseline' / 'mlflow.db'}").get_metric_history(
            run.info.run_id, "progress/samples_done"
        )
        assert [(m.step, m.value) for m in history][-1] == (14, 14) and len(history) >= 4  # stepped, one per batch
        assert "progress/images_per_s" in run.data.metrics and not any(
            k.startswith("progress/") for k in baseline.results
        )
        assert not any(k.startswith("progress/") for k in [*child_rows([run])[0], *best_runs([run])])
        for point in CRASH_POINTS:
            run_dir, out = root / _name(point), root / f"out_{_name(point)}"
            [before] = all_runs(out)
            assert before.info.status == "RUNNING", point  # SIGKILL: nobody closed it; its lock is stale (pid gone)
            assert list((run_dir / "progress" / "metrics").glob("batch_*.npz")), point
            if point == CRASH_POINTS[0]:
                _refusals(run_dir, caplog)
            caplog.clear()
            # by run dir, or by MLflow run id (its run_dir tag); model.device: an allowed change
            ref = (
                [before.info.run_id, "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}"]
                if point == "external"
                else [str(run_dir)]
            )
            with caplog.at_level("INFO"):
                assert resume.main([*ref, "model.device=cpu", f"paths.outputs={out}"]) == 0, point
            if point.startswith("shard"):
                assert any("resuming at sample" in r.getMessage() for r in caplog.records), point
            assert _results(run_dir) == _results(baseline.run_dir), point
            [after] = all_runs(out)  # the same run, not a new one
            assert after.info.run_id == before.info.run_id, point
            assert after.info.status == "FINISHED" and after.data.tags["resumed"] == "1", point
            assert not (run_dir / "progress").exists() and not (run_dir / "run.lock").exists()
            assert resume.main([str(run_dir), f"paths.outputs={out}"]) == 0  # finished: nothing to do
            assert all_runs(out)[0].data.tags["resumed"] == "1"
    finally:
        torch.set_num_threads(threads)


def _refusals(run_dir: Path, caplog) -> None:
    from pipeline.run import resume

    with caplog.at_level("ERROR"):
        assert resume.main([str(run_dir), "sampler.batch_size=8", "model.device=cpu"]) == 2
    assert "sampler.batch_size: 4 -> 8" in caplog.text and "model.device" not in caplog.text.split("differ")[-1]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live owner: pid alive, fresh heartbeat
        lock = {"host": os.uname().nodename, "pid": sleeper.pid, "started": time.time(), "heartbeat": time.time()}
        (run_dir / "run.lock").write_text(json.dumps(lock))
        caplog.clear()
        with caplog.at_level("ERROR"):
            assert resume.main([str(run_dir)]) == 2
        assert f"pid {sleeper.pid}" in caplog.text and "alive" in caplog.text
        lock["heartbeat"] = time.time() - 600  # no heartbeat for 10 minutes: stale although the pid lives
        (run_dir / "run.lock").write_text(json.dumps(lock))
        from pipeline.core.progress import lock_owner

        assert lock_owner(run_dir) is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_killed_sweep_resumes_its_unfinished_jobs_under_its_parent(killed, monkeypatch):
    from pipeline.run import resume

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root, _ = killed
    out, sweep = root / "out_sweep", root / "sweep"
    runs = all_runs(out)
    [parent] = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert parent.info.status == "RUNNING" and [r.info.status for r in runs if r is not parent] == ["RUNNING"]
    assert not (sweep / "1").exists()  # killed inside job 0: job 1 never started
    assert resume.main([str(sweep)]) == 0
    runs = all_runs(out)
    [parent2] = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent2.info.run_id == parent.info.run_id and parent2.info.status == "FINISHED"
    assert parent2.data.tags["resumed"] == "1" and len(children) == 2  # job 0 resumed, job 1 run: no duplicate
    assert sorted((r.data.tags.get("resumed", "0"), r.info.status) for r in children) == [
        ("0", "FINISHED"),
        ("1", "FINISHED"),
    ]
    assert resume.main([str(sweep)]) == 0  # again: both jobs finished, skipped
    assert len([r for r in all_runs(out) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]) == 2
