"""report.html: one self-contained file per run and per sweep (scalars with intervals, provenance, images as data:
URIs, no external reference), written by every run and logged to MLflow; checkpoint sample grids on the sweep's
parent as a stepped MLflow image; rendering in headless Chromium where one is installed."""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import compose_cfg
from PIL import Image

from pipeline.record.report import (
    REPORT_NAME,
    SAMPLES_KEY,
    checkpoint_steps,
    log_checkpoint_samples,
    scalar_rows,
    write_run_report,
    write_sweep_report,
)

TAGS = {
    "git.commit": "0123456789abcdef0123456789abcdef01234567",
    "git.dirty": "false",
    "version.torch": "2.9.9",
    "version.diffusers": "0.99.0",
    "device": "cpu",
    "sampler.class": "DDIMScheduler",
    "model.family": "sd",
    "metrics.resize.shapes_net": "bilinear",
    "mlflow.runName": "metrics·shapes_sd·ddim×25·g7.5",
}
RESULTS = {
    "metrics/fd_shapes_net": 10.0,
    "metrics/fd_shapes_net_ci_low": 8.0,
    "metrics/fd_shapes_net_ci_high": 12.0,
    "metrics/kid_mean_shapes_net": 0.001,
    "metrics/kid_mean_shapes_net_ci_low": -0.002,
    "metrics/kid_mean_shapes_net_ci_high": 0.004,
    "metrics/prompt_accuracy": 0.75,
    "schedule/log_snr_max": 7.069,
}
CONFIG = """model:
  path: /models/shapes_sd
  dtype: float32
  device: cpu
scheduler:
  name: ddim
  cls: DDIMScheduler
  timestep_spacing: leading
sampler:
  num_inference_steps: 25
  guidance_scale: 7.5
  batch_size: 16
  eta: 0.0
features:
  shapes_net:
    name: shapes_net
    model: shapes_net
    resize: bilinear
dataset:
  name: shapes
  num_images: 64
seed: 3
mode:
  metrics:
    num_samples: 32
    batch_size: null
  schedule:
    compare: []
"""


