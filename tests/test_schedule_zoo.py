"""The schedule zoo (``sampler.sigmas`` / ``timestep_spacing`` / ``zero_terminal_snr`` / ``flow_shift``): each option
visits what diffusers' own flag visits, AYS follows its list and the paper's log-linear interpolation, copies keep
it, and every refusal names the key and what fits. Scheduler configs only (no weights), one schedule-mode run."""

from __future__ import annotations

import csv

import diffusers
import numpy as np
import pytest
import torch
from conftest import compose_cfg
from diffusers.schedulers import AysSchedules
from test_schedulers import FLUX  # the Flux-like dynamic-shift scheduler config, one definition

from pipeline.config import SigmaSchedule
from pipeline.errors import UserError
from pipeline.models import stages
from pipeline.models.builtin import schedule_zoo
from pipeline.models.schedulers import (
    SIGMA_OPTIONS,
    build_scheduler,
    flow_shift,
    scheduler_overrides,
    set_diffusion_timesteps,
    set_flow_timesteps,
    zero_snr_warning,
    zoo_options,
)
from pipeline.run.runner import run_pipeline
from pipeline.zoo import locate

SD_LIST = [s for s in AysSchedules["StableDiffusionSigmas"] if s > 0]
SANA = {"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True, "flow_shift": 3.0}
SD_INDEX = {"_class_name": "StableDiffusionPipeline"}


def _sampler(overrides):
    """(the run's sampler, the scheduler= option, the model's scheduler config) of ``overrides``."""
    cfg = compose_cfg(overrides)
    setup = stages.read_scheduler_setup(cfg)
    return stages.make_sampler(cfg, setup), cfg.scheduler, setup["config"]


def _by_hand(base, option, **flags):
    """The option's class built from the model's config with diffusers' own flag(s), timesteps set by diffusers."""
    return getattr(diffusers, option.cls).from_config(base, **{**scheduler_overrides(option), **flags})


def _same_steps(ours, theirs, steps):
    set_diffusion_timesteps(ours, steps)
    theirs.set_timesteps(steps)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas)


# ---------------------------------------------------------------------------------------------- diffusion options
@pytest.mark.parametrize("sigmas", ["karras", "exponential", "beta"])
@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m"])
def test_sigma_options_visit_what_the_diffusers_flag_visits(solver, sigmas):
    ours, option, base = _sampler(["model=sd15_scheduler", f"scheduler={solver}", f"sampler.sigmas={sigmas}"])
    key = f"use_{sigmas}_sigmas"
    _same_steps(ours, _by_hand(base, option, **{key: True}), 12)
    plain = _by_hand(base, option)
    plain.set_timesteps(12)
    assert not torch.allclose(ours.sigmas, plain.sigmas)  # the flag changed them
    copy = type(ours).from_config(ours.config)
    assert copy.config[key] is True


