"""MLflow 3 entities on the embedded SQLite store: the run's datasets (reference and prompts, with the digests the
project computes), one logged model per checkpoint with each run's results logged against it, system metrics on and
off, and a store without these APIs (a warning, never a failed run)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading

import pytest
from conftest import compose_cfg, sqlite_uri
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.core import registry
from pipeline.data.reference import References
from pipeline.models.builtin import builtin_path
from pipeline.record import tracking
from pipeline.record.entities import PROMPTS, REFERENCE, model_record, run_datasets
from pipeline.run.runner import run_pipeline


def _checkpoints(root, *names):
    """Scheduler-only pipeline directories (the shipped sd15_scheduler) named as training checkpoints: enough for
    mode=[schedule], no weights."""
    paths = []
    for name in names:
        path = root / "ckpt" / name
        shutil.copytree(builtin_path("sd15_scheduler"), path)
        paths.append(path)
    return paths


def _schedule_cfg(path, outputs, *extra):
    return compose_cfg(
        ["model=hub", f"model.path={path}", "mode=[schedule]", "mode.schedule.compare=[linear]", *extra], outputs
    )


SCALARS = {"schedule/a": 1.5, "schedule/b": -2.0}


@pytest.fixture
def quick_schedule(monkeypatch):
    """mode=[schedule] runs one stage that logs :data:`SCALARS`, one more scalar and a live-progress metric
    (``interrupt["now"]``: it raises KeyboardInterrupt instead): the runner's whole life cycle in ~0.3 s."""
    interrupt = {"now": False}

    def scalars(ctx, cfg):
        if interrupt["now"]:
            raise KeyboardInterrupt
        ctx.log_scalars(SCALARS)
        ctx.log_scalar("schedule/c", 3.0)
        ctx.tracker.log_metrics({"progress/samples_done": 8}, step=8)
        return {}

    registry.load_modes(), registry.load_stages()  # the real ones first, so that none replaces ours later
    monkeypatch.setitem(registry.STAGES, "test_entities", registry.Stage("test_entities", scalars, (), ()))
    mode = registry.MODES["schedule"]
    monkeypatch.setitem(registry.MODES, "schedule", registry.Mode("schedule", ("test_entities",), mode.schema))
    return interrupt


def _system_metrics(run) -> set[str]:
    return {k for k in run.data.metrics if k.startswith("system/")}


def test_one_logged_model_per_checkpoint_results_against_it_and_system_metrics(outputs, tmp_path, quick_schedule):
    a, b = _checkpoints(tmp_path, "step_00010", "step_00020")
    runs = [
        run_pipeline(_schedule_cfg(a, outputs), tmp_path / "r1"),
        run_pipeline(_schedule_cfg(a, outputs, "tracking.system_metrics=false"), tmp_path / "r2"),
        run_pipeline(_schedule_cfg(b, outputs), tmp_path / "r3"),
    ]
    client = MlflowClient(sqlite_uri(outputs))
    got = [client.get_run(o.run_id) for o in runs]
    ids = [[m.model_id for m in r.inputs.model_inputs] for r in got]
    assert ids[0] == ids[1] != ids[2] and all(len(i) == 1 for i in ids)  # reused by the second run of a
    models = {m.model_id: m for m in client.search_logged_models([got[0].info.experiment_id], max_results=1000)}
    first, second = models[ids[0][0]], models[ids[2][0]]
    assert (first.name, second.name) == ("ckpt-step_00010", "ckpt-step_00020") and str(first.status) == "READY"
    assert first.params == {"path": str(a.resolve()), "step": "10"} and second.params["step"] == "20"
    assert first.source_run_id == runs[0].run_id and first.model_type == "diffusers"
    # each run's results are its checkpoint's metrics, once per run; live progress and system metrics are not
    logged = {(m.run_id, m.key, m.value) for m in client.get_logged_model(first.model_id).metrics}
    results = {**SCALARS, "schedule/c": 3.0}
    assert logged == {(o.run_id, k, v) for o in runs[:2] for k, v in results.items()}
    assert {(m.run_id, m.key) for m in client.get_logged_model(second.model_id).metrics} == {
        (runs[2].run_id, k) for k in results
    }
    assert len(client.get_metric_history(runs[0].run_id, "schedule/a")) == 1  # not doubled in the run's history
    assert got[0].data.metrics["progress/samples_done"] == 8
    # system metrics: on (the default) -> at least the closing sample; off -> none; no monitor thread left
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= _system_metrics(got[0])
    assert _system_metrics(got[1]) == set() and _system_metrics(got[2])
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]


def test_ctrl_c_stops_the_system_metrics_monitor(outputs, tmp_path, quick_schedule):
    (a,) = _checkpoints(tmp_path, "step_00040")
    quick_schedule["now"] = True
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_schedule_cfg(a, outputs, "tracking.system_metrics_interval_s=0.05"), tmp_path / "run")
    client = MlflowClient(sqlite_uri(outputs))
    exp = client.get_experiment_by_name("diffusion-lens").experiment_id
    run = client.search_runs([exp], filter_string=f"tags.run_dir = '{(tmp_path / 'run').resolve()}'")[0]
    assert run.info.status == "KILLED" and _system_metrics(run)
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    from tiny import tiny_sd

    return tiny_sd(tmp_path_factory.mktemp("tiny") / "sd")


