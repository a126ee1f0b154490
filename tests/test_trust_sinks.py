"""User text is never markup (issue 24, item 5): captions, prompts, run names, file names and config strings reach
figures, CSV tables, HTML and the terminal as data. ``pipeline.core.escape`` is the one place that knows each sink."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.context import RunContext
from pipeline.core.escape import MPL_MAX_CHARS, csv_cell, csv_uncell, mpl_label, mpl_text, terminal_text

LONG = "a red circle on the left " * 80  # 2000 characters
HOSTILE = [
    r"$\frac{a}{$",  # mathtext that does not parse: savefig raised on it
    "$x$",
    "$$",
    "\\",
    "^_",
    "<script>alert(1)</script>",
    "=cmd|' /C calc'!A0",
    LONG,
    "\u202eRTL override مرحبا 😀 \x00\x07\x1b[31m\r\ttab",
]
FORMULAS = ['=HYPERLINK("http://x","y")', "+1+2", "-2+3+cmd|' /C calc'!A0", "@SUM(A1)", "\tx", "\rx", "'=x", "''-y"]


def _visible(s: str) -> str:
    """What a figure should show for user text ``s`` (cut like mpl_text; control characters as escapes)."""
    s = s if len(s) <= MPL_MAX_CHARS else s[: MPL_MAX_CHARS - 1] + "…"
    return "".join(ascii(c)[1:-1] if (ord(c) < 32 and c != "\n") or 127 <= ord(c) < 160 else c for c in s)


@pytest.mark.parametrize("text", HOSTILE + ["a\\$b", "\\\\$", "price $5 and $6"])
def test_mpl_text_is_never_mathtext_and_shows_the_text_as_written(text):
    from matplotlib.text import Text

    shown, math = Text()._preprocess_math(mpl_text(text))  # what matplotlib does with a string before drawing it
    assert math is False and shown == _visible(text)


def _save(ctx: RunContext, fig, name: str):
    path = ctx.save_figure(fig, name)
    width, height = Image.open(path).size
    assert width < 4000 and height < 4000, (name, width, height)  # a 2000-character caption is cut, not drawn


def test_every_figure_with_user_text_saves_with_hostile_captions(tmp_path):
    """Each plotting function that shows a caption, prompt or config string, fed hostile text in every such slot
    (the worst-prompts figure raised on ``$\\frac{a}{$`` before pipeline.core.escape)."""
    from pipeline.modes.attention.plots import overlay_figure, resolution_figure
    from pipeline.modes.latent.plots import direction_figure, interpolation_figure, ood_histogram, round_trip_figure
    from pipeline.modes.metrics.plots import sample_grid, worst_prompts_figure
    from pipeline.modes.schedule.plots import overlay_figure as schedule_overlay
    from pipeline.modes.schedule.plots import panel_figure
    from pipeline.modes.schedule.schedules import NoiseSchedule
    from pipeline.record import sweep_summary as S

    ctx = RunContext(None, tmp_path / "run")
    tile = torch.zeros(3, 8, 8, dtype=torch.uint8)
    _save(ctx, sample_grid([tile] * 9, HOSTILE, 3), "grid")
    _save(
        ctx, worst_prompts_figure([[tile, tile]] * len(HOSTILE), [f"{p[:60]}  (vendi 1.2)" for p in HOSTILE]), "worst"
    )

    image, maps = np.zeros((8, 8, 3), np.uint8), torch.rand(3, 8, 8)
    words = ["$x$", "^_", "\\"]
    _save(ctx, overlay_figure(image, words, {1: maps}, maps, HOSTILE[0], 0.4), "attn_overlay")
    _save(ctx, resolution_figure(image, words, {(8, 8): maps, (2, 2): maps}, LONG, 0.4), "attn_res")

    imgs = torch.rand(3, 3, 8, 8)
    _save(ctx, round_trip_figure([imgs, imgs], torch.tensor([30.0, 31.0, 32.0]), HOSTILE[0]), "rt")
    _save(ctx, interpolation_figure([imgs, imgs], ["$$", "=x"], torch.linspace(0, 1, 3), "interpolation: $$"), "interp")
    _save(ctx, direction_figure({0.0: imgs, 1.0: imgs}, ["$x$ on the ^_", "\\", LONG], 1, LONG), "direction")
    rng = torch.Generator().manual_seed(0)
    scores = {k: {"zscore": torch.randn(20, generator=rng)} for k in ("id", "ood", "noise")}
    _save(ctx, ood_histogram(scores, ["zscore"], r"$\frac{a}{$"), "ood")

    alphas = np.cumprod(1 - np.linspace(1e-4, 0.02, 50))
    sched = NoiseSchedule("model", alphas, "discrete")
    ts = np.array([40, 20, 0])
    _save(ctx, panel_figure(sched, f"model ({HOSTILE[0]}, DDIMScheduler, 3 steps)", ts), "panel")
    fig = schedule_overlay([("$$", sched, ts), ("_hidden", sched, ts), (LONG, sched, ts)])
    assert " _hidden" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    _save(ctx, fig, "sched_overlay")

    def row(i, **kw):
        return {
            "run_id": f"r{i}",
            "run_name": HOSTILE[i % len(HOSTILE)],
            "status": "FINISHED",
            "metrics/fd_shapes_net": 10.0 - i,
            "metrics/sec_per_image": 0.1 * (i + 1),
            "metrics/prompt_accuracy": 0.1 * i,
            "mode.metrics.num_samples": 8,
            **kw,
        }

    rows = [row(i, **{"choice.scheduler": ["$x$", "$$"][i % 2], S.STEPS: [5, 10][i // 2]}) for i in range(4)]
    rows += [
        row(4 + i, **{S.CHECKPOINT: f"/ck/{p}", S.GUIDANCE: float(i)})
        for i, p in enumerate([r"step_1 $\frac{a}{$", "step_2 $$", "_step_3"])
    ]
    sweep_plots = {**S.plots(rows[:4]), **S.plots(rows[4:])}
    assert set(sweep_plots) == {"sweep_frontier", "sweep_guidance", "sweep_checkpoints"}
    for name, fig in sweep_plots.items():
        _save(ctx, fig, name)
    assert mpl_label("_hidden") == " _hidden"  # a legend drops labels that start with "_"


def _read(path):
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_csv_tables_neutralise_formula_cells_and_keep_numbers(tmp_path):
    from pipeline.record.sweep_summary import write_table

    rows = [
        {"prompt": p, "value": v, "text_number": t}
        for p, v, t in zip(
            FORMULAS,
            [-0.5, 3, float("-inf"), np.float32(-2.5), None, True, 1e-9, -7],
            ["-0.5", "+1e-3", "-inf", "1.5", "-", "- 1", "-1-1", ""],
        )
    ]
    for path in (
        RunContext(None, tmp_path / "run").save_table(rows + [{"=evil header": 1}], "t"),
        write_table(rows + [{"=evil header": 1}], tmp_path / "sweep.csv"),
    ):
        header, *body = _read(path)
        assert header[-1] == "'=evil header"
        for got, want in zip(body, rows):
            assert got[0] == "'" + want["prompt"]  # formula starts, and quotes before them, get one more quote
            assert got[0] != want["prompt"] and csv_uncell(got[0]) == want["prompt"]
            v = want["value"]
            assert got[1] == ("" if v is None else str(v))  # numbers (and None, bools) as csv writes them
        assert [r[2] for r in body[: len(rows)]] == ["-0.5", "+1e-3", "-inf", "1.5", "'-", "'- 1", "'-1-1", ""]
        for r in body:  # nothing a spreadsheet would evaluate: each cell is a number or does not start a formula
            for cell in r:
                assert cell[:1] not in ("=", "+", "-", "@", "\t", "\r") or re.fullmatch(r"[+-][\d.e+-]+|-inf", cell)
    # csv_uncell undoes exactly what csv_cell did, whatever the text
    for text in FORMULAS + HOSTILE + ["'", "''", "'a", "-0.5", "", "x=1"]:
        cell = csv_cell(text)
        assert csv_uncell(cell) == text and (cell == text or cell == "'" + text)


def test_report_shows_neutralised_cells_as_written_and_escaped(tmp_path):
    from pipeline.record.report import write_run_report

    ctx = RunContext(None, tmp_path / "run")
    ctx.save_table([{"prompt": '=HYPERLINK("http://x","<b>y</b>")', "vendi": -1.5}], "metrics_per_prompt")
    text = write_run_report(tmp_path / "run", {"metrics/x": 1.0}, tags={}, params={}).read_text()
    assert "<td>=HYPERLINK(&quot;http://x&quot;,&quot;&lt;b&gt;y&lt;/b&gt;&quot;)</td>" in text and "<b>y" not in text
    assert ">-1.5<" in text


def test_compare_table_prints_no_control_characters():
    from pipeline.record.compare import format_table

    rows = [{"run_name": "ok\x1b[2J\x1b[31mred\rover", "run_id": "abc", "status": "FINISHED", "metrics/x": 1.0}]
    text = format_table(rows, ["run_name", "status", "metrics/x"])
    assert "\x1b" not in text and "\r" not in text and "\\x1b[2J" in text
    assert terminal_text("a\nb") == "a\\nb"


# The end-to-end run with hostile captions is a property test: tests/test_trust_properties.py
