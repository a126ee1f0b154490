"""Sweeps: presets compose, shared model and reference inside a sweep, the parent summary, and the launchers
that leave one process (joblib on the SQLite store, submitit_local) or one machine (a real MLflow server)."""

from __future__ import annotations

import csv
import multiprocessing as mp
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import all_runs, run_cli
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from tiny import tiny_models

from pipeline.config import CONF_DIR, register_configs


def _sweep_params(experiment: str) -> dict:
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    return cfg, {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


def test_presets_compose_and_every_job_config_is_valid():
    from conftest import compose_cfg

    from pipeline import zoo

    cfg, params = _sweep_params("scheduler_sweep")
    assert params["scheduler"] == ["ddim", "pndm", "euler", "euler_ancestral", "heun", "dpmpp_2m", "unipc"]
    assert params["sampler.num_inference_steps"] == ["5", "10", "20", "50"]
    assert [k for k, v in cfg.mode.items() if v is not None] == ["metrics"]
    spacing = set()
    for name in params["scheduler"]:  # each job composes; only the solver changes, not the spacing
        job = compose_cfg(["experiment=scheduler_sweep", f"scheduler={name}", "sampler.num_inference_steps=5"])
        spacing.add((job.scheduler.timestep_spacing.name, job.scheduler.steps_offset))
    assert spacing == {("leading", 1)}

    _, params = _sweep_params("checkpoint_sweep")
    assert params["model.path"] == [str(p) for p in zoo.checkpoints("shapes_sd")] and len(params["model.path"]) == 3
    _, params = _sweep_params("guidance_sweep")
    assert [float(g) for g in params["sampler.guidance_scale"]] == [1, 2, 4, 7.5, 12]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("models"))


def _children(outputs: Path, parent_id: str):
    return [r for r in all_runs(outputs) if r.data.tags.get("mlflow.parentRunId") == parent_id]


def _parent(outputs: Path):
    return max(
        (r for r in all_runs(outputs) if r.data.tags.get("sweep.role") == "parent"), key=lambda r: r.info.start_time
    )


