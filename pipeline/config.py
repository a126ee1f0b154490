"""Structured-config schema for every config group.

Registered in Hydra's ConfigStore as ``base_config`` (the first entry of ``conf/config.yaml``'s defaults), so
a misspelled key or a wrong type in any group fails at composition with Hydra's own message, before any
work starts. Each mode's block ``mode.<name>`` is validated by the schema its package registers
(``pipeline/<name>/mode.py``; its defaults are in ``conf/mode/<name>.yaml``).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class Dtype(str, enum.Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class SolverFamily(str, enum.Enum):
    native = "native"
    diffusion = "diffusion"
    flow = "flow"


class TimestepSpacing(str, enum.Enum):
    leading = "leading"
    trailing = "trailing"
    linspace = "linspace"


class DatasetKind(str, enum.Enum):
    shapes = "shapes"
    folder = "folder"


class ResizeMode(str, enum.Enum):
    # recorded with every score. bilinear_tf1 = TF1 legacy bilinear (no half-pixel shift): torch-fidelity /
    # TF-FID / torchmetrics FID with antialias=False; bilinear = torch's align_corners=False (pytorch-fid)
    bilinear_tf1 = "bilinear_tf1"
    bilinear = "bilinear"
    bilinear_antialias = "bilinear_antialias"
    bicubic = "bicubic"
    bicubic_antialias = "bicubic_antialias"
    nearest = "nearest"
    bicubic_tf2 = "bicubic_tf2"  # TF2 tf.image.resize bicubic, no antialias (CMMD, features=[clip336])


@dataclass
class ModelConfig:
    name: str = MISSING
    path: str = MISSING  # hub id or local directory
    dtype: Dtype = Dtype.float32
    device: str = "auto"  # auto = cuda if available else cpu
    allow_pickle: bool = False  # load *.bin / *.ckpt weights (pickle can execute code): explicit opt-in
    variant: Optional[str] = None
    revision: Optional[str] = None


@dataclass
class DatasetConfig:
    name: str = MISSING
    kind: DatasetKind = MISSING
    root: Optional[str] = None  # folder datasets
    captions_file: str = "captions.jsonl"
    split: str = "test"
    num_images: int = 1000
    size: int = 32
    seed: int = 0
    shapes: List[str] = field(default_factory=list)
    colours: List[str] = field(default_factory=list)
    p_two: float = 0.5  # shapes: probability of a two-object image


@dataclass
class SchedulerConfig:
    name: str = MISSING
    # what the option solves (pipeline/models/schedulers.py): native = the model's own scheduler untouched;
    # diffusion = a DDPM-family solver (refused on flow models); flow = a rectified-flow solver (refused on others)
    family: SolverFamily = SolverFamily.diffusion
    cls: Optional[str] = None  # diffusers class, built with from_config(<model's scheduler config>); None = the model's
    timestep_spacing: Optional[TimestepSpacing] = None  # None = keep the model's value
    steps_offset: Optional[int] = None  # None = keep the model's value
    options: Dict[str, Any] = field(default_factory=dict)  # further keys this solver sets


@dataclass
class SamplerConfig:
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    batch_size: int = 16
    eta: float = 0.0  # DDIM-type solvers only (a UserError for solvers whose step() takes none)
    height: Optional[int] = None  # pixels; default: the model's native size
    width: Optional[int] = None


@dataclass
class FeaturesConfig:
    name: str = MISSING
    model: Optional[str] = None  # hub id / local dir (clip, dinov2) or zoo name
    weights_path: Optional[str] = None  # local weights file (inception)
    resize: ResizeMode = ResizeMode.bilinear
    image_size: Optional[int] = None
    batch_size: int = 64


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None = embedded SQLite at <paths.outputs>/mlflow.db
    experiment: str = "diffusion-lens"
    run_name: Optional[str] = None
    connect_timeout_s: float = 5.0


@dataclass
class PathsConfig:
    outputs: str = "outputs"
    cache: str = "${paths.outputs}/cache"


def build_schema() -> type:
    """The top-level schema; ``mode`` gets one optional field per registered mode."""
    from pipeline.registry import MODES, load_modes

    load_modes()  # each mode package's schema (pipeline/<M>/mode.py), not its stages

    mode_fields = [(name, Optional[m.schema], field(default=None)) for name, m in sorted(MODES.items())]
    ModeConfig = make_dataclass("ModeConfig", mode_fields)

    return make_dataclass(
        "Config",
        [
            ("model", ModelConfig, field(default_factory=ModelConfig)),
            ("dataset", DatasetConfig, field(default_factory=DatasetConfig)),
            ("scheduler", SchedulerConfig, field(default_factory=SchedulerConfig)),
            ("sampler", SamplerConfig, field(default_factory=SamplerConfig)),
            ("features", Dict[str, FeaturesConfig], field(default_factory=dict)),  # several: features=[a,b], first = primary
            ("tracking", TrackingConfig, field(default_factory=TrackingConfig)),
            ("paths", PathsConfig, field(default_factory=PathsConfig)),
            ("mode", ModeConfig, field(default_factory=ModeConfig)),
            ("seed", int, field(default=0)),
        ],
    )


_REGISTERED = False


def register_configs() -> None:
    """Store the schema in Hydra's ConfigStore and register resolvers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from pipeline.models.builtin import register_resolvers

    register_resolvers()
    ConfigStore.instance().store(name="base_config", node=build_schema())
    _REGISTERED = True


