"""Quality-versus-cost frontiers of a sweep (issue 28): the Pareto front, the sentence naming the cheapest config
within the best's 95 % interval (and its no-interval, tie and mixed-N cases), timings never ranked, the schedule
runs' visited steps stacked per child from an untrusted artifact, and the sweep report's section. Runs are
fabricated as MLflow-like objects (no job runs, no store), so this is fast."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.core import metric_keys as K
from pipeline.record import sweep_summary as S
from pipeline.record.report import write_sweep_report

FD = "metrics/fd_shapes_net"
PSNR = K.TRAJECTORY_PSNR


def _run(i, name, scheduler, steps, metrics, params=None, tags=None, status="FINISHED"):
    """A finished child run as ``search_runs`` returns it: params are strings."""
    return SimpleNamespace(
        info=SimpleNamespace(run_id=f"r{i}", run_name=name, status=status, start_time=i),
        data=SimpleNamespace(
            params={
                "choice.scheduler": scheduler,
                "sampler.num_inference_steps": str(steps),
                "mode.metrics.num_samples": "64",
                **(params or {}),
            },
            metrics=metrics,
            tags=tags or {},
        ),
    )


def _fd(value, low=None, high=None, nfe=None, sec=None, **more):
    out = {FD: value, **more}
    if low is not None:
        out.update({FD + "_ci_low": low, FD + "_ci_high": high})
    if nfe is not None:
        out[K.COST_NFE] = nfe
    if sec is not None:
        out[K.SEC_PER_IMAGE] = sec
    return out


def _solver_sweep():
    """heun × 50 is best; dpmpp_2m × 12, karras lies inside its interval at NFE 12; euler × 10 is outside; ddim × 50
    ran twice (one config, two timings); one failed job."""
    karras = {"sampler.sigmas": "karras"}
    default = {"sampler.sigmas": "default"}
    common = {"metrics/sec_per_image": 0.5, "metrics/num_samples": 64, "metrics/fd_floor_shapes_net": 1.0}
    return [
        _run(0, "heun50", "heun", 50, {**common, **_fd(33.0, 31.5, 34.6, nfe=99)}, default),
        _run(1, "dpm12", "dpmpp_2m", 12, {**common, **_fd(34.1, 32.0, 36.0, nfe=12)}, karras),
        _run(2, "euler10", "euler", 10, {**common, **_fd(40.0, 38.0, 42.0, nfe=10)}, default),
        _run(3, "ddim50", "ddim", 50, {**common, **_fd(36.0, 34.0, 38.0, nfe=50, sec=0.40)}, default),
        _run(4, "ddim50-again", "ddim", 50, {**common, **_fd(36.0, 34.0, 38.0, nfe=50, sec=0.44)}, default),
        _run(5, "unipc5", "unipc", 5, {}, default, status="FAILED"),
    ]


def test_pareto_front_of_a_hand_made_set():
    pts = [(10, 5.0), (20, 3.0), (20, 4.0), (40, 3.0), (5, 9.0), (60, 1.0)]
    assert S.pareto_front(pts, higher=False) == [4, 0, 1, 5]  # (20, 4) and (40, 3) are dominated
    assert S.pareto_front([(c, -v) for c, v in pts], higher=True) == [4, 0, 1, 5]
    assert S.pareto_front([(1, 2.0), (1, 2.0)], higher=False) == [0, 1]  # equal points both stay

    rows = S.child_rows(_solver_sweep())
    configs = {c.label: c for c in S.frontier_configs(rows, FD)}
    assert sorted(configs) == [
        "ddim × 50, default",
        "dpmpp_2m × 12, karras",
        "euler × 10, default",
        "heun × 50, default",
    ]  # the failed job is no config; the rerun of ddim × 50 is one, at its mean time
    assert configs["ddim × 50, default"].runs == 2 and configs["ddim × 50, default"].seconds == pytest.approx(0.42)
    fig = S.frontier_metric_plot(rows, FD)
    ax_nfe = fig.axes[0]
    assert ax_nfe.get_xlabel() == S.NFE_LABEL and "lower is better" in ax_nfe.get_ylabel()
    (front,) = [line for line in ax_nfe.get_lines() if line.get_label() == "Pareto front"]
    assert list(front.get_xdata()) == [10, 12, 99] and list(front.get_ydata()) == [40.0, 34.1, 33.0]
    assert {t.get_text() for t in ax_nfe.texts} >= {"dpmpp_2m × 12, karras", "ddim × 50, default ×2"}


def test_the_cheapest_config_within_the_best_interval_is_named():
    rows = S.child_rows(_solver_sweep())
    (found,) = S.frontier_findings(rows)  # fd_floor, counts and timings are no quality metrics
    assert found["verdict"] == "cheaper" and found["best"].label == "heun × 50, default"
    assert found["text"] == (
        "metrics/fd_shapes_net: dpmpp_2m × 12, karras (34.1) is within the 95 % interval of the best, "
        "heun × 50, default (33 [31.5, 34.6]), at 0.12× its cost (NFE 12 vs 99)"
    )
    # a trajectory error, higher is better, where the best is also the cheapest in its interval
    runs = [
        _run(i, f"s{i}", "euler", n, {PSNR: p, PSNR + "_ci_low": p - 1, PSNR + "_ci_high": p + 1, K.COST_NFE: n})
        for i, (n, p) in enumerate([(10, 20.0), (20, 31.0), (40, 30.5)])
    ]
    (found,) = S.frontier_findings(S.child_rows(runs))
    assert found["verdict"] == "best is cheapest" and found["best"].label == "euler × 20"  # 30.5 ∈ [30, 32]
    assert "1 other config(s) lie within it" in found["text"]


def test_no_interval_tie_mixed_n_and_timings_are_never_ranked():
    runs = [
        _run(0, "a", "euler", 10, {"metrics/precision_shapes_net": 0.5, "metrics/recall_shapes_net": 0.3}),
        _run(1, "b", "euler", 20, {"metrics/precision_shapes_net": 0.6, "metrics/recall_shapes_net": 0.3}),
    ]
    for r, sec in zip(runs, (0.1, 0.9)):
        r.data.metrics.update({K.SEC_PER_IMAGE: sec, "metrics/generation_seconds": sec * 9, K.COST_NFE: 5.0})
        r.data.metrics.update({"metrics/kid_std_shapes_net": sec, "schedule/curvature_max": sec})
    found = {f["metric"]: f for f in S.frontier_findings(S.child_rows(runs))}
    assert set(found) == {"metrics/precision_shapes_net", "metrics/recall_shapes_net"}  # timings never ranked
    assert found["metrics/precision_shapes_net"]["text"] == (
        "metrics/precision_shapes_net: best euler × 20 (0.6); no interval: cannot say which configs are equivalent"
    )
    assert found["metrics/recall_shapes_net"]["verdict"] == "tie"
    assert "tie: all 2 configs give 0.3" in found["metrics/recall_shapes_net"]["text"]
    assert not S.frontier_metrics(S.child_rows(runs))  # one NFE for all: no frontier plot, whatever the seconds

    mixed = _solver_sweep()[:2]
    mixed[1].data.params["mode.metrics.num_samples"] = "256"
    (found,) = S.frontier_findings(S.child_rows(mixed))
    assert found["verdict"] == "mixed N" and "N = 64, 256" in found["text"]


def test_frontier_plots_have_safe_names_and_survive_hostile_labels(tmp_path):
    hostile = "metrics/fd_../$x$ <b>"
    runs = [
        _run(i, f"r{i}", s, n, {hostile: v, K.COST_NFE: n, K.SEC_PER_IMAGE: n / 100, FD: v + 1})
        for i, (s, n, v) in enumerate([("$\\frac{a}{$", 5, 9.0), ("_x", 10, 7.0), ("=cmd", 20, 6.0)])
    ]
    rows = S.child_rows(runs)
    names = S.frontier_metrics(rows)
    assert names == {"sweep_frontier_fd_.._x_b": hostile, "sweep_frontier_fd_shapes_net": FD}
    table, pngs = S.write_summary(rows, tmp_path)
    assert {p.name for p in pngs} == {"sweep_frontier.png", "sweep_frontiers.png"}  # the old plot stays
    assert len(S.frontiers_plot(rows).axes) == 2 * len(names)  # a row per metric: NFE, seconds
    assert all(p.parent == tmp_path and p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert not S.frontier_metrics(
        S.child_rows([_run(0, "a", "ddim", 5, _fd(3.0, sec=0.1)), _run(1, "b", "ddim", 9, _fd(2.0, sec=0.2))])
    )


def _visited_csv(path: Path, rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([list(S.VISITED_COLUMNS), *rows])
    return path


def test_visited_steps_are_stacked_per_child_and_bad_rows_skipped(tmp_path, caplog):
    local = tmp_path / "run_a"
    _visited_csv(
        local / S.VISITED_ARTIFACT,
        [
            ["'=euler × 3", "euler", "karras", "trailing", 3, 0, 999, "inf", "-inf"],  # zero-terminal SNR: kept
            ["'=euler × 3", "euler", "karras", "trailing", 3, 1, "50x", 1.0, 0.0],  # malformed: skipped
            ["'=euler × 3", "euler", "karras", "trailing", 3, 2, 0, 0.0, "inf"],  # σ = 0: log-SNR +inf is kept
        ],
    )
    remote = _visited_csv(
        tmp_path / "store" / S.VISITED_ARTIFACT,
        [
            ["", "ddim", "default", "leading", 2, i, t, s, l]
            for i, (t, s, l) in enumerate([(981, 9.0, -4.4), (1, 0.1, 4.6)])
        ],
    )
    fetched = []

    def download_artifacts(run_id, path, dst_path):
        fetched.append((run_id, path))
        return shutil.copy(remote, Path(dst_path) / "visited_steps.csv")

    def list_artifacts(run_id, path):
        return [SimpleNamespace(path=S.VISITED_ARTIFACT)] if run_id == "r1" else []

    sched = {"schedule/log_snr_max": 7.0, K.TRAJECTORY_RMSE: 0.1, K.COST_NFE: 3.0}
    children = [
        _run(0, "sched·<a>", "euler", 3, sched, tags={"run_dir": str(local)}),
        _run(1, "sched·b", "ddim", 2, {**sched, K.TRAJECTORY_RMSE: 0.2, K.COST_NFE: 2.0}),
        _run(2, "metrics·c", "ddim", 5, _fd(3.0)),  # not a schedule run: never fetched
        _run(3, "sched·d", "ddim", 4, sched),  # a schedule run without the table: listed, not fetched
    ]
    logged = []
    tracker = SimpleNamespace(
        client=SimpleNamespace(download_artifacts=download_artifacts, list_artifacts=list_artifacts),
        log_artifact=lambda path, artifact_path=None: logged.append((Path(path).name, artifact_path)),
    )
    with caplog.at_level(logging.WARNING, logger=S.__name__):
        text = S.summarise(tracker, children, tmp_path / "sweep")
    warnings = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 1 malformed row" in warnings[0] and "line 3" in warnings[0]
    assert fetched == [("r1", S.VISITED_ARTIFACT)]  # the local run dir is read in place
    assert ("sweep_visited_steps.csv", "tables") in logged and ("sweep_visited.png", "plots") in logged
    assert ("sweep_frontiers.md", None) in logged and "sweep_visited.png" in text
    with (tmp_path / "sweep" / S.VISITED_TABLE).open() as f:
        stacked = list(csv.DictReader(f))
    assert [(r["run_name"], r["step"]) for r in stacked] == [
        ("sched·<a>", "0"),
        ("sched·<a>", "2"),
        ("sched·b", "0"),
        ("sched·b", "1"),
    ]
    assert stacked[0]["config"] == "'=euler × 3" and stacked[1]["log_snr"] == "inf"  # neutralised again
    fig = S.visited_plot(S.visited_tables(children, tracker.client, tmp_path / "dl"))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["sched·<a>", "sched·b"]
    ends = [t.get_text() for t in ax.texts]
    assert [len(c.get_offsets()) for c in ax.collections] == [0, 2] and ends == ["−∞ ×1, +∞ ×1"]
    md = (tmp_path / "sweep" / S.FRONTIERS_NAME).read_text()
    assert (
        "schedule/trajectory_rmse: best ddim × 2 (0.1)" not in md
        and "schedule/trajectory_rmse: best euler × 3 (0.1)" in md
    )


def test_sweep_report_has_the_frontier_section_escaped(tmp_path):
    children = _solver_sweep()
    children[1].data.params["sampler.sigmas"] = "<b>karras</b>"
    (tmp_path / "sweep").mkdir()
    html = write_sweep_report(tmp_path / "sweep", None, children).read_text()
    section = html.split('id="frontiers"')[1].split("</section>")[0]
    assert "Quality versus cost" in section and "dpmpp_2m × 12, &lt;b&gt;karras&lt;/b&gt; (34.1)" in section
    assert "<b>karras" not in html and "at 0.12× its cost (NFE 12 vs 99)" in section
