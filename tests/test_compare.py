"""Sweep comparison from MLflow alone: rows per child (failed ones too), sorting, which plots fit which sweep,
the parent run's artifacts, and ``python -m pipeline.record.compare`` by parent id / experiment name / bad target.
Runs are fabricated directly in a temporary SQLite store (no pipeline runs), so this is fast."""

from __future__ import annotations

import csv
import time
from types import SimpleNamespace

import pytest
from conftest import run_cli, sqlite_uri
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline.core.metric_keys import PRIMARY_EXTRACTOR_TAG
from pipeline.record import compare as C
from pipeline.record.sweep_summary import child_rows, plot_kinds, plots, summarise, swept

ZOO = "/repo/pipeline/zoo/weights"
SCHED_FID = {
    ("ddim", 10): 60.0,
    ("ddim", 25): 40.0,
    ("ddim", 50): 35.0,
    ("ddim", 100): 34.0,
    ("euler", 10): 50.0,
    ("euler", 25): 38.0,
    ("euler", 50): 33.0,
    ("euler", 100): 32.5,
}


def _params(
    scheduler="ddim", steps=25, guidance=7.5, path=f"{ZOO}/shapes_sd", model="shapes_sd", n=256, modes=("metrics",)
):
    cls = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}[scheduler]
    blocks = {f"mode.{m}": "None" for m in ("metrics", "schedule") if m not in modes}
    if "metrics" in modes:
        blocks.update({"mode.metrics.num_samples": str(n), "mode.metrics.kid_subsets": "100"})
    if "schedule" in modes:
        blocks.update({"mode.schedule.strict": "True"})
    return {
        "choice.scheduler": scheduler,
        "choice.model": model,
        "choice.mode": str(list(modes)),
        "choice.hydra/launcher": "basic",
        "scheduler.name": scheduler,
        "scheduler.cls": cls,
        "sampler.num_inference_steps": str(steps),
        "sampler.guidance_scale": str(guidance),
        "model.path": path,
        "model.name": model,
        "seed": "0",
        "paths.outputs": "/somewhere/else",
        **blocks,
    }


def _run(
    client, exp, name, parent=None, params=None, metrics=None, status="FINISHED", error=None, role=None, primary=None
):
    tags = {"mlflow.parentRunId": parent} if parent else {}
    if role:
        tags["sweep.role"] = role
    run_id = client.create_run(exp, run_name=name, tags=tags).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, 0) for k, v in (metrics or {}).items()],
        params=[Param(k, v) for k, v in (params or {}).items()],
        tags=([RunTag("error", error)] if error else [])
        + ([RunTag(PRIMARY_EXTRACTOR_TAG, primary)] if primary else []),
    )
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def store(outputs):
    """Three sweeps, each in its own experiment: schedulers x steps (+ one failed job), guidance, checkpoints.
    In the session's store (migrating a fresh SQLite store costs seconds), under experiment names of their own.
    The scheduler sweep ran features=[shapes_net, inception] (tagged: shapes_net is primary, so it ranks by
    metrics/fd_shapes_net, not by Inception's metrics/fid); the others are untagged with one extractor."""
    root = outputs
    uri = sqlite_uri(root)
    client = MlflowClient(uri)
    ids = {}
    for name in ("sched", "guid", "ckpt", "mixed"):
        exp = client.create_experiment(
            f"compare-{name}", artifact_location=(root / "mlartifacts" / f"compare-{name}").as_uri()
        )
        ids[name] = _run(client, exp, f"sweep {name}", role="parent")
        if name == "sched":
            for (sch, steps), fid in SCHED_FID.items():
                _run(
                    client,
                    exp,
                    f"{sch}-{steps}",
                    ids[name],
                    _params(sch, steps),
                    {
                        "metrics/fd_shapes_net": fid,
                        "metrics/kid_mean_shapes_net": fid / 1000,
                        "metrics/sec_per_image": steps * (0.011 if sch == "euler" else 0.01),
                        "metrics/fd_inception": 100 - fid,
                        "metrics/fid": 100 - fid,
                        "metrics/kid_mean_inception": 0.5,
                    },
                    primary="shapes_net",
                )
            _run(
                client,
                exp,
                "euler-200",
                ids[name],
                _params("euler", 200),
                status="FAILED",
                error="RuntimeError: CUDA out of memory",
                primary="shapes_net",
            )
        elif name == "guid":
            for g, acc in [(1.0, 0.3), (3.0, 0.7), (5.0, 0.85), (7.5, 0.9)]:
                _run(
                    client,
                    exp,
                    f"g{g}",
                    ids[name],
                    _params(guidance=g),
                    {"metrics/fd_shapes_net": 30 + 2 * g, "metrics/prompt_accuracy": acc, "metrics/sec_per_image": 0.2},
                )
        elif name == "mixed":  # an experiment, not a sweep: other mode choices, N = 256 and 32, a rerun, an old run
            for run_name, params, fid, sec in [
                ("ddim25", _params(), 65.0, 0.10),
                ("ddim25-again", _params(), 65.4, 0.14),  # differ only in timing
                ("ddim10", _params(steps=10), 80.0, 0.04),
                ("ddim25-n32", _params(n=32, modes=("schedule", "metrics")), 650.0, 0.11),
                ("ddim10-n32", _params(steps=10, n=32, modes=("schedule", "metrics")), 700.0, 0.05),
            ]:
                params = {**params, "sampler.eta": "0.0"}
                _run(
                    client,
                    exp,
                    run_name,
                    None,
                    params,
                    {"metrics/fd_inception": fid, "metrics/fid": fid, "metrics/sec_per_image": sec},
                )
            old = {k: v for k, v in _params(modes=("schedule",)).items()}  # no metrics block, no sampler.eta
            _run(client, exp, "schedule-old", None, old, {"schedule/log_snr_max": 7.0})
        else:
            for ckpt, fid, acc in [
                ("shapes_sd", 20.0, 0.9),
                ("shapes_sd_ckpt/step_00750", 35.0, 0.6),
                ("shapes_sd_ckpt/step_00250", 70.0, 0.2),
            ]:
                _run(
                    client,
                    exp,
                    ckpt.split("/")[-1],
                    ids[name],
                    _params(path=f"{ZOO}/{ckpt}"),
                    {"metrics/fd_shapes_net": fid, "metrics/prompt_accuracy": acc},
                )
    return SimpleNamespace(uri=uri, client=client, ids=ids, root=root)


