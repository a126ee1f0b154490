"""Shared fixtures: compose the real config with Hydra's compose API, outputs under a tmp dir, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # every test picks its store (default: <outputs>/mlflow.db)

import pytest  # noqa: E402

from pipeline.config import compose_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def compose_cfg(overrides=(), outputs: Path | None = None):
    """Compose conf/config.yaml with overrides (as the CLI would), outputs redirected."""
    extra = [f"paths.outputs={outputs}"] if outputs is not None else []
    return compose_config([*overrides, *extra])


@pytest.fixture(scope="session")
def outputs(tmp_path_factory) -> Path:
    """One outputs dir (and so one SQLite store, migrated once) for the session."""
    return tmp_path_factory.mktemp("outputs")


def sqlite_uri(outputs: Path) -> str:
    return f"sqlite:///{outputs.resolve() / 'mlflow.db'}"


def all_runs(outputs: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sqlite_uri(outputs))
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, max_results=50000)


def default_signals() -> None:
    """A child's SIGINT/SIGTERM back to their defaults (Python then installs its Ctrl-C handler): a suite started in
    the background (``nohup pytest &``) runs with SIGINT ignored, and a child would inherit that."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_cli(args, outputs: Path, module: str = "pipeline", timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "HYDRA_FULL_ERROR": "0"}
    env.pop("HYDRA_FULL_ERROR")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=default_signals,
        **kw,
    )


@pytest.fixture(scope="module")
def model_of(tmp_path_factory):
    """A factory: the :class:`~pipeline.models.adapter.ModelAdapter` of tests/tiny's family ``name``, built and
    loaded once per test module (as a hub checkpoint would be: saved, then ``from_pretrained``)."""
    from diffusers import DiffusionPipeline
    from tiny import tiny_family

    from pipeline.models.adapter import ModelAdapter

    root, built = tmp_path_factory.mktemp("tiny_models"), {}

    def get(name: str) -> ModelAdapter:
        if name not in built:
            path = tiny_family(name, root / name)
            built[name] = ModelAdapter(DiffusionPipeline.from_pretrained(path, use_safetensors=True))
        return built[name]

    return get


@pytest.fixture(scope="module")
def one_thread():
    """Tiny forwards gain nothing from threads, and on shared, busy cores 2 threads ran ~20x slower (use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def features_cfg(**kw):
    """A ``features.<name>`` block as the schema types it."""
    from omegaconf import OmegaConf

    from pipeline.config import FeaturesConfig

    return OmegaConf.structured(FeaturesConfig(**kw))
