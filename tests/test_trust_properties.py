"""Issue 24, item 7: property-based tests (hypothesis) at the boundaries where users type things. Each property
either gets a clear UserError before any work or a value the run can use; never another exception. Example budgets
are small and fixed (``derandomize``: the same examples every run, so CI is deterministic)."""

from __future__ import annotations

import math

import pytest
from conftest import compose_cfg
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

PROFILE = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

# key -> the range the run may use (the schema's bounds, restated here as the property's oracle)
NUMERIC = {
    "sampler.num_inference_steps": (1, math.inf, int),
    "sampler.batch_size": (1, math.inf, int),
    "sampler.guidance_scale": (0, math.inf, float),
    "sampler.eta": (0, 1, float),
    "seed": (0, 2**32 - 1, int),
    "dataset.p_two": (0, 1, float),
    "dataset.num_images": (1, math.inf, int),
    "tracking.connect_timeout_s": (1e-300, math.inf, float),
}

values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        ["nan", "inf", "-inf", "1e400", "-0.0", "0x10", "true", "null", "", "1_000", "'7'", "[1]", "{a: 1}"]
    ),
)


@PROFILE
@given(key=st.sampled_from(sorted(NUMERIC)), value=values)
def test_a_typed_number_is_used_in_range_or_refused_naming_its_key(key, value):
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.errors import UserError

    text = repr(value) if isinstance(value, float) else str(value)
    try:
        cfg = compose_cfg([f"{key}={text}"])
    except UserError as e:
        assert key in str(e), str(e)
        return
    except (HydraException, OmegaConfBaseException) as e:  # Hydra's own message for a value of the wrong type
        assert key.split(".")[-1] in str(e) or text in str(e), str(e)
        return
    lo, hi, _ = NUMERIC[key]
    got = OmegaConf.select(cfg, key)
    assert isinstance(got, (int, float)) and not isinstance(got, bool) and math.isfinite(got), (key, text, got)
    assert lo <= got <= hi, (key, text, got)


# ------------------------------------------------------------------------------------------------ user text
# unicode of every category (controls, surrogate-free), markup, mathtext, formula prefixes, very long text
texts = st.one_of(
    st.text(min_size=1, max_size=60),
    st.text(alphabet=st.sampled_from("$\\{}^_=+-@<>&\"'`|!\t\r\n\x00\x1b\u202e😀 abc"), min_size=1, max_size=40),
    st.builds(lambda a, b: a * 400 + b, st.sampled_from(["$", "=", "ab "]), st.text(max_size=5)),
)