def _png(path: Path, size=(64, 48), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def run_dir(tmp_path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    (d / "results.json").write_text(json.dumps(RESULTS))
    (d / "config_resolved.yaml").write_text(CONFIG)
    (d / "run_info.json").write_text(json.dumps({"run_id": "abc123", "choices": {"scheduler": "ddim"}}))
    _png(d / "plots" / "metrics_samples.png", (96, 96), 1)
    _png(d / "plots" / "schedule_model.png", (80, 60), 2)
    _csv(
        d / "tables" / "metrics_extractors.csv",
        [
            {
                "extractor": "shapes_net",
                "primary": True,
                "name": "shapes_net",
                "weights_id": "c74eb30b6019",
                "resize": "bilinear",
                "input_size": 32,
                "center_crop": False,
            }
        ],
    )
    _csv(
        d / "tables" / "metrics_per_prompt.csv",
        [
            {"prompt": "<b>red & blue</b>", "n": 4, "accuracy": 0.5},
            {"prompt": "a green circle", "n": 4, "accuracy": 1.0},
        ],
    )
    _csv(d / "tables" / "schedule_curve_model.csv", [{"t": t, "log_snr": 7.0 - t / 100} for t in range(300)])
    return d


class _Doc(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _parse(text: str) -> _Doc:
    doc = _Doc()
    doc.feed(text)
    return doc


def _self_contained(text: str) -> None:
    """No reference outside the file: no http(s)/protocol-relative src or href, no script, no stylesheet link."""
    doc = _parse(text)
    for tag, attrs in doc.tags:
        for name in ("src", "href", "srcset", "action", "data"):
            value = (attrs.get(name) or "").strip()
            assert not re.match(r"(https?:)?//|file:", value, re.I), (tag, name, value[:80])
            if name == "src" and value:
                assert value.startswith("data:image/"), value[:80]
            if name == "href" and value:
                assert value.startswith("#"), value  # in-page anchors only
    assert not re.search(r"<script|<link|<iframe|@import|url\(", text, re.I)
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*https?://", text, re.I)


def test_run_report_is_one_self_contained_file_with_scalars_intervals_and_provenance(run_dir):
    before = {p for p in run_dir.rglob("*")}
    path = write_run_report(run_dir, RESULTS, tags=TAGS, params={"choice.scheduler": "ddim"}, status="FINISHED")
    assert path == run_dir / REPORT_NAME and {p for p in run_dir.rglob("*")} - before == {path}  # one file
    text = path.read_text()
    _self_contained(text)
    # every scalar, its interval in its own row ("value [low, high]"), the zero-spanning one flagged
    assert "10 [8, 12]" in text and "0.001 [-0.002, 0.004]" in text and "7.069" in text and "0.75" in text
    assert "metrics/fd_shapes_net_ci_low" not in text.split('id="scalars"')[1].split("</section>")[0]
    rows = re.findall(r"<tr[^>]*>.*?</tr>", text.split('id="scalars"')[1].split("</section>")[0])
    kid = next(r for r in rows if "kid_mean_shapes_net" in r)
    fd = next(r for r in rows if "metrics/fd_shapes_net<" in r)
    assert 'class="warn"' in kid and "interval contains 0" in kid
    assert 'class="warn"' not in fd and "contains 0" not in fd
    # images: both plots, embedded, decodable, exact
    doc = _parse(text)
    srcs = [a["src"] for t, a in doc.tags if t == "img"]
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    sizes = {Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).size for s in srcs}
    assert sizes == {(96, 96), (80, 60)}
    # provenance: model, scheduler and class, steps, guidance, N, seeds, extractor resize + weights hash, versions, git
    prov = text.split('id="provenance"')[1].split("</section>")[0]
    for needle in (
        "/models/shapes_sd",
        "ddim (DDIMScheduler)",
        ">25<",
        ">7.5<",
        "32 requested",
        "seed 3",
        "3 … 34",
        "bilinear",
        "c74eb30b6019",
        "torch 2.9.9",
        "diffusers 0.99.0",
        TAGS["git.commit"],
        "abc123",
        "FINISHED",
    ):
        assert needle in prov, needle
    # the per-prompt table up front, escaped; a long table capped with a note
    assert text.index('id="per-prompt"') < text.index('id="tables"')
    assert "&lt;b&gt;red &amp; blue&lt;/b&gt;" in text and "<b>red" not in text
    assert "showing the first 200 of 300 rows" in text
    assert sum(1 for t, _ in doc.tags if t == "table") >= 5


def test_report_reads_results_json_and_recomputes_environment_tags_when_not_given(run_dir):
    from pipeline.record.tracking import git_info

    text = write_run_report(run_dir).read_text()  # results.json, pipeline.record.tracking.environment_tags()
    prov = text.split('id="provenance"')[1].split("</section>")[0]
    assert "10 [8, 12]" in text and "mlflow 3." in prov and "hydra-core " in prov
    assert git_info()["git.commit"][:12] in prov


def test_scalar_rows_fold_intervals_and_keep_orphan_bounds():
    rows = {r["key"]: r for r in scalar_rows({**RESULTS, "latent/x_ci_low": -1.0})}
    assert set(rows) == {
        "metrics/fd_shapes_net",
        "metrics/kid_mean_shapes_net",
        "metrics/prompt_accuracy",
        "schedule/log_snr_max",
        "latent/x_ci_low",
    }
    assert (rows["metrics/fd_shapes_net"]["low"], rows["metrics/fd_shapes_net"]["high"]) == (8.0, 12.0)
    assert [k for k, r in rows.items() if r["spans_zero"]] == ["metrics/kid_mean_shapes_net"]
    assert rows["metrics/fd_shapes_net"]["better"] == "lower" and rows["metrics/prompt_accuracy"]["better"] == "higher"
    assert rows["schedule/log_snr_max"]["better"] == "" and rows["schedule/log_snr_max"]["group"] == "schedule"


def test_checkpoint_steps_final_model_is_last_step_plus_one():
    paths = ["/z/shapes_sd_ckpt/step_00750", "/z/shapes_sd", "/z/shapes_sd_ckpt/step_00250/"]
    assert checkpoint_steps(paths) == {paths[0]: 750, paths[1]: 751, paths[2]: 250}
    assert checkpoint_steps(["/a/model_a", "/b/model_b"]) == {}  # different models, not checkpoints


def test_a_failing_report_never_changes_the_run(monkeypatch, tmp_path, caplog):
    import pipeline.run.runner
    from pipeline.run.runner import RunOutcome, _write_report

    def boom(*a, **k):
        raise RuntimeError("report broke")

    monkeypatch.setattr(pipeline.run.runner, "write_run_report", boom)
    tracker = SimpleNamespace(run_tags=lambda: {})
    with caplog.at_level(logging.WARNING):
        _write_report(tmp_path, RunOutcome("id", "FINISHED", tmp_path), tracker, {}, {})  # no exception
    assert "could not write the report" in caplog.text and "report broke" in caplog.text


def test_a_real_run_uploads_its_report_as_an_artifact(outputs, tmp_path):
    from conftest import sqlite_uri
    from mlflow.tracking import MlflowClient

    from pipeline.run.runner import run_pipeline

    cfg = compose_cfg(["model=sd15_scheduler", "mode=[schedule]", "mode.schedule.compare=[linear]"], outputs)
    out = run_pipeline(cfg, tmp_path / "run", choices={"model": "sd15_scheduler", "mode": ["schedule"]})
    assert out.status == "FINISHED"
    client = MlflowClient(sqlite_uri(outputs))
    assert REPORT_NAME in {a.path for a in client.list_artifacts(out.run_id)}
    text = Path(client.download_artifacts(out.run_id, REPORT_NAME, str(tmp_path / "dl"))).read_text()
    _self_contained(text)
    assert out.run_id in text and "schedule/log_snr_max" in text and "version.torch" in text
    assert "native (PNDMScheduler)" in text  # the solver class: the run's tag sampler.class (not in the config)
    assert "data:image/png;base64," in text  # the plots


def _child(tmp_path, name, path, status="FINISHED", grid=True, start=0, fd=1.0, error=None):
    run_dir = tmp_path / name
    if grid:
        _png(run_dir / "plots" / "metrics_samples.png", (40, 40), start)
    tags = {"run_dir": str(run_dir), "metrics.primary_extractor": "shapes_net", **({"error": error} if error else {})}
    metrics = (
        {}
        if status != "FINISHED"
        else {
            "metrics/fd_shapes_net": fd,
            "metrics/fd_shapes_net_ci_low": fd - 2,
            "metrics/fd_shapes_net_ci_high": fd + 1,
            "metrics/prompt_accuracy": 0.5,
        }
    )
    return SimpleNamespace(
        info=SimpleNamespace(
            run_id=f"id-{name}", run_name=f"model.path={Path(path).name}", status=status, start_time=start
        ),
        data=SimpleNamespace(
            params={"model.path": path, "choice.model": "shapes_sd", "mode.metrics.num_samples": "16"},
            metrics=metrics,
            tags=tags,
        ),
    )


def test_checkpoint_sweep_report_and_stepped_sample_grids_on_the_parent(outputs, tmp_path):
    from pipeline.record.tracking import Tracker

    children = [
        _child(tmp_path, "c0", "/z/ckpt/step_00250", start=1, fd=5.0),
        _child(tmp_path, "c1", "/z/shapes_sd", start=2, fd=1.5),  # the final model: 1000 + 1
        _child(tmp_path, "c2", "/z/ckpt/step_00750", start=3, fd=-0.5),
        _child(tmp_path, "c3", "/z/ckpt/step_00500", status="FAILED", grid=False, start=4, error="Boom: <x>"),
        _child(tmp_path, "c4", "/z/ckpt/step_01000", grid=False, start=5),
    ]  # its run dir is elsewhere
    tracker = Tracker(SimpleNamespace(uri=None, experiment="report-sweeps", connect_timeout_s=5.0), outputs)
    tracker.start("sweep·model.path=…", tags={"sweep.role": "parent", "git.commit": "feedbeef", "version.torch": "2"})
    tracker.log_params({"sweep.model.path": ",".join(c.data.params["model.path"] for c in children)})
    (tmp_path / "sweep").mkdir()
    _png(tmp_path / "sweep" / "sweep_checkpoints.png", (50, 30), 9)

    logged = log_checkpoint_samples(tracker, children)
    assert logged == {"model.path=step_00250": 250, "model.path=step_00750": 750, "model.path=shapes_sd": 1001}
    assert tracker.logged_image_steps(SAMPLES_KEY) == {250, 750, 1001}
    files = [f.path for f in tracker.client.list_artifacts(tracker.run_id, "images")]
    assert sum(f.endswith(".png") for f in files) == 3
    assert log_checkpoint_samples(tracker, children) == {}  # a resumed sweep logs nothing twice

    text = write_sweep_report(tmp_path / "sweep", tracker.get_run(), children).read_text()
    _self_contained(text)
    srcs = [a["src"] for t, a in _parse(text).tags if t == "img"]
    assert len(srcs) == 4  # the sweep plot + the 3 finished children's grids (the failed one has none)
    grids = text.split('id="samples"')[1]
    assert grids.index("step 250:") < grids.index("step 750:") < grids.index("step 1001:")  # training order
    assert "no local metrics_samples.png for: model.path=step_01000" in grids
    runs = text.split('id="runs"')[1].split("</section>")[0]
    assert "Boom: &lt;x&gt;" in runs and "FAILED" in runs
    assert "5 [3, 6]" in runs and "-0.5 [-2.5, 0.5]" in runs and "contains 0" in runs
    assert "feedbeef" in text and "step_00500" in runs
    tracker.end()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no chromium installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    path = write_run_report(run_dir, RESULTS, tags=TAGS, status="FINISHED")
    shot = run_dir / "report.png"
    base = [
        _chromium(),
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1200,2000", path.as_uri()],
        capture_output=True,
        timeout=60,
        check=True,
    )
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert img.shape[:2] == (2000, 1200)
    assert img.std() > 10 and (img < 128).mean() > 0.005  # text, tables and images drawn, not a blank page
    dom = subprocess.run(
        [*base, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert dom.count("<img") == 2 and dom.count("<table") >= 5 and "10 [8, 12]" in dom