def _children(store, name):
    return store.client.search_runs(
        [store.client.get_run(store.ids[name]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{store.ids[name]}'",
    )


def test_rows_have_every_child_what_was_swept_and_the_failed_one(store):
    rows = child_rows(_children(store, "sched"))
    assert len(rows) == 9
    failed = [r for r in rows if r["status"] == "FAILED"]
    assert len(failed) == 1 and failed[0]["run_name"] == "euler-200" and "out of memory" in failed[0]["error"]
    assert {"sampler.num_inference_steps", "scheduler.cls", "choice.scheduler"} <= set(rows[0])
    assert "sampler.guidance_scale" not in rows[0] and "seed" not in rows[0]  # constant: not in the table
    assert "choice.hydra/launcher" not in rows[0]
    assert swept(rows) == ["choice.scheduler", "sampler.num_inference_steps"]  # scheduler.cls is implied
    assert rows[0]["sampler.num_inference_steps"] in (10, 25, 50, 100, 200)  # numbers, so they sort as numbers


def test_sorting_by_a_metric_puts_failed_runs_last(store):
    rows = child_rows(_children(store, "sched"))
    by_fd = C.sort_rows(rows, "metrics/fd_shapes_net")
    assert [r["metrics/fd_shapes_net"] for r in by_fd[:-1]] == sorted(SCHED_FID.values())
    assert by_fd[-1]["status"] == "FAILED"
    assert C.default_sort(rows) == "metrics/fd_shapes_net"  # the tagged primary, not Inception's metrics/fid
    assert C.main_metrics(rows)[:3] == ["metrics/fd_shapes_net", "metrics/sec_per_image", "metrics/prompt_accuracy"]
    assert "metrics/kid_mean_shapes_net" in C.table_columns(rows) and "metrics/fid" not in C.table_columns(rows)
    desc = C.sort_rows(rows, "metrics/sec_per_image", desc=True)
    assert desc[0]["run_name"] == "euler-100" and desc[-1]["status"] == "FAILED"
    assert [r["run_name"] for r in C.sort_rows(rows, None)] == [r["run_name"] for r in rows]


@pytest.mark.parametrize(
    "sweep,kinds", [("sched", ["sweep_frontier"]), ("guid", ["sweep_guidance"]), ("ckpt", ["sweep_checkpoints"])]
)
def test_each_sweep_gets_the_plots_that_fit_it(store, sweep, kinds):
    rows = child_rows(_children(store, sweep))
    assert plot_kinds(rows) == kinds


def test_plots_content(store):
    figs = plots(child_rows(_children(store, "sched")))
    ax = figs["sweep_frontier"].axes[0]
    assert sorted(line.get_label() for line in ax.get_lines()) == ["ddim", "euler"]  # failed euler-200 left out
    assert "N = 256" in ax.get_title()  # N on every plot
    ddim = next(line for line in ax.get_lines() if line.get_label() == "ddim")
    assert list(ddim.get_ydata()) == [60.0, 40.0, 35.0, 34.0]  # in step order
    assert sorted(t.get_text() for t in ax.texts) == sorted(["10", "25", "50", "100"] * 2)  # steps annotated
    ckpt = plots(child_rows(_children(store, "ckpt")))["sweep_checkpoints"]
    assert [t.get_text() for t in ckpt.axes[0].get_xticklabels()] == ["step_00250", "step_00750", "shapes_sd"]
    assert list(ckpt.axes[0].get_lines()[0].get_ydata()) == [70.0, 35.0, 20.0]
    assert "N = 256" in ckpt._suptitle.get_text()
    guid = plots(child_rows(_children(store, "guid")))["sweep_guidance"]
    assert [a.get_ylabel().split(" (")[0] for a in guid.axes] == ["prompt accuracy", "FD shapes_net"]
    assert list(guid.axes[0].get_lines()[0].get_xdata()) == [1.0, 3.0, 5.0, 7.5]
    assert "N = 256" in guid._suptitle.get_text()


def test_parent_run_receives_table_and_plots(store, tmp_path):
    parent = store.ids["sched"]
    tracker = SimpleNamespace(
        log_artifact=lambda path, artifact_path=None: store.client.log_artifact(parent, str(path), artifact_path)
    )
    summarise(tracker, _children(store, "sched"), tmp_path)
    assert {a.path for a in store.client.list_artifacts(parent, "tables")} == {"tables/sweep_summary.csv"}
    assert {a.path for a in store.client.list_artifacts(parent, "plots")} == {"plots/sweep_frontier.png"}
    with (tmp_path / "sweep_summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 9 and [r["status"] for r in table].count("FAILED") == 1
    assert {r[PRIMARY_EXTRACTOR_TAG] for r in table} == {"shapes_net"}  # the tag is a column of every row
    assert (tmp_path / "sweep_frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_main_by_experiment_name_in_process(store, tmp_path, capsys):
    assert (
        C.main(
            [
                "compare-ckpt",
                "--tracking-uri",
                store.uri,
                "--out",
                str(tmp_path),
                "--sort",
                "metrics/prompt_accuracy",
                "--desc",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(
        "experiment compare-ckpt: 3 runs, 0 failed, sorted by metrics/prompt_accuracy (descending)"
    )
    body = lines[4:7]
    assert [l.split()[0] for l in body] == ["shapes_sd", "step_00750", "step_00250"]
    assert "sweep ckpt" not in out  # the parent is not a row
    assert (tmp_path / "sweep_summary.csv").is_file() and (tmp_path / "sweep_checkpoints.png").is_file()
    assert f"plot:  {tmp_path / 'sweep_checkpoints.png'}" in out


def test_main_by_parent_id_default_out_and_bad_sort(store, tmp_path, capsys):
    parent = store.ids["guid"]
    assert C.main([parent, "--outputs", str(store.root)]) == 0  # default store and out dir from --outputs
    out = capsys.readouterr().out
    assert out.startswith(f"sweep guid ({parent}): 4 runs") and "sorted by metrics/fd_shapes_net" in out
    assert (store.root / "compare" / parent / "sweep_guidance.png").is_file()
    assert C.main([parent, "--tracking-uri", store.uri, "--out", str(tmp_path), "--sort", "metrics/nope"]) == 2
    assert "metrics/nope" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,expected",
    [
        (["no-such-thing"], "'no-such-thing' is neither a run id nor an experiment name"),
        (["0123456789abcdef0123456789abcdef"], "'0123456789abcdef0123456789abcdef' is neither a run id"),
        (["--experiment", "nope"], "experiment 'nope' not found"),
        (["compare-guid", "--experiment", "compare-guid"], "'compare-guid' is not a run id"),
    ],
)
def test_bad_target_is_one_line_and_exit_2(store, tmp_path, capsys, args, expected):
    assert C.main([*args, "--tracking-uri", store.uri, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1


def test_child_run_id_is_not_a_sweep(store, tmp_path, capsys):
    child = _children(store, "guid")[0].info.run_id
    assert C.main([child, "--tracking-uri", store.uri, "--out", str(tmp_path)]) == 2
    assert "has no child runs" in capsys.readouterr().err


def test_missing_store_is_an_error_not_a_new_db(tmp_path, capsys):
    assert C.main(["x", "--outputs", str(tmp_path)]) == 2
    assert "no MLflow store" in capsys.readouterr().err and not (tmp_path / "mlflow.db").exists()


def test_cli_subprocess_by_parent_id(store, tmp_path):
    proc = run_cli(
        [store.ids["sched"], "--tracking-uri", store.uri, "--out", str(tmp_path)],
        store.root,
        module="pipeline.record.compare",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "9 runs, 1 failed, sorted by metrics/fd_shapes_net" in lines[0]
    rows = lines[4:13]
    assert rows[0].split()[0] == "euler-100" and rows[-1].split()[0] == "euler-200" and "FAILED" in rows[-1]
    assert "CUDA out of memory" in rows[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep_frontier.png", "sweep_summary.csv"]
    assert "Traceback" not in proc.stderr


def _experiment_rows(store):
    exp = store.client.get_experiment_by_name("compare-mixed").experiment_id
    return child_rows([r for r in store.client.search_runs([exp]) if r.data.tags.get("sweep.role") != "parent"])


def test_every_varying_param_is_shown_across_mode_choices(store):
    """N differs with the mode choice and is still a column; a param a run lacks is a value (shown empty); a mode's
    params do not count as missing where the run did not select that mode."""
    rows = _experiment_rows(store)
    assert swept(rows) == ["choice.mode", "mode.metrics.num_samples", "sampler.eta", "sampler.num_inference_steps"]
    old = next(r for r in rows if r["run_name"] == "schedule-old")
    assert old["sampler.eta"] is None and "mode.metrics.num_samples" not in old
    assert C._cell("sampler.eta", old["sampler.eta"]) == "-"
    assert "mode.schedule.strict" not in C.table_columns(rows) and "mode.metrics" not in C.table_columns(rows)


def test_mixed_n_is_warned_stated_on_the_plot_and_never_one_line(store, tmp_path, capsys):
    assert C.main(["compare-mixed", "--tracking-uri", store.uri, "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "mode.metrics.num_samples" in captured.out.splitlines()[2]  # a column of the printed table
    for text in (captured.err, captured.out):
        assert "warning: FD/FID/KID of these runs come from different sample counts N = 32, 256" in text
    ax = plots(_experiment_rows(store))["sweep_frontier"].axes[0]
    assert "N = 32, 256" in ax.get_title()
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert sorted(lines) == ["mode=['metrics'], N=256", "mode=['schedule', 'metrics'], N=32"]


def test_runs_that_differ_only_in_timing_are_one_point(store):
    ax = plots(_experiment_rows(store))["sweep_frontier"].axes[0]
    line = next(l for l in ax.get_lines() if l.get_label().endswith("N=256"))
    assert list(line.get_xdata()) == pytest.approx([0.04, 0.12]) and list(line.get_ydata()) == pytest.approx(
        [80.0, 65.2]
    )
    assert sorted(t.get_text() for t in ax.texts) == ["10", "10", "25", "25 ×2"]
    assert C.mixed_n_warning(child_rows(_children(store, "sched"))) is None  # one N: no warning


def test_reproduce_shows_timing_and_setup_apart_and_compares_the_rest():
    from pipeline.run.reproduce import compare, kind

    assert [
        kind(k) for k in ("metrics/sec_per_image", "metrics/generation_seconds", "metrics/num_shards", "metrics/fid")
    ] == ["TIMING", "TIMING", "SETUP", "RESULT"]
    ok, lines = compare(
        {"metrics/fid": 1.0, "metrics/num_shards": 2, "metrics/sec_per_image": 0.1},
        {"metrics/fid": 1.0, "metrics/num_shards": 1, "metrics/sec_per_image": 0.3},
        0.0,
    )
    assert ok and [l.split()[0] for l in lines] == ["MATCH", "SETUP", "TIMING"]


def test_which_run_wins_says_separable_tie_or_no_interval():
    from pipeline.record.ranking import winner_lines, winners

    rows = [
        {
            "run_name": "a",
            "status": "FINISHED",
            "metrics/fd_clip": 10.0,
            "metrics/fd_clip_ci_low": 9.0,
            "metrics/fd_clip_ci_high": 11.0,
            "metrics/precision_clip": 0.50,
            "metrics/precision_clip_ci_low": 0.45,
            "metrics/precision_clip_ci_high": 0.55,
            "metrics/recall_clip": 0.3,
            "metrics/sec_per_image": 1.0,
        },
        {
            "run_name": "b",
            "status": "FINISHED",
            "metrics/fd_clip": 13.0,
            "metrics/fd_clip_ci_low": 12.0,
            "metrics/fd_clip_ci_high": 14.0,
            "metrics/precision_clip": 0.52,
            "metrics/precision_clip_ci_low": 0.47,
            "metrics/precision_clip_ci_high": 0.57,
            "metrics/recall_clip": 0.4,
            "metrics/sec_per_image": 0.5,
        },
        {"run_name": "c", "status": "FAILED", "metrics/fd_clip": 1.0},
    ]
    got = {w["metric"]: (w["best"], w["runner_up"], w["verdict"]) for w in winners(rows)}
    assert got == {
        "metrics/fd_clip": ("a", "b", "separable"),
        "metrics/precision_clip": ("b", "a", "tie"),
        "metrics/recall_clip": ("b", "a", "no interval"),
    }  # failed runs, timings and bounds never rank
    assert any("separable" in line and "fd_clip" in line for line in winner_lines(rows))
