"""Scheduler options: native, the refusals of solvers that do not fit the model, the flow solvers' σ's against the
pipelines' own FlowMatchEuler call, the ${family_solvers:...} sweep lists and schedule mode on flow models.

Flow models here are config-only directories (model_index.json, scheduler/, vae/, transformer/ configs; no weights).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import compose_cfg, sqlite_uri
from diffusers import FlowMatchEulerDiscreteScheduler
from mlflow.tracking import MlflowClient

from pipeline import zoo
from pipeline.errors import UserError
from pipeline.models.builtin import builtin_path, family_solvers
from pipeline.models.loading import load_scheduler_config
from pipeline.models.schedulers import FLOW_SOLVERS, build_scheduler, set_flow_timesteps
from pipeline.run.runner import run_pipeline

SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512]}  # scale 8


def _flow_dir(root, pipeline: str, scheduler: dict, transformer: dict | None = None):
    files = {
        "model_index.json": {"_class_name": pipeline, "scheduler": ["diffusers", scheduler["_class_name"]]},
        "scheduler/scheduler_config.json": scheduler,
        "vae/config.json": VAE,
        "transformer/config.json": transformer or {},
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content))
    return root


@pytest.fixture
def sd3_dir(tmp_path):
    return _flow_dir(tmp_path / "sd3", "StableDiffusion3Pipeline", SD3, {"sample_size": 128, "patch_size": 2})


@pytest.fixture
def flux_dir(tmp_path):
    return _flow_dir(tmp_path / "flux", "FluxPipeline", FLUX)


def _option(name: str):
    return compose_cfg([f"scheduler={name}"]).scheduler


# ---------------------------------------------------------------------------------------------- native
def test_native_is_the_models_own_scheduler_and_equals_ddim_on_shapes_sd():
    base, source = load_scheduler_config(str(zoo.locate("shapes_sd")))
    native, ddim = build_scheduler(base, _option("native"), source), build_scheduler(base, _option("ddim"), source)
    assert type(native).__name__ == "DDIMScheduler" and dict(native.config) == dict(ddim.config)
    native.set_timesteps(25)
    ddim.set_timesteps(25)
    assert torch.equal(native.timesteps, ddim.timesteps) and int(native.timesteps[0]) == 961
    # shapes_ddpm keeps its own DDPM (steps_offset 0), a scheduler-only directory its own PNDM
    base, source = load_scheduler_config(str(zoo.locate("shapes_ddpm")))
    ddpm = build_scheduler(base, _option("native"), source)
    assert type(ddpm).__name__ == "DDPMScheduler" and ddpm.config.steps_offset == 0
    base, source = load_scheduler_config(builtin_path("sd15_scheduler"))
    assert type(build_scheduler(base, _option("native"), source)).__name__ == "PNDMScheduler"


# ---------------------------------------------------------------------------------------------- refusals
def test_solvers_that_do_not_fit_the_model_are_refused_by_name(sd3_dir, flux_dir):
    sd3_index = json.loads((sd3_dir / "model_index.json").read_text())
    with pytest.raises(
        UserError,
        match=r"scheduler=ddim: a DDPM-family solver.*rectified-flow model.*options that fit: "
        r"native, flow_euler, flow_heun, flow_dpmpp_2m, flow_unipc$",
    ):
        build_scheduler(SD3, _option("ddim"), "sd3", sd3_index)
    # the pipeline class alone makes a model flow (whatever its scheduler config says)
    with pytest.raises(UserError, match="scheduler=euler: a DDPM-family solver"):
        build_scheduler({"_class_name": "EulerDiscreteScheduler"}, _option("euler"), "sd3", sd3_index)
    base, source = load_scheduler_config(str(zoo.locate("shapes_sd")))
    with pytest.raises(
        UserError,
        match=r"scheduler=flow_euler: a rectified-flow solver, but the model is a diffusion "
        r"model.*options that fit: native, ddim, pndm, euler, euler_ancestral, heun",
    ):
        build_scheduler(base, _option("flow_euler"), source)
    with pytest.raises(
        UserError,
        match=r"scheduler=flow_heun: FlowMatchHeunDiscreteScheduler takes a static shift only"
        r".*use_dynamic_shifting.*options that fit: native, flow_euler, flow_dpmpp_2m, "
        r"flow_unipc$",
    ):
        build_scheduler(FLUX, _option("flow_heun"), "flux")


def test_refusal_comes_before_any_weights_are_read(flux_dir, tmp_path, monkeypatch):
    """Every stage that needs the pipeline gets it from the ``pipe`` stage, which needs the ``sampler`` first."""
    import pipeline.models.stages as common
    from pipeline.core.context import RunContext
    from pipeline.run.runner import _run_stage

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the scheduler option was checked")

    monkeypatch.setattr(common, "load_pipeline", no_weights)
    cfg = compose_cfg([f"model.path={flux_dir}", "scheduler=dpmpp_2m"], tmp_path / "out")
    with pytest.raises(UserError, match="scheduler=dpmpp_2m: a DDPM-family solver"):
        _run_stage("pipe", RunContext(cfg, tmp_path / "run"), set())


# ---------------------------------------------------------------------------------------------- flow σ's
def _pipeline_reference(config: dict, family: str, n: int, seq: int | None) -> FlowMatchEulerDiscreteScheduler:
    """FlowMatchEuler set as StableDiffusion3Pipeline / FluxPipeline set it (diffusers 0.42, written out)."""
    ref = FlowMatchEulerDiscreteScheduler.from_config(config)
    c = ref.config
    m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
    mu = None if seq is None else seq * m + c.base_shift - m * c.base_image_seq_len
    if family == "flux":
        ref.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    else:
        ref.set_timesteps(n, **({"mu": mu} if c.use_dynamic_shifting else {}))
    return ref


@pytest.mark.parametrize("n", [4, 20, 28])
@pytest.mark.parametrize("case", ["sd3", "flux-64", "flux-4096"])
def test_every_flow_solver_visits_the_pipelines_flow_match_sigmas(case, n):
    family, seq = (case.split("-") + [None])[:2]
    config, seq = (SD3, None) if family == "sd3" else (FLUX, int(seq))
    ref = _pipeline_reference(config, family, n, seq)
    sigmas, timesteps = ref.sigmas[:-1].double(), ref.timesteps.double()
    for name in FLOW_SOLVERS:
        if name == "flow_heun" and family == "flux":
            continue  # refused (above)
        built = build_scheduler(config, _option(name), family)
        sampler = type(built).from_config(built.config)  # as the generation loop copies it
        set_flow_timesteps(sampler, n, "cpu", seq, family)
        got_t, got_s = sampler.timesteps.double(), sampler.sigmas[:-1].double()
        if name == "flow_heun":  # 2nd order: every σ after the first is evaluated twice
            got_t, got_s = torch.cat([got_t[:1], got_t[1::2]]), torch.cat([got_s[:1], got_s[1::2]])
        assert len(got_s) == n and float(sampler.sigmas[-1]) == 0.0, name
        assert torch.allclose(got_s, sigmas, atol=1e-6, rtol=0), name
        assert torch.allclose(got_t / 1000, timesteps / 1000, atol=1e-6, rtol=0), name  # where the model is called
    if family == "sd3":
        assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == pytest.approx(
            3 * 0.002994 / (1 + 2 * 0.002994), abs=1e-4
        )


def test_flow_solvers_carry_the_models_shift():
    dpm = build_scheduler(FLUX, _option("flow_dpmpp_2m"), "flux")
    c = dpm.config
    assert (c.algorithm_type, c.solver_order, c.prediction_type, c.use_flow_sigmas) == (
        "dpmsolver++",
        2,
        "flow_prediction",
        True,
    )
    assert c.flow_shift == 3.0 and c.use_dynamic_shifting and c.time_shift_type == "exponential"
    # keys the class does not take travel in its config too (copies keep them), without a warning per copy
    assert {k: c._flow_reference[k] for k in ("shift", "base_shift", "max_shift")} == {
        k: FLUX[k] for k in ("shift", "base_shift", "max_shift")
    }
    assert "base_shift" not in c and type(dpm).from_config(c).config._flow_reference == c._flow_reference
    unipc = build_scheduler(SD3, _option("flow_unipc"), "sd3")
    assert unipc.config.flow_shift == 3.0 and not unipc.config.use_dynamic_shifting
    assert build_scheduler(SD3, _option("flow_heun"), "sd3").config.shift == 3.0


# ---------------------------------------------------------------------------------------------- sweep resolver
def test_family_solvers_resolver(sd3_dir, flux_dir, tmp_path):
    assert family_solvers(str(sd3_dir)) == "flow_euler,flow_heun,flow_dpmpp_2m,flow_unipc"
    assert family_solvers(str(flux_dir)) == "flow_euler,flow_dpmpp_2m,flow_unipc"  # no static-shift-only heun
    assert family_solvers(str(zoo.locate("shapes_sd"))) == "ddim,pndm,euler,euler_ancestral,heun,dpmpp_2m,unipc"
    assert family_solvers(str(zoo.locate("shapes_sd")), "schedule") == "ddim,euler,dpmpp_2m,unipc"
    assert family_solvers(builtin_path("sd15_scheduler"), "schedule") == "ddim,euler,dpmpp_2m,unipc"
    only = tmp_path / "only" / "scheduler"  # scheduler-only directory: the scheduler class decides
    only.mkdir(parents=True)
    (only / "scheduler_config.json").write_text(json.dumps(SD3))
    assert family_solvers(str(only.parent), "schedule") == "flow_euler,flow_heun,flow_dpmpp_2m,flow_unipc"

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pipeline.config import CONF_DIR, register_configs

    register_configs()
    for preset, path, expected in [
        ("scheduler_sweep", flux_dir, "flow_euler,flow_dpmpp_2m,flow_unipc"),
        ("schedule_sweep", sd3_dir, "flow_euler,flow_heun,flow_dpmpp_2m,flow_unipc"),
    ]:
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={preset}", f"model.path={path}"], return_hydra_config=True)
        assert str(cfg.hydra.sweeper.params.scheduler) == expected
    GlobalHydra.instance().clear()


# ---------------------------------------------------------------------------------------------- schedule mode
def _log_snr(u: float, shift: float) -> float:
    """log-SNR of x = (1 − σ) x₀ + σ ε at uniform time u with σ = s·u / (1 + (s − 1)·u)."""
    sigma = shift * u / (1 + (shift - 1) * u)
    return 2 * math.log((1 - sigma) / sigma)


def test_schedule_mode_on_an_sd3_like_model(sd3_dir, tmp_path):
    out = tmp_path / "out"
    cfg = compose_cfg(
        [
            f"model.path={sd3_dir}",
            "mode.schedule.compare=[linear,edm]",
            "sampler.num_inference_steps=10",
            "scheduler=flow_heun",
        ],
        out,
    )
    res = run_pipeline(cfg, tmp_path / "run")
    r = res.results
    assert r["schedule/log_snr_max"] == pytest.approx(_log_snr(1 / 1000, 3.0), abs=1e-6)  # +11.616
    assert r["schedule/log_snr_min"] == pytest.approx(_log_snr(999 / 1000, 3.0), abs=1e-6)  # −16.011 (σ = 1: −∞)
    assert r["schedule/zero_terminal_snr"] == 1.0 and r["schedule/monotonic"] == 1.0
    assert r["schedule/num_visited"] == 19 and r["schedule/first_visited_t"] == pytest.approx(999, abs=1e-3)
    assert r["schedule/first_visited_log_snr"] == r["schedule/log_snr_min"]  # σ = 1 visited: the finite part
    assert r["schedule/linear/log_snr_max"] == pytest.approx(9.2101, abs=1e-3)
    # the linear schedule is shown at the same normalised times as the model's visits: the first is t = 999
    assert r["schedule/linear/first_visited_t"] == pytest.approx(999, abs=1e-6)
    tags = MlflowClient(sqlite_uri(out)).get_run(res.run_id).data.tags
    assert tags["schedule/prediction_type"] == "flow, static shift" and tags["schedule/flow_shift"] == "3"
    findings = (tmp_path / "run" / "tables" / "schedule_findings.md").read_text().splitlines()
    model_line = next(f for f in findings if f.startswith("- model") and "log-SNR spans" in f)
    assert "DDPM-linear" not in model_line and "rectified flow" in model_line
    assert any("linear: log-SNR spans" in f and "not the ±10" not in f for f in findings)  # linear is DDPM-linear
    visited = (tmp_path / "run" / "tables" / "schedule_visited.csv").read_text().splitlines()
    assert len(visited) > 19


def test_schedule_mode_on_a_flux_like_model_uses_the_resolution_dependent_shift(flux_dir, tmp_path):
    def run(extra, name):
        cfg = compose_cfg(
            [f"model.path={flux_dir}", "mode.schedule.compare=[linear]", "sampler.num_inference_steps=4", *extra],
            tmp_path / "out",
        )
        return run_pipeline(cfg, tmp_path / name).results

    native = run([], "native")  # 1024x1024: (1024/8/2)² = 4096 tokens, μ = max_shift
    mu = 1.15
    assert native["schedule/log_snr_max"] == pytest.approx(_log_snr(1 / 1000, math.exp(mu)), abs=1e-6)
    assert native["schedule/log_snr_min"] == pytest.approx(_log_snr(999 / 1000, math.exp(mu)), abs=1e-6)
    # Flux visits σ = shift(linspace(1, 1/N, N)): u = 1, 0.75, 0.5, 0.25 -> training steps u·T − 1
    assert (native["schedule/first_visited_t"], native["schedule/last_visited_t"]) == pytest.approx(
        (999, 249), abs=1e-3
    )
    small = run(["mode.schedule.height=512", "mode.schedule.width=512", "scheduler=flow_unipc"], "small")
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (1024 - 256)  # (512/16)² = 1024 tokens
    assert small["schedule/log_snr_max"] == pytest.approx(_log_snr(1 / 1000, math.exp(mu)), abs=1e-6)
    assert small["schedule/last_visited_t"] == pytest.approx(249, abs=1e-3)  # the same u's as flow_euler
    assert small["schedule/log_snr_max"] > native["schedule/log_snr_max"]  # fewer tokens, less shift