def compose_config(overrides=()) -> Any:
    """conf/config.yaml composed with command-line style ``overrides``, as the CLI would (Hydra's compose API;
    for tests, benchmarks and notebooks), with the CLI's checks: :func:`check_list_choices` before composing,
    :func:`check_keys` after."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    check_list_choices(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    check_keys(cfg)
    return cfg


def validate(cfg: Any) -> Any:
    """Merge a plain (e.g. saved, resolved) config onto the schema: the same checks composition does."""
    register_configs()
    schema = OmegaConf.structured(build_schema())
    return OmegaConf.merge(schema, cfg)


def to_plain(cfg: Any, resolve: bool = True) -> dict:
    """Plain containers (enums as strings); with ``resolve`` a ``???`` raises MissingMandatoryValue."""
    return OmegaConf.to_container(cfg, resolve=resolve, enum_to_str=True, throw_on_missing=resolve)


# --------------------------------------------------------------------------------------------- strictness
# Hydra's `+key=value` (and `++key=value`) adds a key under open_dict semantics, so a schema's struct flag never
# sees it: `+sampler.num_inference_step=5` (the spelling Hydra's own "Key ... is not in struct" hint suggests)
# would compose, be ignored, and be saved next to the real key. check_keys compares the composed key paths with
# the schema after composition instead.
FREE_FORM = ("scheduler.options",)  # every key is passed on to the solver
IGNORED = ("hydra",)  # Hydra's own node (the launcher, sweeper, job settings): Hydra validates it


def _unwrap(tp: Any) -> Any:
    """``Optional[X]`` -> ``X``."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else Any
    return tp


def _fields(tp: type) -> dict[str, Any]:
    hints = typing.get_type_hints(tp)
    return {f.name: hints[f.name] for f in dataclasses.fields(tp)}


def _walk(node: Any, tp: Any, path: str, unknown: list, valid: list) -> None:
    """Append ``(path, sibling keys)`` of every key of ``node`` that schema type ``tp`` lacks to ``unknown`` and
    every valid path to ``valid``."""
    tp = _unwrap(tp)
    if path in FREE_FORM or tp is Any:
        return
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        fields = _fields(tp)
        node = node if isinstance(node, Mapping) else {}
        for key, field_type in fields.items():  # every valid path, also of unselected modes (for suggestions)
            sub = f"{path}.{key}" if path else key
            valid.append(sub)
            _walk(node.get(key), field_type, sub, unknown, valid)
        for key in node:
            if key not in fields and not (not path and key in IGNORED):
                unknown.append((f"{path}.{key}" if path else str(key), list(fields)))
    elif origin in (dict, Dict) and isinstance(node, Mapping):  # e.g. features: Dict[str, FeaturesConfig]
        for key, value in node.items():
            _walk(value, typing.get_args(tp)[1], f"{path}.{key}", unknown, valid)
    elif origin in (list, List) and isinstance(node, Sequence) and not isinstance(node, str):
        for i, value in enumerate(node):
            _walk(value, typing.get_args(tp)[0], f"{path}[{i}]", unknown, valid)


