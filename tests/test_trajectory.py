"""The schedule mode's trajectory part: the solver loop equals generation, errors / NFE / orders / geometry, the
reference cache (untrusted file), refusals."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from conftest import compose_cfg, sqlite_uri

from pipeline.errors import UserError
from pipeline.models.generation import generators, sample
from pipeline.modes.schedule.trajectory import fit_order, integrate, reference_at
from pipeline.run.runner import run_pipeline


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_order_fit_recovers_a_known_slope_over_the_upper_half_and_leaves_out_unresolved_points():
    nfe = [5, 10, 20, 40, 80]
    rng = np.random.default_rng(0)
    scale = np.exp(rng.normal(0, 0.3, size=6))  # per-sample constants: the slope is the same for each
    pre = np.array([[3.0] * 6, [0.9] * 6])  # a pre-asymptotic start the rule must not fit
    tail = np.array([[c * n**-2.0 for c in scale] for n in (20, 40, 80)])
    fit = fit_order(nfe, np.vstack([pre, tail]), floor=0.0)
    assert fit["order"] == pytest.approx(2.0, abs=1e-9) and (fit["nfe_min"], fit["nfe_max"]) == (20, 80)
    assert fit["points"] == 3 and len(fit["local"]) == 4
    # a reference whose own change is 1e-4: points below 100x that are not resolved (here only NFE 20 stays)
    floor = float(tail[1].mean()) / 100 * 1.01
    assert math.isnan(fit_order(nfe, np.vstack([pre, tail]), floor=floor)["order"])


def test_reference_is_interpolated_linearly_in_sigma():
    states = torch.tensor([[4.0], [2.0], [0.0]])
    at = reference_at(np.array([2.0, 1.0, 0.0]), states)
    assert float(at(1.5)) == pytest.approx(3.0) and float(at(0.25)) == pytest.approx(0.5)
    assert float(at(5.0)) == 4.0 and float(at(0.0)) == 0.0


@pytest.fixture(scope="module")
def shapes_model():
    from pipeline.models.adapter import ModelAdapter
    from pipeline.models.loading import load_pipeline

    cfg = compose_cfg(["model=shapes_sd"])
    return ModelAdapter(load_pipeline(cfg.model, torch.device("cpu")))


@pytest.mark.parametrize("option", ["heun", "dpmpp_2m"])
def test_the_study_loop_draws_what_generation_draws(shapes_model, option):
    """integrate() + decode == generation.sample(), bit for bit (the study judges the images the runs make)."""
    from pipeline.models.loading import load_scheduler_config
    from pipeline.models.schedulers import build_scheduler
    from pipeline.modes.schedule.trajectory import scheduler_option

    m = shapes_model
    config, _ = load_scheduler_config(compose_cfg([]).model.path)
    sampler = build_scheduler(config, scheduler_option(option))
    cond = m.condition(2, 5.0, 32, 32, prompts=["a red circle", "a blue square"])
    images = sample(m, sampler, cond, generators(0, [0, 1]), 3, 32, 32)
    noise = m.initial_noise(generators(0, [0, 1]), 32, 32, 1.0)
    run = integrate(m, sampler, cond, noise, 3, 32, 32, flow=False, keep_states=True)
    assert torch.equal(m.decode(run.final, 32, 32), images)
    assert run.nfe == (5 if option == "heun" else 3)  # Heun: 2 per step except the last
    assert len(run.states) == 4 and len(run.directions) == 3 and run.sigmas[-1] == 0.0


def test_trajectory_run_logs_errors_orders_geometry_and_reuses_its_reference(outputs, tmp_path):
    common = [
        "model=shapes_sd",
        "scheduler=euler",
        "sampler.num_inference_steps=4",
        "sampler.guidance_scale=5",
        "mode.schedule.trajectory=true",
        "mode.schedule.solvers=[heun,euler_ancestral]",
        "mode.schedule.step_counts=[2,4,8]",
        "mode.schedule.reference_steps=24",
        "mode.schedule.reference_max_steps=48",
        "mode.schedule.trajectory_samples=2",
        "mode.schedule.compare=[]",
    ]
    first = run_pipeline(compose_cfg(common, outputs), tmp_path / "a")
    assert first.status == "FINISHED"
    r = first.results
    assert r["cost/nfe"] == 4.0 and r["schedule/trajectory_rmse"] > 0
    assert (
        r["schedule/trajectory_rmse_ci_low"] <= r["schedule/trajectory_rmse"] <= r["schedule/trajectory_rmse_ci_high"]
    )
    assert r["schedule/trajectory_psnr"] > 0 and r["schedule/trajectory_feature_distance"] >= 0
    assert "schedule/curvature_max" in r and 0 <= r["schedule/curvature_max_step"] < 4
    rows = _rows(tmp_path / "a" / "tables" / "trajectory_error.csv")
    nfe = {(row["solver"], int(row["steps"])): int(row["nfe"]) for row in rows}
    assert nfe == {("euler", 4): 4, ("euler", 2): 2, ("euler", 8): 8, ("heun", 2): 3, ("heun", 4): 7, ("heun", 8): 15}
    assert {o["solver"] for o in _rows(tmp_path / "a" / "tables" / "trajectory_order.csv")} == {"euler", "heun"}
    geometry = _rows(tmp_path / "a" / "tables" / "trajectory_geometry.csv")
    assert len(geometry) == 4 and all(math.isfinite(float(g["error_share"])) for g in geometry)
    for name in ("trajectory_error_nfe", "trajectory_geometry"):
        assert (tmp_path / "a" / "plots" / f"{name}.png").stat().st_size > 5_000
    # the stochastic option is named, not judged
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(sqlite_uri(outputs)).get_run(first.run_id).data.tags
    assert "no pathwise reference" in tags["skipped.trajectory.euler_ancestral"]
    assert tags["schedule/reference_cache"] == "miss"

    # the same study again: the reference comes from the cache and every number is the same
    again = run_pipeline(compose_cfg(common, outputs), tmp_path / "b")
    assert MlflowClient(sqlite_uri(outputs)).get_run(again.run_id).data.tags["schedule/reference_cache"] == "hit"
    for key in ("schedule/trajectory_rmse", "schedule/trajectory_psnr", "schedule/order/heun"):
        if key in r:
            assert again.results[key] == pytest.approx(r[key], rel=1e-6)


def test_a_damaged_reference_cache_is_recomputed_not_trusted(tmp_path):
    from pipeline.modes.schedule.trajectory import load_cached, save_cached

    good = tmp_path / "r.npz"
    save_cached(good, {"final": np.ones((2, 3)), "sigmas": np.arange(3.0)})
    assert load_cached(good, {"final": (2, 3), "sigmas": None})["final"].shape == (2, 3)
    assert load_cached(good, {"final": (2, 4), "sigmas": None}) is None  # another study's shapes
    good.write_bytes(b"not an npz")
    assert load_cached(good, {"final": (2, 3)}) is None
    save_cached(good, {"final": np.full((2, 3), np.nan)})
    assert load_cached(good, {"final": (2, 3)}) is None


def test_study_keys_are_checked_before_any_work(outputs, tmp_path):
    from pipeline.run.runner import preflight

    for bad, says in (
        ("mode.schedule.solvers=[eular]", "not a scheduler option"),
        ("mode.schedule.step_counts=[4,4]", "distinct"),
        ("mode.schedule.reference_steps=8", "finer than what it judges"),
        ("mode.schedule.solvers=[flow_euler]", "rectified-flow solver, but the model is a diffusion model"),
    ):
        cfg = compose_cfg(["mode.schedule.trajectory=true", "mode.schedule.step_counts=[4,16]", bad], outputs)
        with pytest.raises(UserError, match=says):
            preflight(cfg)


def test_ddim_off_its_own_grid_is_named():
    """DDIM steps to t − ⌊T/N⌋: consistent with leading spacing (and trailing when N divides T), not linspace."""
    import diffusers

    from pipeline.models.builtin import builtin_path
    from pipeline.models.loading import load_scheduler_config
    from pipeline.models.schedulers import stride_mismatch

    config, _ = load_scheduler_config(builtin_path("sd15_scheduler"))
    ddim = diffusers.DDIMScheduler
    assert stride_mismatch(ddim.from_config(config, timestep_spacing="leading"), 30) is None
    assert stride_mismatch(ddim.from_config(config, timestep_spacing="trailing"), 20) is None
    said = stride_mismatch(ddim.from_config(config, timestep_spacing="linspace"), 20)
    assert "t − 50" in said and "999, 946" in said
    assert stride_mismatch(ddim.from_config(config, timestep_spacing="trailing"), 30) is not None
    assert stride_mismatch(diffusers.EulerDiscreteScheduler.from_config(config), 20) is None


def test_x0_clipping_is_named_and_left_out_of_the_reference():
    """A model config with clip_sample (shapes_ddpm's): Heun and DDIM clip x₀ at every step, Euler does not; the
    reference solves the unclipped probability-flow ODE."""
    import diffusers

    from pipeline import zoo
    from pipeline.models.loading import load_scheduler_config
    from pipeline.modes.schedule.trajectory import x0_correction

    config, _ = load_scheduler_config(str(zoo.locate("shapes_ddpm")))
    assert config["clip_sample"] is True
    assert "clip_sample" in x0_correction(diffusers.HeunDiscreteScheduler.from_config(config))
    assert "clip_sample" in x0_correction(diffusers.DDIMScheduler.from_config(config))
    assert x0_correction(diffusers.EulerDiscreteScheduler.from_config(config)) is None
    assert x0_correction(diffusers.HeunDiscreteScheduler.from_config(config, clip_sample=False)) is None
