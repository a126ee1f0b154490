"""Do a run's MLflow 3 entities show in the MLflow UI? Datasets, logged models per checkpoint, system metrics.

Runs a small checkpoint sweep of the shipped shapes_sd checkpoints (``experiment=checkpoint_sweep``: step_00250,
step_00750 and the final model; few samples and steps) into ``bench/out/mlflow_ui/outputs`` (or takes an existing
outputs dir or SQLite store), serves ``mlflow ui`` on a free localhost port, and opens three pages in headless
Chromium through Playwright (``apt-get install -y chromium`` and ``pip install playwright``; it drives Debian's
``/usr/bin/chromium``, no browser download; neither is a project dependency):

- ``runs/<child>``: the run's Overview, with its *Datasets* (``reference`` and ``prompts`` contexts) and its model;
- ``experiments/<id>/models``: the experiment's *Models* tab, one logged model per checkpoint with its metrics;
- ``runs/<child>/system-metrics``: the run's *System metrics* tab (``system/cpu_utilization_percentage``, ...).

Each page is screenshotted into ``bench/out/mlflow_ui/*.png`` (the Models tab also as its chart view) and its
rendered text is searched for what must be
there (the dataset names and contexts, the checkpoint names, a system metric's name); it prints one line per check
and exits non-zero when one fails.

Usage: python bench/mlflow_ui_check.py [OUTPUTS_DIR | sqlite:///.../mlflow.db] [--n 16] [--keep-serving]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]
OUT = REPO / "bench" / "out" / "mlflow_ui"

from pipeline.record.tracking import open_client  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1600,1100",
]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        sys.exit("no chromium found: apt-get install -y chromium")
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sweep(outputs: Path, n: int) -> None:
    """The checkpoint sweep preset on the shipped checkpoints, small: N images per job, 10 sampler steps."""
    args = [
        sys.executable,
        "-m",
        "pipeline",
        "-m",
        "experiment=checkpoint_sweep",
        f"paths.outputs={outputs}",
        f"hydra.sweep.dir={outputs / 'sweep'}",
        f"mode.metrics.num_samples={n}",
        f"dataset.num_images={2 * n}",
        "sampler.num_inference_steps=10",
        "tracking.system_metrics_interval_s=1",
    ]
    print("sweep:", " ".join(args[2:]), flush=True)
    tic = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the sweep failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"sweep done in {time.perf_counter() - tic:.0f} s", flush=True)


def serve(uri: str, port: int) -> subprocess.Popen:
    cmd = ["mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(120):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    sys.exit(f"mlflow ui did not answer on port {port}")


class Browser:
    """Headless Chromium (Debian's ``/usr/bin/chromium``) driven by Playwright: the MLflow UI is a single-page app
    whose tables and tabs render after their API calls, so each page waits for the text it must show."""

    def __init__(self, pw):
        self.browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS[1:])
        self.page = self.browser.new_page(viewport={"width": 2200, "height": 1100})

    def open(self, url: str, wait_for: str, png: Path) -> str:
        """Go to ``url``, wait (60 s at most) for the text ``wait_for``, screenshot into ``png``; the page's text."""
        self.page.goto(url)
        try:
            self.page.get_by_text(wait_for, exact=False).first.wait_for(timeout=60_000)
        except Exception as e:  # noqa: BLE001 - the screenshot shows what came instead
            print(f"  (waiting for {wait_for!r} on {url}: {type(e).__name__})")
        self.page.wait_for_timeout(1500)  # charts and late columns
        self.page.screenshot(path=str(png))
        return self.page.inner_text("body")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("store", nargs="?", help="an outputs dir (its mlflow.db) or a sqlite:/// URI; default: run a sweep")
    ap.add_argument("--n", type=int, default=16, help="images per job of the sweep (default 16)")
    ap.add_argument("--keep-serving", action="store_true", help="leave mlflow ui running (prints its URL)")
    args = ap.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    if args.store is None:
        outputs = OUT / "outputs"
        shutil.rmtree(outputs, ignore_errors=True)
        run_sweep(outputs, args.n)
        uri = f"sqlite:///{(outputs / 'mlflow.db').resolve()}"
    elif "://" in args.store:
        uri = args.store
    else:
        uri = f"sqlite:///{(Path(args.store) / 'mlflow.db').resolve()}"

    client = open_client(uri)
    exp = client.get_experiment_by_name("diffusion-lens")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=200)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.inputs.dataset_inputs]
    if not children:
        sys.exit(f"no run with datasets in {uri}")
    child = children[-1]  # the sweep's first job
    models = client.search_logged_models([exp.experiment_id], max_results=100)
    datasets = [(d.dataset.name, d.tags[0].value) for d in child.inputs.dataset_inputs]
    print(
        f"store {uri}: run {child.info.run_name} ({child.info.run_id}), datasets {datasets}, "
        f"{len(models)} logged models: {[m.name for m in models]}"
    )

    from playwright.sync_api import sync_playwright

    port = free_port()
    server = serve(uri, port)
    base = f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}"
    ml = "?workflowType=machine_learning"  # the UI's "Model training" view (MLflow 3 opens on GenAI otherwise)
    run_url = f"{base}/runs/{child.info.run_id}"
    checks: list[tuple[str, bool]] = []
    try:
        with sync_playwright() as pw:
            b = Browser(pw)
            text = b.open(run_url + ml, "Datasets", OUT / "run_datasets.png")
            checks.append((f"run page shows dataset {datasets[0][0]!r}", datasets[0][0] in text))
            checks += [(f"run page shows context {ctx!r}", ctx.lower() in text.lower()) for _, ctx in datasets]
            text = b.open(f"{base}/models{ml}", models[-1].name, OUT / "experiment_models.png")
            checks += [(f"Models tab lists {m.name!r}", m.name in text) for m in models]
            checks.append(("Models tab has metric columns", "metrics/" in text))
            b.page.locator("input[value='CHART']").locator("xpath=..").click(force=True)  # "Chart view"
            b.page.wait_for_timeout(3000)
            b.page.screenshot(path=str(OUT / "experiment_models_chart.png"))
            text = b.open(f"{run_url}/system-metrics{ml}", "cpu_utilization", OUT / "run_system_metrics.png")
            checks.append(("System metrics tab shows cpu_utilization_percentage", "cpu_utilization_percentage" in text))
            b.browser.close()
    finally:
        if args.keep_serving:
            print(f"mlflow ui: http://127.0.0.1:{port} (pid {server.pid})")
        else:
            os.killpg(server.pid, signal.SIGTERM)  # mlflow ui and the workers it started (their own session)
            server.wait(timeout=30)
    for what, ok in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    print(f"screenshots: {', '.join(str(p.relative_to(REPO)) for p in sorted(OUT.glob('*.png')))}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