def unknown_keys(cfg: Any) -> list[tuple[str, Optional[str]]]:
    """``(key path, closest valid path or None)`` for every key of ``cfg`` (a composed config or a plain dict) that
    the schema does not have: the top-level schema, each selected mode's schema for ``mode.<name>``, the
    :class:`FeaturesConfig` schema for each ``features.<name>``. ``scheduler.options`` is free-form and ``hydra``
    is left to Hydra."""
    register_configs()
    tree = cfg if isinstance(cfg, Mapping) and not OmegaConf.is_config(cfg) else OmegaConf.to_container(cfg, resolve=False)
    unknown: list = []
    valid: list = []
    _walk(tree, build_schema(), "", unknown, valid)
    out = []
    for path, siblings in unknown:
        parent, _, key = path.rpartition(".")
        close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
        if close:
            best = f"{parent}.{close[0]}" if parent else close[0]
        else:  # the right name at the wrong level (`+num_inference_steps=5`), or any close full path
            same_leaf = difflib.get_close_matches(key, sorted({v.rpartition(".")[2] for v in valid}), n=1, cutoff=0.8)
            at = [v for v in valid if same_leaf and v.rpartition(".")[2] == same_leaf[0]]
            close = at or difflib.get_close_matches(path, valid, n=1, cutoff=0.6)
            best = close[0] if close else None
        out.append((path, best))
    return out


def check_keys(cfg: Any, where: str = "") -> None:
    """Raise a UserError naming every key of ``cfg`` the schema does not have (:func:`unknown_keys`) and the
    closest valid key. ``where`` prefixes the message (e.g. the sweep job)."""
    from pipeline.errors import UserError

    bad = unknown_keys(cfg)
    if bad:
        parts = [f"{path}: unknown config key" + (f"; did you mean {best}?" if best else "") for path, best in bad]
        raise UserError(f"{where}{'; '.join(parts)} (a '+' override cannot add keys the schema lacks; only "
                        f"{', '.join(FREE_FORM)} takes free-form keys)")


def group_options(group: str) -> list[str]:
    """The options of config group ``group``: its yaml files in conf/ and any ConfigStore entries."""
    from hydra.core.config_store import ConfigStore

    names = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
    try:
        names |= {n[:-5] if n.endswith(".yaml") else n for n in ConfigStore.instance().list(group)}
    except OSError:  # no such group in the ConfigStore
        pass
    return sorted(names)


def check_list_choices(overrides: Sequence[str]) -> None:
    """Every element of a list-valued group choice (``mode=[metric]``, ``features=[incepton,clip]``, also inside a
    sweep) must be an option of its group. Hydra lists a group's options when a single choice is unknown
    (``scheduler=eular``) but says only "Could not load 'mode/metric'" for an element of a list; this names the
    valid options the same way. Overrides Hydra cannot parse are left to Hydra's own message."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from pipeline.errors import UserError

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # noqa: BLE001 - Hydra reports its own parse errors
        return
    for o in parsed:
        group = o.key_or_group
        if o.is_delete() or o.package or group.startswith("hydra") or not (CONF_DIR / group).is_dir():
            continue
        try:
            values = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
        except Exception:  # noqa: BLE001 - ranges, globs, intervals: not lists of options
            continue
        options = group_options(group)
        for value in values:
            if not isinstance(value, list):
                continue  # a single option: Hydra's message already lists the options
            bad = [str(v) for v in value if str(v) not in options]
            if bad:
                hint = difflib.get_close_matches(bad[0], options, n=1)
                raise UserError(f"{o.input_line}: unknown {group} option {bad[0]!r}"
                                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                                + f"; available options in '{group}': {', '.join(options)}")


def check_sweep(config: Any) -> None:
    """:func:`check_keys` for every job of a multirun before the first one starts (from
    :class:`pipeline.tracking.SweepCallback`): the master config, and, where a swept override adds keys
    (``+key=a,b``), each job's config composed as Hydra's basic sweeper composes it. Jobs that do not compose
    are left to Hydra's own validation of the batch, which follows."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    check_keys(config)
    gh = GlobalHydra.instance()
    if not gh.is_initialized() or "BasicSweeper" not in str(OmegaConf.select(config, "hydra.sweeper._target_")):
        return
    loader = gh.config_loader()
    try:  # as BasicSweeper.sweep builds its job list
        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        args = [f"{k}={v}" for k, v in params.items()] + list(OmegaConf.select(config, "hydra.overrides.task") or [])
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(args)
    except Exception:  # noqa: BLE001 - an unresolvable sweep list: the sweeper reports it
        return
    if not any(o.is_sweep_override() and (o.is_add() or o.is_force_add()) for o in parsed):
        return  # non-swept `+` overrides are in the master config, checked above
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    for batch in BasicSweeper.split_arguments(parsed, None):
        for job in batch:
            try:
                job_cfg = loader.load_sweep_config(config, list(job))
            except Exception:  # noqa: BLE001 - Hydra's validation of the batch reports it
                continue
            check_keys(job_cfg, where=f"sweep job {' '.join(j for j in job if j.split('=')[0] in swept)}: ")