@pytest.mark.slow
def test_checkpoint_sweep_shares_model_and_reference_and_summarises(models, tmp_path):
    """2 checkpoints x 2 schedulers in one process: one load per checkpoint, one reference extraction."""
    out = tmp_path / "out"
    # tiny_models gives one text-to-image and one pixel model; two copies of the pixel model act as checkpoints
    import shutil

    ckpts = [tmp_path / "ckpt" / "step_00010", tmp_path / "ckpt" / "step_00020"]
    for c in ckpts:
        shutil.copytree(models["ddpm"], c)
    proc = run_cli(
        [
            "-m",
            "experiment=checkpoint_sweep",
            "model=hub",
            "features=[shapes_net]",
            "dataset=shapes",
            f"model.path={ckpts[0]},{ckpts[1]}",
            "scheduler=ddim,euler",
            f"paths.outputs={out}",
            f"features.shapes_net.model={models['net']}",
            "mode.metrics.num_samples=8",
            "dataset.num_images=16",
            "sampler.num_inference_steps=2",
            "sampler.batch_size=8",
            "mode.metrics.kid_subsets=2",
            "mode.metrics.grid=2",
        ],
        out,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parent = _parent(out)
    children = sorted(_children(out, parent.info.run_id), key=lambda r: r.info.start_time)
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert [c.data.tags["model_cache"] for c in children] == ["miss", "hit", "miss", "hit"]
    assert [c.data.tags["reference_cache"] for c in children] == ["miss", "hit", "hit", "hit"]
    assert [c.info.run_name for c in children] == [
        f"model.path={c.name}·scheduler={s}" for c in ckpts for s in ("ddim", "euler")
    ]
    # the parent: what was swept as params, the best value of each result key with a direction, and where it is
    assert parent.data.params == {"sweep.model.path": f"{ckpts[0]},{ckpts[1]}", "sweep.scheduler": "ddim,euler"}
    fds = {c.info.run_id: c.data.metrics["metrics/fd_shapes_net"] for c in children}
    assert parent.data.metrics["best.metrics/fd_shapes_net"] == min(fds.values())
    best_ids = parent.data.tags["best.metrics/fd_shapes_net.run_id"].split(",")  # a tie at the top: every run
    assert {fds[i] for i in best_ids} == {min(fds.values())}
    precision = {c.info.run_id: c.data.metrics["metrics/precision_shapes_net"] for c in children}
    if len(set(precision.values())) > 1:  # a key equal across jobs has nothing to rank: no best
        assert parent.data.metrics["best.metrics/precision_shapes_net"] == max(precision.values())
    else:
        assert "best.metrics/precision_shapes_net" not in parent.data.metrics
    assert (
        "best.metrics/num_samples" not in parent.data.metrics
        and "best.metrics/kid_std_shapes_net" not in parent.data.metrics
    )
    rows = list(csv.DictReader((Path(parent.data.tags["sweep.dir"]) / "sweep_summary.csv").open()))
    assert len(rows) == 4 and all(r["metrics/fd_shapes_net"] for r in rows)
    assert {r["metrics.primary_extractor"] for r in rows} == {"shapes_net"}
    assert (Path(parent.data.tags["sweep.dir"]) / "sweep_checkpoints.png").is_file()  # plotted by metrics/fd_shapes_net


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite backend, artifacts proxied) on 127.0.0.1 at a free port."""
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
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
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("mlflow server did not start:\n" + (root / "server.log").read_text()[-3000:])
            time.sleep(0.5)
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.slow
def test_sweep_on_a_tracking_server_and_compare_reads_it_back(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    proc = run_cli(
        [
            "-m",
            "tracking=server",
            f"tracking.uri={mlflow_server}",
            "tracking.experiment=on-server",
            "model=sd15_scheduler",
            "mode=[schedule]",
            "scheduler=ddim,euler",
            f"paths.outputs={out}",
        ],
        out,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (out / "mlflow.db").exists()  # nothing went to the embedded store
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("on-server")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "parent")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.metrics["schedule/num_visited"] == 25 for c in children)
    arts = {a.path for a in client.list_artifacts(children[0].info.run_id)}
    assert "results.json" in arts and "config_resolved.yaml" in arts
    assert any(a.path.endswith("sweep_summary.csv") for a in client.list_artifacts(parent.info.run_id, "tables"))

    proc = run_cli(
        [
            parent.info.run_id,
            "--tracking-uri",
            mlflow_server,
            "--sort",
            "schedule/num_visited",
            "--out",
            str(tmp_path / "cmp"),
        ],
        out,
        module="pipeline.record.compare",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = (tmp_path / "cmp").glob("*.csv")
    rows = list(csv.DictReader(next(table).open()))
    assert sorted(r["choice.scheduler"] for r in rows) == ["ddim", "euler"]


def _hammer(uri: str, outputs: str, k: int, q) -> None:
    """One process of the SQLite stress test: a run with many separate small writes."""
    from omegaconf import OmegaConf

    from pipeline.record.tracking import Tracker

    try:
        t = Tracker(OmegaConf.create({"uri": uri, "experiment": "stress"}), outputs)
        t.start(f"writer {k}")
        t.log_params({f"p{i}": i for i in range(150)})
        for i in range(30):
            t.log_metric(f"m{i % 6}", i, step=i)
            t.set_tags({f"t{i % 3}": i})
        t.end("FINISHED")
        q.put(("ok", k))
    except Exception as e:  # noqa: BLE001 - reported to the test
        q.put(("error", f"{type(e).__name__}: {e}"))


@pytest.mark.slow
def test_four_processes_write_one_sqlite_store_without_lock_errors(tmp_path):
    from omegaconf import OmegaConf

    from pipeline.record.tracking import Tracker, default_uri

    uri = default_uri(tmp_path)
    Tracker(
        OmegaConf.create({"uri": uri, "experiment": "stress"}), tmp_path
    )  # created (migrated) once, as a sweep's parent does
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(uri, str(tmp_path), k, q)) for k in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(r[0] == "ok" for r in results), results
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("stress").experiment_id])
    assert len(runs) == 4 and all(r.info.status == "FINISHED" and len(r.data.params) == 150 for r in runs)
    assert all(len(client.get_metric_history(r.info.run_id, "m0")) == 5 for r in runs)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_launchers_record_every_job(launcher, tmp_path):
    out = tmp_path / "out"
    # 2 jobs each are enough to show the launcher's path (joblib: in 2 parallel workers on one SQLite store); four
    # processes on one store: test_four_processes_write_one_sqlite_store_without_lock_errors
    schedulers = ["ddim", "euler"]
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=10"]
    proc = run_cli(
        [
            "-m",
            f"hydra/launcher={launcher}",
            *extra,
            "model=sd15_scheduler",
            "mode=[schedule]",
            "mode.schedule.compare=[linear]",
            f"scheduler={','.join(schedulers)}",
            f"paths.outputs={out}",
        ],
        out,
        timeout=400,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "database is locked" not in text and "Traceback" not in text
    parent = _parent(out)
    children = _children(out, parent.info.run_id)
    assert sorted(c.data.params["choice.scheduler"] for c in children) == sorted(schedulers)
    assert all(c.info.status == "FINISHED" and c.data.metrics for c in children)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.jobs"] == str(len(schedulers))


@pytest.mark.slow
def test_unknown_scheduler_in_a_sweep_fails_before_any_job(tmp_path):
    out = tmp_path / "out"
    proc = run_cli(
        ["-m", "model=sd15_scheduler", "mode=[schedule]", "scheduler=ddim,ddim_fast", f"paths.outputs={out}"], out
    )
    assert proc.returncode != 0
    assert "Could not find 'scheduler/ddim_fast'" in proc.stdout + proc.stderr
    runs = all_runs(out)
    assert [r.data.tags.get("sweep.role") for r in runs] == ["parent"]  # no job ran
    assert runs[0].info.status == "FAILED" and "configuration error" in runs[0].data.tags["error"]