def test_spacing_overrides_the_options_and_zero_snr_is_rescaled_betas_plus_trailing():
    ours, option, base = _sampler(["model=sd15_scheduler", "scheduler=euler", "sampler.timestep_spacing=trailing"])
    assert option.timestep_spacing.value == "leading"  # the option pins leading; the sampler key wins
    _same_steps(ours, _by_hand(base, option, timestep_spacing="trailing"), 10)
    ours, option, base = _sampler(["model=sd15_scheduler", "scheduler=euler", "sampler.zero_terminal_snr=true"])
    theirs = _by_hand(base, option, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    _same_steps(ours, theirs, 10)
    assert ours.timesteps[0] == 999 and float(ours.alphas_cumprod[-1]) < 1e-7  # Euler clamps ᾱ_T to 2⁻²⁴
    assert "off-distribution" in zero_snr_warning(base, compose_cfg(["sampler.zero_terminal_snr=true"]).sampler)
    assert zero_snr_warning({**base, "rescale_betas_zero_snr": True}, {"zero_terminal_snr": True}) is None
    # DDIM divides by √ᾱ_T = 0 with ε-prediction (refused below), and runs with v-prediction
    v = build_scheduler({**base, "prediction_type": "v_prediction"}, option, sampler_cfg={"zero_terminal_snr": True})
    assert v.config.rescale_betas_zero_snr and v.config.timestep_spacing == "trailing"


def test_ays_is_the_list_at_10_steps_log_linear_between_its_points_and_copies_keep_it():
    euler, _, _ = _sampler(["scheduler=euler", "sampler.sigmas=ays"])  # shapes_sd: a StableDiffusionPipeline
    set_diffusion_timesteps(euler, 10)
    np.testing.assert_allclose(euler.sigmas.numpy(), AysSchedules["StableDiffusionSigmas"], rtol=1e-6)
    dpm, _, _ = _sampler(["scheduler=dpmpp_2m", "sampler.sigmas=ays"])  # takes t(σ), integers
    set_diffusion_timesteps(dpm, 10)
    expected = list(AysSchedules["StableDiffusionTimesteps"])
    expected[8] = 125  # σ = 0.399 is t = 124.56: the list truncates, we round (sigma_to_timestep)
    assert dpm.timesteps.tolist() == expected
    set_diffusion_timesteps(euler, 19)  # every other point on the list, the ones between their geometric means
    s = euler.sigmas.double().numpy()
    np.testing.assert_allclose(s[0:19:2], SD_LIST, rtol=1e-6)
    np.testing.assert_allclose(s[1:19:2], np.sqrt(np.multiply(SD_LIST[:-1], SD_LIST[1:])), rtol=1e-6)
    assert s[-1] == 0
    set_diffusion_timesteps(euler, 20)  # log σ linear over linspace(0, 1, 10), read at linspace(0, 1, 20)
    x = np.linspace(0, 9, 20)
    i = np.minimum(np.floor(x).astype(int), 8)
    log_list = np.log(SD_LIST)
    np.testing.assert_allclose(
        np.log(euler.sigmas[:20].double().numpy()), log_list[i] + (x - i) * (log_list[i + 1] - log_list[i]), atol=1e-6
    )
    copy = type(euler).from_config(euler.config)  # as schedule mode and every stage copy the run's sampler
    set_diffusion_timesteps(copy, 20)
    torch.testing.assert_close(copy.sigmas, euler.sigmas)
    sdxl = build_scheduler(
        dict(_sampler(["scheduler=euler"])[2]),
        compose_cfg(["scheduler=euler"]).scheduler,
        model_index={"_class_name": "StableDiffusionXLPipeline"},
        sampler_cfg={"sigmas": "ays"},
    )
    set_diffusion_timesteps(sdxl, 10)
    np.testing.assert_allclose(sdxl.sigmas.numpy(), AysSchedules["StableDiffusionXLSigmas"], rtol=1e-6)


# ---------------------------------------------------------------------------------------------- flow options
def test_flow_shift_and_sigma_flags_reach_the_flow_reference():
    native, _, base = _sampler(["model=shapes_sd3", "sampler.sigmas=karras", "sampler.flow_shift=2"])
    dpm, _, _ = _sampler(
        ["model=shapes_sd3", "scheduler=flow_dpmpp_2m", "sampler.sigmas=karras", "sampler.flow_shift=2"]
    )
    by_hand = diffusers.FlowMatchEulerDiscreteScheduler.from_config(base, shift=2.0, use_karras_sigmas=True)
    by_hand.set_timesteps(8)
    for sampler in (native, dpm):
        assert flow_shift(sampler) == 2.0
        set_flow_timesteps(sampler, 8, "cpu")
        np.testing.assert_allclose(sampler.sigmas.numpy(), by_hand.sigmas.numpy(), rtol=1e-5)
    # Flux: the pipeline's σ = linspace(1, 1/N, N) with μ, then Karras between its ends (diffusers' order)
    flux = build_scheduler(
        FLUX, compose_cfg(["scheduler=flow_euler"]).scheduler, "flux", sampler_cfg={"sigmas": "karras"}
    )
    set_flow_timesteps(flux, 8, "cpu", image_seq_len=1024, family_name="flux")
    ref = diffusers.FlowMatchEulerDiscreteScheduler.from_config(FLUX, use_karras_sigmas=True)
    ref.set_timesteps(sigmas=np.linspace(1, 1 / 8, 8), mu=0.5 + (1.15 - 0.5) * (1024 - 256) / (4096 - 256))
    np.testing.assert_allclose(flux.sigmas.numpy(), ref.sigmas.numpy(), rtol=1e-5)
    sana = build_scheduler(SANA, compose_cfg([]).scheduler, "sana", sampler_cfg={"flow_shift": 2.0})
    assert sana.config.flow_shift == 2.0 and flow_shift(sana) == 2.0


# ---------------------------------------------------------------------------------------------- refusals
REFUSALS = [
    (["sampler.sigmas=ays"], r"sampler\.sigmas=ays: scheduler=native \(DDIMScheduler.*evenly spaced.*euler"),
    (["scheduler=unipc", "sampler.sigmas=ays"], r"sampler\.sigmas=ays.*use_flow_sigmas.*dpmpp_2m"),
    (["model=sd15_scheduler", "scheduler=euler", "sampler.sigmas=ays"], r"sigmas=ays.*scheduler-only.*sd \(Stab"),
    (["model=shapes_sd3", "sampler.sigmas=ays"], r"sampler\.sigmas=ays: the model is a rectified-flow.*karras"),
    (["sampler.sigmas=karras"], r"sampler\.sigmas=karras: .*DDIMScheduler.* has no use_karras_sigmas.*euler \("),
    (["scheduler=euler_ancestral", "sampler.sigmas=beta"], r"has no use_beta_sigmas.*heun \(HeunDiscrete"),
    (["sampler.flow_shift=3"], r"sampler\.flow_shift=3: the model is a diffusion model.*leave it null"),
    (["model=shapes_sd3", "sampler.timestep_spacing=trailing"], r"sampler\.timestep_spacing=trailing: .*rectified"),
    (["model=shapes_sd3", "sampler.zero_terminal_snr=true"], r"sampler\.zero_terminal_snr=true: .*ends at 1"),
    (["scheduler=pndm", "sampler.zero_terminal_snr=true"], r"PNDMScheduler.*no rescale_betas_zero_snr.*ddim \("),
    (
        ["scheduler=euler", "sampler.zero_terminal_snr=true", "sampler.timestep_spacing=leading"],
        r"sampler\.zero_terminal_snr=true with sampler\.timestep_spacing=leading.*trailing",
    ),
    (["sampler.zero_terminal_snr=true"], r"zero_terminal_snr=true: scheduler=native \(DDIM.*epsilon.*v-prediction"),
]


@pytest.mark.parametrize("overrides,match", REFUSALS, ids=[" ".join(o) for o, _ in REFUSALS])
def test_refusals_name_the_key_and_what_fits_before_any_weights(overrides, match, monkeypatch):
    monkeypatch.setattr(stages, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded before the refusal"))
    with pytest.raises(UserError, match=match):
        stages.check_model(compose_cfg(overrides))  # preflight: scheduler config and model_index.json only


def test_refusals_by_model_dict():
    euler = compose_cfg(["scheduler=euler"]).scheduler
    base = _sampler(["scheduler=euler"])[2]
    with pytest.raises(UserError, match=r"family 'pixart'.*no AYS list.*sd \(StableDiffusionSigmas\)"):
        build_scheduler(base, euler, model_index={"_class_name": "PixArtAlphaPipeline"}, sampler_cfg={"sigmas": "ays"})
    with pytest.raises(UserError, match=r"sampler\.flow_shift=2: .*resolution-dependent shift \(use_dynamic_shifting"):
        build_scheduler(FLUX, compose_cfg([]).scheduler, "flux", sampler_cfg={"flow_shift": 2.0})
    with pytest.raises(UserError, match=r"sampler\.sigmas=karras: .*on flow σ's \(use_flow_sigmas, Sana\).*default"):
        build_scheduler(SANA, compose_cfg([]).scheduler, "sana", sampler_cfg={"sigmas": "karras"})
    assert zoo_options(None) == zoo_options({}) == zoo_options({"num_inference_steps": 5})  # older saved configs
    assert SIGMA_OPTIONS == tuple(o.value for o in SigmaSchedule)


def test_schedule_zoo_resolver_follows_the_scheduler_option():
    sd, sd3 = str(locate("shapes_sd")), str(locate("shapes_sd3"))
    assert schedule_zoo(sd) == "default"  # its own DDIM
    assert schedule_zoo(sd, "EulerDiscreteScheduler", "diffusion") == "default,karras,exponential,beta,ays"
    assert schedule_zoo(sd, "UniPCMultistepScheduler", "diffusion") == "default,karras,exponential,beta"
    assert schedule_zoo(sd3) == "default,karras,exponential,beta"
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pipeline.config import CONF_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=schedule_zoo", "scheduler=heun"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert str(cfg.hydra.sweeper.params["sampler.sigmas"]) == "default,karras,exponential,beta,ays"
    assert str(cfg.hydra.sweeper.params["sampler.num_inference_steps"]) == "10,20,40"


# ---------------------------------------------------------------------------------------------- end to end
def test_schedule_mode_visits_karras_sigmas(outputs, tmp_path):
    overrides = ["mode=[schedule]", "scheduler=euler", "sampler.sigmas=karras", "sampler.num_inference_steps=10"]
    res = run_pipeline(compose_cfg([*overrides, "mode.schedule.compare=[]"], outputs), tmp_path / "run")
    assert res.status == "FINISHED"
    with (tmp_path / "run" / "tables" / "schedule_visited.csv").open() as f:
        ts = [float(r["t"]) for r in csv.DictReader(f)]
    _, option, base = _sampler(["scheduler=euler"])
    karras = _by_hand(base, option, use_karras_sigmas=True)
    karras.set_timesteps(10)
    np.testing.assert_allclose(ts, karras.timesteps.double().numpy(), rtol=1e-6)
    plain = _by_hand(base, option)
    plain.set_timesteps(10)
    assert abs(ts[-1] - float(plain.timesteps[-1])) > 0 or abs(ts[1] - float(plain.timesteps[1])) > 1
