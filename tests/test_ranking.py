"""One ranking rule for sweep summaries, compare and report.html (issue 29): only quality metrics with a registered
direction are ranked (never timings, ``cost/*``, counts or ``fd_floor``), a key equal across the finished jobs is
not ranked, a best equal to the runner-up is a tie that names every tied run, and preference scores rank higher is
better. The frontier takes any cost axis the configs differ in (FLOPs, seconds, energy, memory) beside NFE. Rows
and runs are built in memory (no job runs, no store)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.core import metric_keys as K
from pipeline.record import compare as C
from pipeline.record import ranking as R
from pipeline.record import sweep_summary as S
from pipeline.record.report import write_sweep_report

FD = "metrics/fd_clip"
PICK = K.preference_key("pickscore")
HPS = K.preference_key("hpsv2")


def _run(i, name, metrics, params=None, status="FINISHED"):
    """A child run as ``search_runs`` returns it (params are strings)."""
    return SimpleNamespace(
        info=SimpleNamespace(run_id=f"r{i}", run_name=name, status=status, start_time=i),
        data=SimpleNamespace(
            params={"choice.scheduler": "ddim", "mode.metrics.num_samples": "64", **(params or {})},
            metrics=metrics,
            tags={},
        ),
    )


def _ci(key, value, half):
    return {key: value, key + "_ci_low": value - half, key + "_ci_high": value + half}


def _not_quality(i):
    """Keys that differ between every pair of runs and must never rank: timings, costs, counts, fd_floor."""
    return {
        "metrics/fd_floor_clip": 1.0 + i,
        K.SEC_PER_IMAGE: 0.1 * (i + 1),
        "metrics/generation_seconds": 2.0 + i,
        K.COST_SEC_PER_IMAGE: 0.2 * (i + 1),
        K.COST_FLOPS: 1e9 * (i + 1),
        K.COST_NFE: 10.0 * (i + 1),
        K.COST_ENERGY: 3.0 + i,
        K.COST_PEAK_RSS: 900.0 + i,
        "metrics/num_samples": 64 + i,
        "metrics/kid_std_clip": 0.01 * (i + 1),
        "progress/samples_done": 5.0 + i,
    }


def _sweep():
    """a: best FD (separable from b); a and b tie on recall at 0.5; prompt accuracy 1 everywhere; c has the best
    PickScore (intervals overlap b's) and the worst FD; d failed with the best of everything."""
    return [
        _run(0, "a", {**_not_quality(0), **_ci(FD, 10.0, 1.0), "metrics/recall_clip": 0.5, K.PROMPT_ACCURACY: 1.0,
                      **_ci(PICK, 20.0, 0.1)}),
        _run(1, "b", {**_not_quality(1), **_ci(FD, 14.0, 1.0), "metrics/recall_clip": 0.5, K.PROMPT_ACCURACY: 1.0,
                      **_ci(PICK, 21.0, 0.4)}),
        _run(2, "c", {**_not_quality(2), **_ci(FD, 20.0, 1.0), "metrics/recall_clip": 0.25, K.PROMPT_ACCURACY: 1.0,
                      **_ci(PICK, 21.5, 0.4)}),
        _run(3, "d", {FD: 1.0, "metrics/recall_clip": 0.9, PICK: 30.0, K.PROMPT_ACCURACY: 0.0}, status="FAILED"),
    ]  # fmt: skip


def test_only_quality_keys_rank_and_equal_values_are_a_tie():
    children = _sweep()
    rows = S.child_rows(children)
    got = {w["metric"]: (w["best_runs"], w["runner_up_runs"], w["verdict"]) for w in R.winners(rows)}
    assert got == {
        FD: (["a"], ["b"], "separable"),  # [9, 11] vs [13, 15]
        "metrics/recall_clip": (["a", "b"], ["c"], "equal values"),  # a tie at the top, without intervals too
        PICK: (["c"], ["b"], "tie"),  # higher is better; [21.1, 21.9] overlaps [20.6, 21.4]
    }  # fd_floor, seconds, cost/*, counts, spreads, progress and the failed run's values never rank
    lines = R.winner_lines(rows)
    assert "  metrics/recall_clip: best a, b (0.5), runner-up c (0.25) — tie: equal values" in lines
    assert lines[-1] == "  equal across jobs, not ranked: metrics/prompt_accuracy (1)"  # said once, not ranked
    assert not any(k in line for line in lines for k in ("fd_floor", "sec_per_image", "cost/", "seconds"))

    best = R.best_runs(children)  # the sweep parent's best.<key> and best.<key>.run_id: the same rule
    assert best == {FD: (10.0, "r0"), "metrics/recall_clip": (0.5, "r0,r1"), PICK: (21.5, "r2")}
    names = {c.info.run_id: c.info.run_name for c in children}
    assert R.best_label(best["metrics/recall_clip"][1], names) == "tie: a, b"
    assert R.best_runs(children[:1]) == {}  # one job: nothing to rank


def test_values_equal_to_nine_digits_are_one_value_and_one_run_is_no_ranking():
    rows = [
        {"run_name": n, "status": "FINISHED", "metrics/precision_clip": v}
        for n, v in (("a", 0.6), ("b", 0.6 * (1 + 1e-12)), ("c", 0.6))
    ]
    assert R.rank(rows, "metrics/precision_clip") is None and R.equal_keys(rows) == {"metrics/precision_clip": 0.6}
    rows[2]["metrics/precision_clip"] = 0.7
    r = R.rank(rows, "metrics/precision_clip")
    assert [x["run_name"] for x in r.best] == ["c"] and [x["run_name"] for x in r.runner_up] == ["a", "b"]
    assert r.verdict == "no interval"
    assert R.rank(rows, "metrics/sec_per_image") is None and R.rank(rows[:1], "metrics/precision_clip") is None
    assert [R.is_ranked(k) for k in (HPS, "attention/miou", "metrics/fd_floor_clip", K.COST_FLOPS, "metrics/fid")] == [
        True,
        True,
        False,
        False,
        True,
    ]


def test_compare_and_the_sweep_report_show_preference_scores_and_rank_by_the_same_rule(tmp_path):
    children = _sweep()
    rows = S.child_rows(children)
    assert PICK in C.table_columns(rows)  # printed like prompt accuracy
    html = write_sweep_report(tmp_path, None, children).read_text()
    best = html.split('id="best"')[1].split("</section>")[0]
    assert "<code>metrics/recall_clip</code>" in best and "tie: a, b" in best and "tie: equal values" in best
    assert "<code>metrics/pickscore</code>" in best and "higher" in best
    assert "equal across the finished jobs, not ranked: metrics/prompt_accuracy (1)" in best
    assert not any(k in best for k in ("fd_floor", "sec_per_image", "cost/", "num_samples"))
    runs = html.split('id="runs"')[1].split("</section>")[0]
    assert "<th>metrics/pickscore</th>" in runs
    assert runs.count('class="num best"') == 2  # seconds, equal accuracy and the failed run's values are not marked
    assert '<td class="num best">10 [9, 11]</td>' in runs and '<td class="num best">21.5 [21.1, 21.9]</td>' in runs


def _config(i, path, steps, value, **costs):
    return _run(
        i,
        f"{path}×{steps}",
        {**_ci(FD, value, 0.5), **costs},
        {"model.path": f"/m/{path}", "sampler.num_inference_steps": str(steps)},
    )


def test_any_cost_axis_the_configs_differ_in_gets_a_panel_in_a_fixed_order():
    # a model-size sweep at one step count: NFE equal, FLOPs differ -> a frontier row, FLOPs and seconds panels
    runs = [
        _config(i, p, 20, v, **{K.COST_NFE: 20.0, K.COST_FLOPS: f, K.COST_SEC_PER_IMAGE: s, K.SEC_PER_IMAGE: s / 2})
        for i, (p, v, f, s) in enumerate([("small", 12.0, 1e11, 0.2), ("large", 9.0, 4e11, 0.7)])
    ]
    rows = S.child_rows(runs)
    assert S.frontier_metrics(rows) == {"sweep_frontier_fd_clip": FD}
    labels = [label for label, _ in S._cost_panels(rows, FD, S.frontier_configs(rows, FD))]
    assert labels == [S.COST_LABELS[K.COST_FLOPS], "seconds per image (cost/sec_per_image)"]  # cost/ preferred
    fig = S.frontiers_plot(rows)
    assert [ax.get_xlabel() for ax in fig.axes] == labels
    (found,) = S.frontier_findings(rows)
    assert found["verdict"] == "same cost" and "NFE 20" in found["text"]  # the sentence stays on NFE

    # every axis differs: NFE, FLOPs, seconds, energy, capped at four (the memory axes are left out)
    runs = [
        _config(i, "m", n, v, **{K.COST_NFE: n, K.COST_FLOPS: n * 1e10, K.COST_SEC_PER_IMAGE: n / 50,
                                 K.COST_ENERGY: n * 2.0, K.COST_PEAK_RSS: 900.0 + n, K.COST_CUDA_ALLOCATED: 10.0 + n})
        for i, (n, v) in enumerate([(10, 14.0), (20, 11.0), (50, 10.8)])
    ]  # fmt: skip
    rows = S.child_rows(runs)
    fig = S.frontier_metric_plot(rows, FD)
    assert [ax.get_xlabel() for ax in fig.axes] == [
        S.NFE_LABEL,
        S.COST_LABELS[K.COST_FLOPS],
        "seconds per image (cost/sec_per_image)",
        S.COST_LABELS[K.COST_ENERGY],
    ]
    energy = fig.axes[3]
    (front,) = [line for line in energy.get_lines() if line.get_label() == "Pareto front"]
    assert list(front.get_xdata()) == [20.0, 40.0, 100.0] and list(front.get_ydata()) == [14.0, 11.0, 10.8]
    (found,) = S.frontier_findings(rows)
    assert found["verdict"] == "cheaper" and "(NFE 20 vs 50)" in found["text"]


def test_measured_costs_alone_or_equal_values_make_no_frontier_row():
    runs = [
        _config(i, "m", 20, v, **{K.COST_NFE: 20.0, K.COST_SEC_PER_IMAGE: s, K.COST_ENERGY: e})
        for i, (v, s, e) in enumerate([(12.0, 0.2, 5.0), (9.0, 0.7, 9.0)])
    ]
    assert not S.frontier_metrics(S.child_rows(runs))  # seconds and energy differ between any two runs
    runs = [_config(i, "m", n, 10.0, **{K.COST_NFE: float(n)}) for i, n in enumerate([10, 20])]
    assert not S.frontier_metrics(S.child_rows(runs))  # one value for every config: a tie, nothing to draw
    (found,) = S.frontier_findings(S.child_rows(runs))
    assert found["verdict"] == "tie"


@pytest.mark.parametrize("n", [1, 3])
def test_join_run_ids_caps_a_long_tie(n):
    ids = [f"r{i}" for i in range(R.MAX_TIED_IDS + n)]
    text = R.join_run_ids(ids)
    assert text.split(R.TIE_SEPARATOR)[:2] == ["r0", "r1"] and text.endswith(f"… {n} more")
    assert R.best_label(text, {}).startswith("tie: r0, r1")
