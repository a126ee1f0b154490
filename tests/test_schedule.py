"""Schedule numbers against the closed forms (REFERENCE.md table) and the timesteps solvers visit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import compose_cfg

from pipeline.errors import UserError
from pipeline.models.builtin import builtin_path
from pipeline.models.loading import load_scheduler_config
from pipeline.models.schedulers import build_scheduler
from pipeline.modes.schedule.schedules import named_schedule
from pipeline.modes.schedule.stage import visited
from pipeline.run.runner import run_pipeline

# name: (log-SNR at t=0, log-SNR at t=999, sqrt(alpha_bar_T), SNR_T)
CLOSED_FORMS = {
    "linear": (9.2101, -10.1177, 0.006353, 4.036e-5),
    "scaled_linear": (7.0694, -5.3640, 0.068265, 0.0046819),
    "squaredcos_cap_v2": (10.0945, -19.8359, 4.9e-5, 2.43e-9),
}


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_beta_schedules_match_closed_forms(name):
    ls0, lsT, sqrt_abar_T, snr_T = CLOSED_FORMS[name]
    s = named_schedule(name)
    assert s.log_snr[0] == pytest.approx(ls0, abs=1e-3)
    assert s.log_snr[-1] == pytest.approx(lsT, abs=1e-3)
    assert math.sqrt(s.alphas_cumprod[-1]) == pytest.approx(sqrt_abar_T, rel=1e-2)
    assert s.snr[-1] == pytest.approx(snr_T, rel=1e-2)
    assert s.monotonic and not s.zero_terminal_snr


def test_zero_terminal_snr_schedule():
    s = named_schedule("scaled_linear_zero_snr")
    assert s.alphas_cumprod[-1] == 0.0 and s.log_snr[-1] == -np.inf and s.zero_terminal_snr
    assert s.log_snr[0] == pytest.approx(7.0694, abs=1e-3)
    summary = s.summary()
    assert summary["log_snr_min"] == pytest.approx(-15.44, abs=1e-2)  # finite part: t = 998
    assert summary["terminal_snr"] == 0.0 and summary["zero_terminal_snr"] == 1.0


def test_sigma_schedules():
    edm = named_schedule("edm")
    assert edm.log_snr[0] == pytest.approx(-2 * math.log(0.002), abs=1e-3)  # +12.43
    assert edm.log_snr[-1] == pytest.approx(-2 * math.log(80.0), abs=1e-3)  # -8.76
    karras = named_schedule("karras")  # Karras spacing between SD's own sigma extremes
    assert karras.log_snr[0] == pytest.approx(7.0694, abs=1e-3) and karras.log_snr[-1] == pytest.approx(
        -5.3640, abs=1e-3
    )
    assert edm.monotonic and karras.monotonic


def test_beta_panel_of_sigma_schedules_has_no_spike_at_t0_and_the_10_note_only_for_linear_beta():
    from pipeline.modes.schedule.stage import findings, schedule_scalars

    for name in ("karras", "edm"):  # no step before t = 0 on a σ grid: β_0 is not drawn
        betas = named_schedule(name).betas
        assert math.isnan(betas[0]) and np.all(np.isfinite(betas[1:])) and betas[1] < 10 * betas[2]
    assert named_schedule("linear").betas[0] == pytest.approx(1e-4)  # a β schedule keeps its β_0
    note = {}
    for name in ("scaled_linear", "squaredcos_cap_v2", "karras", "edm"):
        s = named_schedule(name)
        note[name] = findings(
            name, schedule_scalars(s, np.array([0.0])), s.kind, (s.scheduler_config or {}).get("beta_schedule")
        )[0]
    assert "not the ±10 of DDPM-linear" in note["scaled_linear"]
    assert [n for n in note if "±10" in note[n]] == ["scaled_linear"]
    assert "cosine schedule" in note["squaredcos_cap_v2"] and "σ from 0.002 to 80" in note["edm"]


@pytest.mark.parametrize("spacing,offset,first,last", [("leading", 1, 981, 1), ("trailing", 0, 999, 19)])
def test_ddim_visited_timesteps(spacing, offset, first, last):
    cfg = compose_cfg(["scheduler=ddim", f"scheduler.timestep_spacing={spacing}", f"scheduler.steps_offset={offset}"])
    ts = visited(named_schedule("scaled_linear"), cfg.scheduler, 50)
    assert (ts[0], ts[-1], len(ts)) == (first, last, 50)


def test_heun_visits_twice_per_step_and_euler_starts_at_sigma_max():
    cfg = compose_cfg(["scheduler=heun"])
    assert len(visited(named_schedule("scaled_linear"), cfg.scheduler, 10)) == 19  # 2nd order: 2 evaluations/step
    base, _ = load_scheduler_config(builtin_path("sd15_scheduler"))
    # trailing spacing starts at t = 999, where SD's sigma is 14.6 (leading starts at t = 981)
    euler = build_scheduler(base, compose_cfg(["scheduler=euler", "scheduler.timestep_spacing=trailing"]).scheduler)
    euler.set_timesteps(50)
    assert float(euler.init_noise_sigma) == pytest.approx(14.6, abs=0.1)


def test_schedule_mode_scalars_for_the_models_scheduler(outputs, tmp_path):
    cfg = compose_cfg(["scheduler=ddim", "sampler.num_inference_steps=50"], outputs)
    out = run_pipeline(cfg, tmp_path / "run")
    r = out.results
    assert out.status == "FINISHED"
    assert r["schedule/log_snr_max"] == pytest.approx(7.0694, abs=1e-3)
    assert r["schedule/log_snr_min"] == pytest.approx(-5.3640, abs=1e-3)
    assert r["schedule/terminal_snr"] == pytest.approx(0.0046819, rel=1e-3)
    assert r["schedule/zero_terminal_snr"] == 0.0 and r["schedule/monotonic"] == 1.0
    assert (r["schedule/first_visited_t"], r["schedule/last_visited_t"]) == (981.0, 1.0)
    assert r["schedule/first_visited_log_snr"] == pytest.approx(named_schedule("scaled_linear").log_snr[981], abs=1e-9)
    assert r["schedule/scaled_linear_zero_snr/zero_terminal_snr"] == 1.0
    assert r["schedule/linear/log_snr_max"] == pytest.approx(9.2101, abs=1e-3)
    assert r["schedule/edm/log_snr_max"] == pytest.approx(12.43, abs=1e-2)
    findings = (tmp_path / "run" / "tables" / "schedule_findings.md").read_text()
    assert "non-zero terminal SNR" in findings and "not the ±10 of DDPM-linear" in findings
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == r
    for name in ["schedule_log_snr_overlay", "schedule_model", "schedule_edm"]:
        assert (tmp_path / "run" / "plots" / f"{name}.png").stat().st_size > 10_000


def _model_dir(tmp_path, config: dict):
    d = tmp_path / "model"
    (d / "scheduler").mkdir(parents=True)
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return d


def test_non_decreasing_alpha_bar_is_an_error_after_results_are_saved(outputs, tmp_path):
    betas = [0.01] * 500 + [0.0] * 10 + [0.02] * 490  # β = 0 holds ᾱ constant
    d = _model_dir(tmp_path, {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "trained_betas": betas})
    cfg = compose_cfg([f"model.path={d}", "mode.schedule.compare=[linear]"], outputs)
    with pytest.raises(UserError, match=r"not strictly decreasing \(first at t=500\)"):
        run_pipeline(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["schedule/monotonic"] == 0.0 and "schedule/linear/log_snr_max" in saved
    # strict=false only reports it
    cfg = compose_cfg([f"model.path={d}", "mode.schedule.compare=[linear]", "mode.schedule.strict=false"], outputs)
    assert run_pipeline(cfg, tmp_path / "run2").results["schedule/monotonic"] == 0.0


def test_scheduler_that_fails_to_load_names_the_file(outputs, tmp_path):
    d = _model_dir(tmp_path, {"_class_name": "DDPMScheduler", "beta_schedule": "quadratic-ish"})
    cfg = compose_cfg([f"model.path={d}"], outputs)
    # the default scheduler=native builds the model's own class
    with pytest.raises(UserError, match=r"scheduler_config\.json.*DDPMScheduler could not be built"):
        run_pipeline(cfg, tmp_path / "run")
    (d / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        run_pipeline(cfg, tmp_path / "run2")