def test_datasets_reference_and_prompts_with_the_projects_digests(outputs, tmp_path, sd_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    cfg = compose_cfg(
        [
            "model=hub",
            f"model.path={sd_path}",
            "dataset=shapes",
            "features=[shapes_net]",
            "mode=[metrics]",
            "mode.metrics.num_samples=8",
            "dataset.num_images=16",
            "sampler.num_inference_steps=1",
            "sampler.batch_size=8",
            "mode.metrics.kid_subsets=2",
            "mode.metrics.grid=2",
            f"mode.metrics.prompts_file={prompts}",
        ],
        outputs,
    )
    out = run_pipeline(cfg, tmp_path / "run")
    run = MlflowClient(sqlite_uri(outputs)).get_run(out.run_id)
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == [PROMPTS, REFERENCE] and all(
        i.tags[0].key == "mlflow.data.context" for i in run.inputs.dataset_inputs
    )
    ref = References(cfg.dataset).first(16)
    assert (inputs[REFERENCE].name, inputs[REFERENCE].digest) == ("shapes", ref.content_hash())
    assert inputs[REFERENCE].source_type == "code" and '"split": "test"' in inputs[REFERENCE].source
    assert inputs[PROMPTS].name == "prompts.txt" and inputs[PROMPTS].source_type == "local"
    assert inputs[PROMPTS].digest == hashlib.sha256(prompts.read_bytes()).hexdigest()[:20]
    assert '"num_prompts": 2' in inputs[PROMPTS].profile

    # the digest follows the file's bytes; without a prompts file, the reference captions are the prompt set
    artifacts = {"reference": References(cfg.dataset), "prompts": ["a red circle"] * 8}
    artifacts["reference"].first(16)
    before = {r.context: r.digest for r in run_datasets(artifacts, cfg)}
    prompts.write_text("a red circle\na green square\n")
    after = {r.context: r.digest for r in run_datasets(artifacts, cfg)}
    assert after[REFERENCE] == before[REFERENCE] and after[PROMPTS] != before[PROMPTS] == inputs[PROMPTS].digest
    cfg.mode.metrics.prompts_file = None
    captions = [r for r in run_datasets(artifacts, cfg) if r.context == PROMPTS][0]
    digest = hashlib.sha256(json.dumps(ref.captions, ensure_ascii=False).encode()).hexdigest()[:20]
    assert (captions.name, captions.digest) == ("shapes captions", digest)


def test_a_store_without_the_entity_apis_warns_once_and_the_run_finishes(
    outputs, tmp_path, monkeypatch, caplog, quick_schedule
):
    (a,) = _checkpoints(tmp_path, "step_00030")

    def refuse(*args, **kwargs):
        raise MlflowException("API request to endpoint /api/2.0/mlflow/logged-models failed with error code 404")

    monkeypatch.setattr(tracking, "_WARNED", set())
    monkeypatch.setattr(MlflowClient, "search_logged_models", refuse)
    monkeypatch.setattr(MlflowClient, "log_inputs", refuse)
    import mlflow.system_metrics.system_metrics_monitor as monitor

    monkeypatch.setattr(monitor.SystemMetricsMonitor, "__init__", refuse)
    with caplog.at_level(logging.WARNING):
        outs = [run_pipeline(_schedule_cfg(a, outputs), tmp_path / f"r{i}") for i in range(2)]
    assert [o.status for o in outs] == ["FINISHED", "FINISHED"]
    warned = sorted(r.getMessage() for r in caplog.records if r.name == "pipeline.record.tracking")
    assert len(warned) == 2 and all("404" in w and "The run goes on" in w for w in warned)
    assert warned[0].startswith("MLflow logged models failed") and warned[1].startswith("MLflow system metrics")
    run = MlflowClient(sqlite_uri(outputs)).get_run(outs[1].run_id)
    assert run.data.metrics["schedule/a"] == SCALARS["schedule/a"] and not _system_metrics(run)


def test_model_record_names_steps_and_identity(tmp_path):
    from omegaconf import OmegaConf

    (a,) = _checkpoints(tmp_path, "step_00750")
    rec = model_record(OmegaConf.create({"path": str(a), "revision": None, "variant": None}))
    assert rec.name == "ckpt-step_00750" and rec.params["step"] == "750"
    again = model_record(OmegaConf.create({"path": str(a) + "/", "revision": None, "variant": None}))
    assert again.identity == rec.identity  # the resolved directory, however it is spelled
    hub = model_record(OmegaConf.create({"path": "org/my.model", "revision": "v2", "variant": None}))
    assert hub.name == "org-my-model" and hub.params == {"path": "org/my.model", "revision": "v2"}
    assert (
        hub.identity
        != model_record(OmegaConf.create({"path": "org/my.model", "revision": None, "variant": None})).identity
    )
    with pytest.raises(AttributeError):
        rec.name = "x"  # frozen
