"""Every option of every config group composes; the schema rejects misspelled keys and wrong types."""

from __future__ import annotations

import pytest
from conftest import compose_cfg
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, ValidationError

from pipeline.config import CONF_DIR
from pipeline.core.registry import MODE_PACKAGES, MODES, load_modes
from pipeline.errors import UserError
from pipeline.models.builtin import builtin_path
from pipeline.models.loading import load_scheduler_config
from pipeline.models.schedulers import DIFFUSION_SOLVERS, FLOW_SOLVERS, build_scheduler

GROUPS = ["model", "dataset", "scheduler", "mode", "features", "tracking", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
SCHEDULERS = sorted(p.stem for p in (CONF_DIR / "scheduler").glob("*.yaml"))
FAMILY = {name: OmegaConf.load(CONF_DIR / "scheduler" / f"{name}.yaml").family for name in SCHEDULERS}
DIFFUSION = [name for name in SCHEDULERS if FAMILY[name] == "diffusion"]
COMPOSE_ERRORS = (ConfigCompositionException, ConfigKeyError, ValidationError, UserError)  # UserError: named first


def test_scheduler_options_are_exactly_the_documented_ones():
    assert SCHEDULERS == sorted(
        [
            "native",
            "ddpm",
            "ddim",
            "pndm",
            "euler",
            "euler_ancestral",
            "heun",
            "dpmpp_2m",
            "unipc",
            "flow_euler",
            "flow_heun",
            "flow_dpmpp_2m",
            "flow_unipc",
        ]
    )
    assert compose_cfg([]).scheduler.name == "native"  # the default for every model
    # the sweep lists of ${family_solvers:...} are the options of each family (ddpm, 1000-step ancestral, left out)
    assert sorted(DIFFUSION_SOLVERS) == sorted(n for n in DIFFUSION if n != "ddpm")
    assert sorted(FLOW_SOLVERS) == sorted(n for n in SCHEDULERS if FAMILY[n] == "flow")
    assert [n for n in SCHEDULERS if FAMILY[n] == "native"] == ["native"]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    listed = group in ("mode", "features")  # groups where several options are selected at once
    cfg = compose_cfg([f"{group}=[{option}]" if listed else f"{group}={option}"])
    if group == "experiment":
        return
    block = cfg[group][option] if listed else cfg[group]
    assert block is not None
    if group in ("model", "dataset", "scheduler", "features"):
        assert block.name == option


@pytest.mark.parametrize("option", DIFFUSION)
@pytest.mark.parametrize("model", ["sd15_scheduler", "ddpm_cifar10_scheduler"])
def test_every_scheduler_builds_from_the_models_config(option, model):
    cfg = compose_cfg([f"scheduler={option}"])
    base, source = load_scheduler_config(builtin_path(model))
    sched = build_scheduler(base, cfg.scheduler, source)
    assert type(sched).__name__ == cfg.scheduler.cls
    # spacing pinned the same way for every solver: a sweep changes only the solver
    assert sched.config.timestep_spacing == "leading" and sched.config.steps_offset == 1
    # the model's schedule is kept, not the solver class's defaults
    assert sched.config.beta_schedule == base["beta_schedule"] and sched.config.beta_end == base["beta_end"]
    sched.set_timesteps(10)
    assert len(sched.timesteps) >= 10


def test_dpmpp_2m_is_dpmsolver_plus_plus_order_2():
    cfg = compose_cfg(["scheduler=dpmpp_2m"])
    sched = build_scheduler(load_scheduler_config(builtin_path("sd15_scheduler"))[0], cfg.scheduler)
    assert type(sched).__name__ == "DPMSolverMultistepScheduler"
    assert sched.config.algorithm_type == "dpmsolver++" and sched.config.solver_order == 2


def test_required_values_are_missing_until_set():
    assert OmegaConf.is_missing(compose_cfg(["model=hub"]).model, "path")
    assert compose_cfg(["model=hub", "model.path=org/name"]).model.path == "org/name"


def _schema_leaves(node, prefix=""):
    """``{dotted path: is MISSING}`` of every leaf of a structured default; a nested dataclass default is walked into."""
    out = {}
    for key in node:
        path = f"{prefix}{key}"
        if not OmegaConf.is_missing(node, key) and isinstance(node[key], DictConfig):
            out.update(_schema_leaves(node[key], f"{path}."))
        else:
            out[path] = OmegaConf.is_missing(node, key)
    return out


def _yaml_leaves(node, schema, prefix=""):
    """Dotted paths a yaml sets, walked into where the schema has a nested default (its leaves are ``schema``'s)."""
    out = set()
    for key in node:
        path = f"{prefix}{key}"
        nested = key in schema and not OmegaConf.is_missing(schema, key) and isinstance(schema[key], DictConfig)
        if nested and isinstance(node[key], DictConfig):
            out |= _yaml_leaves(node[key], schema[key], f"{path}.")
        else:
            out.add(path)
    return out


@pytest.mark.parametrize("mode", MODE_PACKAGES)
def test_every_mode_default_is_written_once_in_its_yaml(mode):
    """Each default is written once: a mode's schema only types its keys (every leaf MISSING) and
    conf/mode/<mode>.yaml sets every one of them (where its comment lives), and no key the schema lacks."""
    load_modes()
    assert sorted(MODES) == sorted(MODE_PACKAGES) == sorted(p.stem for p in (CONF_DIR / "mode").glob("*.yaml"))
    schema = OmegaConf.structured(MODES[mode].schema)
    leaves = _schema_leaves(schema)
    with_default = sorted(path for path, missing in leaves.items() if not missing)
    assert not with_default, f"{mode}: schema defaults (belong in conf/mode/{mode}.yaml): {with_default}"
    written = _yaml_leaves(OmegaConf.load(CONF_DIR / "mode" / f"{mode}.yaml"), schema)
    assert not sorted(set(leaves) - written), f"conf/mode/{mode}.yaml lacks {sorted(set(leaves) - written)}"
    assert not sorted(written - set(leaves)), (
        f"conf/mode/{mode}.yaml sets keys its schema lacks: {sorted(written - set(leaves))}"
    )
    block = compose_cfg([f"mode=[{mode}]"]).mode[mode]  # the yaml's values pass the schema's types
    OmegaConf.to_container(block, throw_on_missing=True)  # and leave no ??? behind


@pytest.mark.parametrize(
    "override",
    [
        "sampler.num_inference_stepz=5",  # misspelled key
        "sampler.num_inference_steps=many",  # wrong type
        "model.dtype=float64",  # not an allowed dtype
        "mode.schedule.compare=[linear,cosine]",  # unknown schedule name
        "mode.schedule.comapre=[linear]",  # misspelled mode key
        "scheduler=ddim_fast",  # unknown group option
        "scheduler.timestep_spacing=uniform",  # not a diffusers spacing
    ],
)
def test_bad_overrides_fail_at_composition(override):
    with pytest.raises(COMPOSE_ERRORS):
        cfg = compose_cfg([override])
        OmegaConf.to_container(cfg, resolve=True)  # some checks fire on access


def test_experiment_preset_overrides_only_what_changes():
    cfg = compose_cfg(["experiment=zero_snr"])
    assert cfg.scheduler.timestep_spacing.value == "trailing" and cfg.scheduler.options.rescale_betas_zero_snr
    assert cfg.scheduler.name == "native" and cfg.scheduler.cls is None  # untouched: the model's own solver
    assert compose_cfg(["experiment=zero_snr", "scheduler=ddim"]).scheduler.cls == "DDIMScheduler"


def test_a_key_added_with_plus_that_the_schema_lacks_is_rejected_naming_the_closest():
    """Hydra's `+` adds keys under open_dict, past the struct check: checked after composition instead."""
    from pipeline.errors import UserError

    for override, closest in [
        ("+sampler.num_inference_step=5", "sampler.num_inference_steps"),
        ("+num_inference_steps=5", "sampler.num_inference_steps"),  # the wrong level
        ("+features.shapes_net.rezise=bicubic", "features.shapes_net.resize"),
        ("+mode.schedule.comapre=[linear]", "mode.schedule.compare"),
    ]:
        with pytest.raises(
            UserError, match=rf"{override[1:].split('=')[0]}: unknown config key; did you mean {closest}\?"
        ):
            compose_cfg([override])
    assert compose_cfg(["+scheduler.options.foo=1"]).scheduler.options.foo == 1  # free-form by design


def test_each_dataset_kind_has_its_own_keys(tmp_path):
    """`dataset=folder dataset.p_two=0.3` is refused naming the key and the kind, before Hydra and after it (a `+`
    key, a saved config); the OOD block names its kind in its yaml and takes that kind's keys."""
    from pipeline.config import FolderDatasetConfig, ShapesDatasetConfig, check_config, to_plain, validate

    for overrides, key, kind in [
        (["dataset=folder", "dataset.p_two=0.3"], "dataset.p_two", "folder"),
        (["dataset=folder", "+dataset.split=val"], "dataset.split", "folder"),
        (["dataset.root=/data"], "dataset.root", "shapes"),
    ]:
        with pytest.raises(UserError, match=rf"{key}: unknown config key of dataset kind '{kind}'"):
            compose_cfg(overrides)
    folder = compose_cfg(["dataset=folder", "dataset.root=/data"])
    assert OmegaConf.get_type(folder.dataset) is FolderDatasetConfig and "p_two" not in folder.dataset
    assert OmegaConf.get_type(compose_cfg([]).dataset) is ShapesDatasetConfig
    saved = to_plain(folder)
    assert OmegaConf.get_type(validate(saved).dataset) is FolderDatasetConfig  # a resumed run's config, retyped
    saved["dataset"]["p_two"] = 0.3
    with pytest.raises(UserError, match="dataset.p_two: unknown config key of dataset kind 'folder'"):
        check_config(saved)
    ood = compose_cfg(["mode=[latent]", "mode.latent.ood_dataset.kind=folder", "mode.latent.ood_dataset.root=/data"])
    assert ood.mode.latent.ood_dataset.root == "/data"
    import yaml

    from pipeline.config import load_saved

    old = to_plain(compose_cfg([]))  # saved before the split: every kind's keys, the other kind's never read
    old["dataset"].update(root=None, captions_file="captions.jsonl")
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    assert "root" not in load_saved(tmp_path / "old.yaml")["dataset"]
    old["dataset"]["p_tw"] = 0.3
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(UserError, match="dataset.p_tw: unknown config key"):
        load_saved(tmp_path / "old.yaml")


def test_run_pipeline_rejects_an_unknown_key_before_any_mlflow_run(tmp_path):
    from pipeline.errors import UserError
    from pipeline.run.runner import run_pipeline

    cfg = compose_cfg(["+scheduler.options.foo=1"], outputs=tmp_path)
    with open_dict(cfg):  # what Hydra does with `+sampler.num_inference_step=5`
        OmegaConf.update(cfg, "sampler.num_inference_step", 5, force_add=True)
    with pytest.raises(UserError, match="sampler.num_inference_step: unknown config key"):
        run_pipeline(cfg, tmp_path / "run")
    assert not (tmp_path / "mlflow.db").exists()


def test_every_job_of_a_multirun_is_checked_before_the_first_starts():
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from pipeline.config import check_sweep, register_configs
    from pipeline.errors import UserError

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        compose = GlobalHydra.instance().hydra.compose_config  # what `python -m pipeline -m ...` composes
        check_sweep(
            compose("config", ["scheduler=ddim,euler", "+scheduler.options.foo=1,2"], run_mode=RunMode.MULTIRUN)
        )
        master = compose(
            "config", ["scheduler=ddim,euler", "+sampler.num_inference_step=5,10"], run_mode=RunMode.MULTIRUN
        )
        with pytest.raises(
            UserError,
            match=r"sweep job scheduler=ddim \+sampler.num_inference_step=5: sampler.num_inference_step: "
            r"unknown config key; did you mean sampler.num_inference_steps\?",
        ):
            check_sweep(master)
        # the runner's preflight of every job (pipeline.run.runner.SweepPreflight, the callback before the MLflow one):
        # one job whose solver does not fit the model refuses the whole sweep, naming the job
        impossible = compose(
            "config",
            ["model=sd15_scheduler", "mode=[schedule]", "scheduler=ddim,flow_euler"],
            run_mode=RunMode.MULTIRUN,
        )
        assert list(impossible.hydra.callbacks) == ["preflight", "mlflow_sweep"]
        from pipeline.run.runner import SweepPreflight

        with pytest.raises(SystemExit) as exit_:
            SweepPreflight().on_multirun_start(impossible)
        assert exit_.value.code == 2
        with pytest.raises(UserError, match=r"sweep job scheduler=flow_euler: scheduler=flow_euler: a rectified-flow"):
            from pipeline.run.runner import preflight

            check_sweep(impossible, job_check=preflight)


def test_an_unknown_mode_in_a_list_names_the_valid_modes(capsys):
    from pipeline.__main__ import _check_overrides
    from pipeline.errors import UserError

    modes = "available options in 'mode': attention, latent, metrics, schedule"
    with pytest.raises(UserError, match=rf"unknown mode option 'metric' \(did you mean 'metrics'\?\); {modes}"):
        compose_cfg(["mode=[metric]"])
    with pytest.raises(UserError, match="unknown features option 'incepton'"):
        compose_cfg(["features=[shapes_net,incepton]"])
    with pytest.raises(SystemExit) as exit_:  # the CLI, before Hydra composes anything (sweeps too)
        _check_overrides(["-m", "mode=[schedule],[metric]"])
    assert exit_.value.code == 2 and modes in capsys.readouterr().err
