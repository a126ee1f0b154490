"""Does a run's report.html render, offline, in a real browser? And what does writing it cost?

Runs the default metrics run (``python -m pipeline 'mode=[metrics]'``, in-process, outputs in a temporary
directory that is kept), or takes an existing run dir, then opens ``<run dir>/report.html`` from the file system
in headless Chromium (no server, no network) and checks:

- a screenshot (written next to it, ``<run dir>/report.png``) is not blank: pixel spread and the share of inked
  pixels;
- every ``<img>`` decoded (a copy of the report with one inline script added records each image's natural size;
  the report itself has no script) and the tables are in the DOM;
- nothing outside the file is referenced (no http(s) / protocol-relative ``src``/``href``, no script, no link).

Figure: the report's size and write time against the run's wall time (the baseline: the run without it).
Chromium is not a project dependency: ``apt-get install -y chromium``.

Usage: python bench/report_render.py [RUN_DIR] [--n N] [--modes metrics] [--outputs DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.record.report import REPORT_NAME, write_run_report  # noqa: E402

_PROBE = """<script>addEventListener("load", () => {
  const imgs = [...document.images];
  imgs.forEach(i => i.setAttribute("data-natural", i.naturalWidth + "x" + i.naturalHeight));
  document.body.setAttribute("data-imgs-decoded", imgs.filter(i => i.complete && i.naturalWidth > 0).length);
  document.body.setAttribute("data-imgs", imgs.length);
  document.body.setAttribute("data-tables", document.querySelectorAll("table").length);
});</script>"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        sys.exit("no chromium found: apt-get install -y chromium")
    return exe


def run_default(modes: str, n: int | None, outputs: Path) -> tuple[Path, float]:
    from conftest import compose_cfg

    from pipeline.run.runner import run_pipeline

    overrides = [f"mode=[{modes}]"] + ([f"mode.metrics.num_samples={n}"] if n else [])
    cfg = compose_cfg(overrides, outputs)
    run_dir = outputs / "runs" / "report_bench"
    tic = time.perf_counter()
    out = run_pipeline(cfg, run_dir)
    wall = time.perf_counter() - tic
    print(f"run {out.status} in {wall:.1f} s: {' '.join(overrides)} -> {run_dir}")
    return run_dir, wall


def external_refs(text: str) -> list[str]:
    refs = re.findall(r"""(?:src|href|srcset|action)\s*=\s*["']?\s*((?:https?:)?//[^"' >]*)""", text, re.I)
    refs += re.findall(r"<script[^>]*\bsrc=|<link\b|@import|url\(", text, re.I)
    return refs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", nargs="?", type=Path, help="an existing run dir (default: run the default metrics run)")
    ap.add_argument("--modes", default="metrics")
    ap.add_argument("--n", type=int, default=None, help="mode.metrics.num_samples (default: the config's, 256)")
    ap.add_argument("--outputs", type=Path, default=None, help="outputs dir of the run (default: a kept temp dir)")
    ap.add_argument("--window", default="1200,3000")
    args = ap.parse_args()
    exe = chromium()

    wall = None
    if args.run_dir is None:
        outputs = args.outputs or Path(tempfile.mkdtemp(prefix="report-bench-"))
        run_dir, wall = run_default(args.modes, args.n, outputs)
    else:
        run_dir = args.run_dir
    report = run_dir / REPORT_NAME
    if not report.is_file():
        sys.exit(f"{report}: no report (a run writes it at its end)")
    text = report.read_text()
    with tempfile.TemporaryDirectory() as tmp:  # its cost, on a copy (the run's report keeps the run's tags)
        copy = Path(tmp) / "run"
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("images", "progress"))
        tags = {"mlflow.runName": "bench"}
        write_run_report(copy, tags=tags)  # warm (imports, page cache), as in the runner at the end of a run
        tic = time.perf_counter()
        write_run_report(copy, tags=tags)
        write_s = time.perf_counter() - tic
    size = len(text.encode())
    print(
        f"report {report}: {size / 1024:.0f} KiB, written in {write_s:.3f} s"
        + (f" = {100 * write_s / wall:.2f} % of the run's {wall:.1f} s" if wall else "")
    )

    refs = external_refs(text)
    n_img, n_table = text.count("<img"), text.count("<table")
    with tempfile.TemporaryDirectory() as tmp:
        base = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", f"--user-data-dir={tmp}/p"]
        shot = run_dir / "report.png"
        tic = time.perf_counter()
        subprocess.run(
            [*base, f"--screenshot={shot}", f"--window-size={args.window}", report.resolve().as_uri()],
            capture_output=True,
            timeout=120,
            check=True,
        )
        render_s = time.perf_counter() - tic
        probe = Path(tmp) / "probe.html"  # the same page + one inline script that records what decoded
        csp = "style-src 'unsafe-inline'"
        probe.write_text(text.replace(csp, csp + "; script-src 'unsafe-inline'").replace("</body>", _PROBE + "</body>"))
        dom = subprocess.run(
            [*base, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    px = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    attr = lambda name: int((re.search(rf'{name}="(\d+)"', dom) or [0, -1])[1])  # noqa: E731
    decoded, imgs, tables = attr("data-imgs-decoded"), attr("data-imgs"), attr("data-tables")
    sizes = re.findall(r'data-natural="(\d+x\d+)"', dom)
    inked = float((px < 200).mean())
    ok = (
        not refs
        and imgs == n_img
        and decoded == imgs
        and imgs > 0
        and tables == n_table
        and tables > 0
        and px.std() > 10
        and inked > 0.01
    )
    print(
        f"chromium: screenshot {shot} ({px.shape[1]}x{px.shape[0]}, {render_s:.1f} s): pixel std {px.std():.1f}, "
        f"inked {100 * inked:.1f} %"
    )
    print(
        f"DOM: {decoded}/{imgs} images decoded ({', '.join(sizes)}), {tables} tables (file: {n_img} <img>, "
        f"{n_table} <table>); external references: {len(refs)}{' ' + str(refs[:3]) if refs else ''}"
    )
    print("OK: report.html renders offline with its tables and images" if ok else "FAILED: see the figures above")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