@PROFILE
@given(text=texts)
def test_user_text_reaches_every_sink_as_data(text):
    """Figures never parse it as mathtext (and save), CSV cells a spreadsheet would evaluate are neutralised and read
    back as written, HTML shows it escaped, the terminal sees no control character."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from pipeline.core.escape import csv_cell, csv_uncell, html_text, mpl_text, terminal_text

    shown, math = Text()._preprocess_math(mpl_text(text))
    assert math is False
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.set_title(mpl_text(text))
    ax.text(0, 0, mpl_text(text))
    fig.savefig(io.BytesIO(), format="png", dpi=30)
    plt.close(fig)
    cell = csv_cell(text)
    assert csv_uncell(cell) == text
    assert cell[:1] not in ("=", "+", "-", "@", "\t", "\r") or _is_number(cell)
    assert not set('<>"') & set(html_text(text))
    assert not any(ord(c) < 32 and c != "\n" or c == "\x7f" for c in terminal_text(text))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ images
MODES = [
    "1",
    "L",
    "LA",
    "La",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "RGBa",
    "RGBX",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "I",
    "I;16",
    "I;16B",
    "I;16L",
    "F",
]


@PROFILE
@given(
    mode=st.sampled_from(MODES),
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    fmt=st.sampled_from(["png", "tiff", "raw"]),
)
def test_every_image_mode_and_size_reads_as_rgb_uint8(tmp_path_factory, mode, h, w, seed, fmt):
    """Any PIL mode and size, from a file or in memory: (H, W, 3) uint8, or (for a file PIL cannot write in that
    format) never written. Integer modes wider than 8 bits keep their order (brighter stays brighter)."""
    import numpy as np
    from PIL import Image

    from pipeline.data.folder import _load_rgb, to_rgb

    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I;16B", "I;16L"):
        im = (
            Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).convert(mode)
            if mode != "I;16"
            else Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
        )
    elif mode == "I":
        im = Image.fromarray(rng.integers(-(2**31), 2**31 - 1, (h, w), dtype=np.int32))
    elif mode == "F":
        im = Image.fromarray(rng.normal(0, 3, (h, w)).astype(np.float32))
    else:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    if fmt == "raw":
        rgb = to_rgb(im)
    else:
        path = tmp_path_factory.mktemp("img") / f"x.{fmt}"
        try:
            im.save(path)
        except (OSError, ValueError, KeyError):
            return  # PIL cannot store this mode in this format: there is no such file to read
        rgb = _load_rgb(path)
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8
    if mode in ("I;16", "I", "F") and h * w > 1:
        src = np.asarray(im, dtype=np.float64)
        lo, hi = np.unravel_index(np.argmin(src), src.shape), np.unravel_index(np.argmax(src), src.shape)
        assert rgb[lo][0] <= rgb[hi][0]


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def caption_run_setup(tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("hostile_captions")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


E2E = settings(max_examples=2, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
HOSTILE_PAIR = (r"a red circle $\frac{a}{$ on the left", '=HYPERLINK("http://evil","<b>click</b>") $$')


@E2E
@example(captions=HOSTILE_PAIR)
@given(captions=st.tuples(texts, texts))
def test_a_run_on_hostile_captions_finishes_with_them_escaped_or_refuses_before_work(caption_run_setup, captions):
    """A tiny metrics run on a folder whose captions are generated text: either a UserError before any MLflow run,
    or a FINISHED run with every plot drawn, no CSV cell a spreadsheet would evaluate, each caption in the tables as
    written (after the neutralising quote) and HTML-escaped in report.html. Never a traceback, never RUNNING."""
    import csv
    import html
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from conftest import all_runs

    from pipeline.core.escape import csv_uncell
    from pipeline.errors import UserError
    from pipeline.run.runner import run_pipeline

    work = Path(tempfile.mkdtemp(dir=caption_run_setup))
    folder = work / "real"
    shutil.copytree(caption_run_setup, folder, ignore=shutil.ignore_patterns("tmp*"))
    with (folder / "captions.jsonl").open("w") as f:
        for i in range(4):
            f.write(json.dumps({"file": f"{i}.png", "caption": captions[i % 2]}) + "\n")
    out = work / "out"
    cfg = compose_cfg(
        [
            "model=shapes_sd",
            "dataset=folder",
            f"dataset.root={folder}",
            "mode=[metrics]",
            "features=[shapes_net]",
            "mode.metrics.num_samples=4",
            "mode.metrics.samples_per_prompt=2",
            "sampler.num_inference_steps=1",
            "sampler.batch_size=4",
            "mode.metrics.kid_subsets=2",
            "mode.metrics.ci_subsets=2",
            "mode.metrics.ci_bootstrap=2",
            "mode.metrics.grid=2",
            "mode.metrics.worst_prompts=2",
            "mode.metrics.cache=false",
            "mode.metrics.pr_k=1",
            "mode.metrics.dc_k=1",
        ],
        out,
    )
    try:
        result = run_pipeline(cfg, work / "run")
    except UserError:
        assert not (out / "mlflow.db").exists() or all(r.info.status != "RUNNING" for r in all_runs(out))
        return
    assert result.status == "FINISHED", result.error
    assert [r.info.status for r in all_runs(out)] == ["FINISHED"]
    run = work / "run"
    assert {p.name for p in (run / "plots").glob("*.png")} >= {"metrics_samples.png", "metrics_worst_prompts.png"}
    cells = [c for t in (run / "tables").glob("*.csv") for row in csv.reader(t.open(newline="")) for c in row]
    for cell in cells:
        assert cell[:1] not in ("=", "+", "-", "@", "\t", "\r") or _is_number(cell), cell
    written = {csv_uncell(c) for c in cells}
    report = (run / "report.html").read_text()
    for caption in {c for c in captions if c.strip()}:
        assert caption in written
        assert html.escape(caption, quote=True) in report or len(caption) > 300  # long text: cut in the report
