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
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from pipeline.core.registry import MODES, load_modes
from pipeline.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
SEED_LIMIT = 2**32  # numpy's seed range; torch's generators take it too (a seed is drawn from [0, 2**32))


@dataclass(frozen=True)
class Bounds:
    """The range a numeric config value must lie in, checked by :func:`check_values` where the schema is checked
    (composition, a resumed or reproduced run's saved config), before any work or MLflow run. Every float must be
    finite as well. ``ge``/``gt``/``le``/``lt``: inclusive/exclusive limits; ``note``: what the value means."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str = ""

    def violated(self, v: float) -> bool:
        return (
            (self.ge is not None and not v >= self.ge)
            or (self.gt is not None and not v > self.gt)
            or (self.le is not None and not v <= self.le)
            or (self.lt is not None and not v < self.lt)
        )

    def describe(self) -> str:
        lo = f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}" if self.gt is not None else ""
        hi = f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}" if self.lt is not None else ""
        if self.lt == SEED_LIMIT:
            hi = "< 2**32"
        return " and ".join(p for p in (lo, hi) if p) or "a finite number"


def bounded(default: Any = MISSING, **limits: Any) -> Any:
    """A dataclass field whose value must lie in ``Bounds(**limits)`` (:func:`check_values`)."""
    return field(default=default, metadata={"bounds": Bounds(**limits)})


AT_LEAST_1 = {"ge": 1}


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


class SigmaSchedule(str, enum.Enum):
    # sampler.sigmas (pipeline/models/schedulers.py, "the schedule zoo"): default = the solver's own σ's; karras /
    # exponential / beta = diffusers' use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas; ays = Align Your
    # Steps (Sabour et al. 2024), diffusers' AysSchedules lists (sd, sdxl)
    default = "default"
    karras = "karras"
    exponential = "exponential"
    beta = "beta"
    ays = "ays"


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
class DatasetBase:
    """The keys of every dataset block; each kind's schema (:data:`DATASET_SCHEMAS`) adds its own. ``dataset`` is
    typed by its kind's schema: conf/dataset/<option>.yaml names it in its defaults list (``/schema/dataset/<kind>``)."""

    name: str = MISSING
    kind: DatasetKind = MISSING
    num_images: int = bounded(1000, ge=1)


@dataclass
class ShapesDatasetConfig(DatasetBase):
    split: str = "test"
    size: int = bounded(32, ge=1)
    seed: int = bounded(0, ge=0, lt=SEED_LIMIT)
    shapes: List[str] = field(default_factory=list)
    colours: List[str] = field(default_factory=list)
    p_two: float = bounded(0.5, ge=0, le=1)  # probability of a two-object image


@dataclass
class FolderDatasetConfig(DatasetBase):
    root: Optional[str] = None
    captions_file: str = "captions.jsonl"


@dataclass
class DatasetConfig(ShapesDatasetConfig, FolderDatasetConfig):
    """Any kind's keys: a dataset block whose kind is set in the same yaml (``mode.latent.ood_dataset``)."""


DATASET_SCHEMAS: dict[str, type] = {"shapes": ShapesDatasetConfig, "folder": FolderDatasetConfig}


@dataclass
class SchedulerConfig:
    name: str = MISSING
    # what the option solves (pipeline/models/schedulers.py): native = the model's own scheduler untouched;
    # diffusion = a DDPM-family solver (refused on flow models); flow = a rectified-flow solver (refused on others)
    family: SolverFamily = SolverFamily.diffusion
    cls: Optional[str] = None  # diffusers class, built with from_config(<model's scheduler config>); None = the model's
    timestep_spacing: Optional[TimestepSpacing] = None  # None = keep the model's value
    steps_offset: Optional[int] = bounded(None, ge=0)  # None = keep the model's value
    options: Dict[str, Any] = field(default_factory=dict)  # further keys this solver sets


@dataclass
class SamplerConfig:
    num_inference_steps: int = bounded(25, ge=1)
    # diffusers' convention: classifier-free guidance only when g > 1; 0 <= g <= 1 = the conditional prediction alone
    # (Flux.1 and LCM-style UNets embed g instead: see README, Guidance); negative or non-finite values are refused
    guidance_scale: float = bounded(7.5, ge=0, note="g > 1 = classifier-free guidance, 0..1 = none")
    batch_size: int = bounded(16, ge=1)
    eta: float = bounded(0.0, ge=0, le=1)  # DDIM-type solvers only (a UserError for solvers whose step() takes none)
    height: Optional[int] = bounded(None, ge=1)  # pixels; default: the model's native size
    width: Optional[int] = bounded(None, ge=1)
    # the schedule zoo (pipeline/models/schedulers.py; docs/modes/schedule.md): the defaults keep the solver's own
    # time steps, so a saved config without these keys means what it meant
    sigmas: SigmaSchedule = SigmaSchedule.default
    timestep_spacing: Optional[TimestepSpacing] = None  # None = scheduler.timestep_spacing, else the model's
    zero_terminal_snr: bool = False  # rescale_betas_zero_snr + trailing spacing (Lin et al., WACV 2024)
    flow_shift: Optional[float] = bounded(None, gt=0)  # static-shift flow models: the shift s; None = the model's


@dataclass
class FeaturesConfig:
    name: str = MISSING
    model: Optional[str] = None  # hub id / local dir (clip, dinov2) or zoo name
    weights_path: Optional[str] = None  # local weights file (inception)
    resize: ResizeMode = ResizeMode.bilinear
    image_size: Optional[int] = bounded(None, ge=1)
    batch_size: int = bounded(64, ge=1)


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None = embedded SQLite at <paths.outputs>/mlflow.db
    experiment: str = "diffusion-lens"
    run_name: Optional[str] = None
    connect_timeout_s: float = bounded(5.0, gt=0)
    # MLflow system metrics (CPU, memory, disk, network; GPUs with nvidia-ml-py) on the run's System metrics tab
    system_metrics: bool = True
    system_metrics_interval_s: float = bounded(2.0, gt=0)  # one sample per interval (and one when the run ends)


@dataclass
class PathsConfig:
    outputs: str = "outputs"
    cache: str = "${paths.outputs}/cache"


def build_schema() -> type:
    """The top-level schema; ``mode`` gets one optional field per registered mode."""

    load_modes()  # each mode package's schema (pipeline/<M>/mode.py), not its stages

    mode_fields = [(name, Optional[m.schema], field(default=None)) for name, m in sorted(MODES.items())]
    ModeConfig = make_dataclass("ModeConfig", mode_fields)

    return make_dataclass(
        "Config",
        [
            ("model", ModelConfig, field(default_factory=ModelConfig)),
            ("dataset", DatasetBase, field(default_factory=DatasetBase)),  # retyped by its kind (DATASET_SCHEMAS)
            ("scheduler", SchedulerConfig, field(default_factory=SchedulerConfig)),
            ("sampler", SamplerConfig, field(default_factory=SamplerConfig)),
            (
                "features",
                Dict[str, FeaturesConfig],
                field(default_factory=dict),
            ),  # several: features=[a,b], first = primary
            ("tracking", TrackingConfig, field(default_factory=TrackingConfig)),
            ("paths", PathsConfig, field(default_factory=PathsConfig)),
            ("mode", ModeConfig, field(default_factory=ModeConfig)),
            ("seed", int, bounded(0, ge=0, lt=SEED_LIMIT)),
        ],
    )


_REGISTERED = False


def register_configs() -> None:
    """Store the schema in Hydra's ConfigStore and register resolvers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    # the one import up the layers: the yaml resolvers (${zoo:…}, ${family_solvers:…}) read model directories, and
    # registering them here gives every way of composing (CLI, compose_config, tests) the same resolvers
    from pipeline.models.builtin import register_resolvers

    register_resolvers()
    ConfigStore.instance().store(name="base_config", node=build_schema())
    for kind, schema in DATASET_SCHEMAS.items():  # conf/dataset/<option>.yaml: `- /schema/dataset/<kind>@_here_`
        ConfigStore.instance().store(group="schema/dataset", name=kind, node=schema)
    _REGISTERED = True


def compose_config(overrides=()) -> Any:
    """conf/config.yaml composed with command-line style ``overrides``, as the CLI would (Hydra's compose API;
    for tests, benchmarks and notebooks), with the CLI's checks: :func:`check_list_choices` before composing,
    :func:`check_config` (keys and value ranges) after."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    check_list_choices(overrides)
    check_override_keys(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    check_config(cfg)
    return cfg


def validate(cfg: Any) -> Any:
    """Merge a plain (e.g. saved, resolved) config onto the schema: the same checks composition does."""
    register_configs()
    schema = OmegaConf.structured(build_schema())
    kind = OmegaConf.select(OmegaConf.create(cfg), "dataset.kind", default=None) if cfg is not None else None
    kind = str(getattr(kind, "value", kind))
    if kind in DATASET_SCHEMAS:  # the dataset block typed by its kind's schema, as composition types it
        schema = OmegaConf.merge(schema, {"dataset": OmegaConf.structured(DATASET_SCHEMAS[kind])})
    return OmegaConf.merge(schema, cfg)


# ------------------------------------------------------------------------------------------ saved files are data
# Keys Hydra's instantiate() acts on: never accepted from a file the project reads back.
INSTANTIATE_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")
# Where a rebuilt run writes and logs: from the command line or the project's defaults, never from a run dir.
INVOCATION_KEYS = ("paths", "tracking.uri", "tracking.connect_timeout_s")


def _refuse_markup(node: Any, path: str, file: str) -> None:
    """A saved, resolved config holds plain values: an interpolation (``${oc.env:SECRET}``) or an instantiate key
    (``_target_``) in it was planted, and is refused naming the key and the file."""

    if isinstance(node, Mapping):
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            if not isinstance(key, str):
                raise UserError(f"{file}: key {sub!r} is not a string; a saved config holds string keys only")
            if key in INSTANTIATE_KEYS:
                raise UserError(f"{file}: {sub}: refused; a saved config is data and is never instantiated")
            _refuse_markup(value, sub, file)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _refuse_markup(value, f"{path}[{i}]", file)
    elif isinstance(node, str) and "${" in node:
        raise UserError(
            f"{file}: {path}={node[:80]!r}: refused; a saved config holds resolved values, and an "
            "interpolation in it is never resolved again (it would read the environment or other keys)"
        )
    elif node is not None and not isinstance(node, (str, int, float, bool)):
        raise UserError(f"{file}: {path}: a {type(node).__name__} where a saved config holds plain values")


def load_saved(file: str | Path) -> dict:
    """A run dir's ``config_resolved.yaml`` read as plain data (YAML's safe loader: no tags, no objects), checked:
    a mapping, no interpolation, no instantiate key, no key the schema lacks, no value outside its range — each
    refused with a UserError naming the key and the file. The invocation's own keys (:data:`INVOCATION_KEYS`:
    where outputs, caches and the tracking store are) are dropped: :func:`rebuild` takes them from the command line
    or the project's defaults."""
    import yaml

    file = Path(file)
    try:
        tree = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(
            f"{file}: cannot read a saved config ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    if not isinstance(tree, Mapping):
        raise UserError(f"{file}: expected a mapping of config groups (model, dataset, ...), got {type(tree).__name__}")
    if "hydra" in tree:
        raise UserError(f"{file}: hydra: refused; Hydra's own settings come from the project's config, not a run dir")
    _refuse_markup(tree, "", str(file))
    tree = dict(tree)
    tree.pop("paths", None)
    if isinstance(tree.get("tracking"), Mapping):
        tree["tracking"] = {k: v for k, v in tree["tracking"].items() if f"tracking.{k}" not in INVOCATION_KEYS}
    if "dataset" in tree:
        tree["dataset"] = _own_kind_keys(tree["dataset"])
    check_config(tree, where=f"{file}: ")
    return tree


def _own_kind_keys(block: Any) -> Any:
    """A saved ``dataset`` block without the keys of the *other* dataset kinds: configs saved before each kind had
    its own schema carry every kind's keys (``root: null`` in a shapes run), which the run never read. Keys of no
    kind stay, and are refused by :func:`check_config`."""
    if not isinstance(block, Mapping) or str(block.get("kind")) not in DATASET_SCHEMAS:
        return block
    own = _fields(DATASET_SCHEMAS[str(block["kind"])])
    other = {k for schema in DATASET_SCHEMAS.values() for k in _fields(schema)} - set(own)
    return {k: v for k, v in block.items() if k not in other}


def rebuild(saved: dict, overrides: Sequence[str] = ()) -> Any:
    """The config of a resumed or reproduced run: ``saved`` (from :func:`load_saved`) on the schema, the project's
    defaults for the invocation's keys, then the command line's ``key=value`` overrides; checked like a composed
    config (:func:`check_config`)."""

    from omegaconf.errors import OmegaConfBaseException

    check_override_keys(list(overrides))
    try:
        cfg = validate(saved)
    except OmegaConfBaseException as e:  # a value of the wrong type: name its key
        raise UserError(f"saved config: {getattr(e, 'full_key', '')}: {str(e).splitlines()[0]}") from None
    if overrides:
        bad = [o for o in overrides if "=" not in o or o.startswith(("+", "~"))]
        if bad:
            raise UserError(f"expected key=value overrides, got {bad}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        except Exception as e:  # noqa: BLE001 - OmegaConf's validation error names the key
            raise UserError(f"overrides {list(overrides)}: {str(e).splitlines()[0]}") from None
    check_config(cfg)
    return cfg


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


def _by_kind(tp: Any, node: Any) -> Any:
    """The schema a block of type ``tp`` is checked against: a ``dataset`` block (:class:`DatasetBase`), its kind's
    (:data:`DATASET_SCHEMAS`); without a known kind, every kind's keys (:class:`DatasetConfig`)."""
    if tp is not DatasetBase:
        return tp
    kind = node.get("kind") if isinstance(node, Mapping) else None
    return DATASET_SCHEMAS.get(str(getattr(kind, "value", kind)), DatasetConfig)


def _schema_at(path: str) -> Any:
    """The schema type at dotted ``path`` of the top-level schema (None past a dict, list or unknown key)."""
    tp: Any = build_schema()
    for part in path.split(".") if path else []:
        tp = _unwrap(tp)
        if not dataclasses.is_dataclass(tp) or part not in _fields(tp):
            return None
        tp = _fields(tp)[part]
    return _unwrap(tp)


def _kind_note(path: str, tree: Any) -> str:
    """For a key of another dataset kind's schema in a ``dataset`` block (``dataset=folder dataset.p_two=0.3``): what
    the block's kind is and which keys it has; else ""."""
    parent, _, key = path.rpartition(".")
    if _schema_at(parent) is not DatasetBase:
        return ""
    node = tree
    for part in parent.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    schema = _by_kind(DatasetBase, node)
    owners = [kind for kind, other in DATASET_SCHEMAS.items() if key in _fields(other)]
    if schema is DatasetConfig or not owners:
        return ""
    kind = next(k for k, v in DATASET_SCHEMAS.items() if v is schema)
    return (
        f" of dataset kind {kind!r} ({key} is a key of kind {', '.join(owners)}; {parent} of kind {kind} has "
        f"{', '.join(_fields(schema))})"
    )


def _walk(node: Any, tp: Any, path: str, unknown: list, valid: list) -> None:
    """Append ``(path, sibling keys)`` of every key of ``node`` that schema type ``tp`` lacks to ``unknown`` and
    every valid path to ``valid``."""
    tp = _by_kind(_unwrap(tp), node)
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
    tree = (
        cfg if isinstance(cfg, Mapping) and not OmegaConf.is_config(cfg) else OmegaConf.to_container(cfg, resolve=False)
    )
    unknown: list = []
    valid: list = []
    _walk(tree, build_schema(), "", unknown, valid)
    out = []
    for path, siblings in unknown:
        parent, _, key = path.rpartition(".")
        close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
        if _kind_note(path, tree):  # another dataset kind's key: no suggestion elsewhere (check_keys says why)
            best = None
        elif close:
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

    bad = unknown_keys(cfg)
    if bad:
        tree = (
            cfg
            if isinstance(cfg, Mapping) and not OmegaConf.is_config(cfg)
            else OmegaConf.to_container(cfg, resolve=False)
        )
        parts = [
            f"{path}: unknown config key{_kind_note(path, tree)}" + (f"; did you mean {best}?" if best else "")
            for path, best in bad
        ]
        raise UserError(
            f"{where}{'; '.join(parts)} (a '+' override cannot add keys the schema lacks; only "
            f"{', '.join(FREE_FORM)} takes free-form keys)"
        )


def _bad_values(node: Any, tp: Any, path: str, meta: Mapping, out: list) -> None:
    """Append ``(path, value, expected)`` for every value of ``node`` outside its schema range (field metadata
    ``bounds``), every non-finite float, every bool where a number is expected."""
    import math

    tp = _by_kind(_unwrap(tp), node)
    if node is None or path in FREE_FORM or tp is Any:
        return
    if dataclasses.is_dataclass(tp):
        if not isinstance(node, Mapping):
            return
        for f in dataclasses.fields(tp):
            if f.name in node:
                sub = f"{path}.{f.name}" if path else f.name
                _bad_values(node[f.name], typing.get_type_hints(tp)[f.name], sub, f.metadata, out)
        return
    origin = typing.get_origin(tp)
    if origin in (dict, Dict) and isinstance(node, Mapping):
        for key, value in node.items():
            _bad_values(value, typing.get_args(tp)[1], f"{path}.{key}", {}, out)
        return
    if origin in (list, List) and isinstance(node, Sequence) and not isinstance(node, str):
        for i, value in enumerate(node):
            _bad_values(value, typing.get_args(tp)[0], f"{path}[{i}]", meta, out)
        return
    if tp in (int, float) and isinstance(node, (int, float)) and not isinstance(node, bool):
        bounds = meta.get("bounds")
        if isinstance(node, float) and not math.isfinite(node):
            out.append((path, node, "a finite number" + (f" {bounds.describe()}" if bounds else "")))
        elif bounds is not None and bounds.violated(node):
            out.append((path, node, bounds.describe() + (f" ({bounds.note})" if bounds.note else "")))


def check_values(cfg: Any, where: str = "") -> None:
    """Raise a UserError naming every numeric value of ``cfg`` (a composed config or a plain, resolved dict) outside
    its schema range (:class:`Bounds`) and every NaN/inf float, with the range expected. Interpolations that do
    not resolve are left to the run's own resolution, which names them."""
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    if OmegaConf.is_config(cfg):
        try:  # Hydra's own node (runtime interpolations) is Hydra's to check
            task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
            tree = OmegaConf.to_container(task, resolve=True, enum_to_str=True, throw_on_missing=False)
        except OmegaConfBaseException:
            return
    else:
        tree = cfg
    bad: list = []
    _bad_values(tree, build_schema(), "", {}, bad)
    if bad:
        raise UserError(where + "; ".join(f"{path}={value!r}: expected {expected}" for path, value, expected in bad))


def check_config(cfg: Any, where: str = "") -> None:
    """Every check a config passes before any work, MLflow run or run dir: its keys (:func:`check_keys`) and
    values (:func:`check_values`)."""
    check_keys(cfg, where)
    check_values(cfg, where)


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
                raise UserError(
                    f"{o.input_line}: unknown {group} option {bad[0]!r}"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f"; available options in '{group}': {', '.join(options)}"
                )


def _dict_entry_field(key: str) -> tuple[str, str] | None:
    """(dict path, field) when ``key`` is ``<dict of blocks>.<a field of the block>`` (``features.weights_path``)."""
    tp: Any = build_schema()
    parts = key.split(".")
    for i, part in enumerate(parts):
        tp = _unwrap(tp)
        if typing.get_origin(tp) in (dict, Dict):
            block = _unwrap(typing.get_args(tp)[1])
            if i == len(parts) - 1 and dataclasses.is_dataclass(block) and part in _fields(block):
                return ".".join(parts[:i]), part
            return None
        if not dataclasses.is_dataclass(tp) or part not in _fields(tp):
            return None
        tp = _fields(tp)[part]
    return None


def _selected_entries(overrides: Sequence[str], bad: str, node: str) -> list[str]:
    """The entries of dict node ``node`` (``features``: the selected extractors) in the config the other
    ``overrides`` compose, so a suggestion names an entry Hydra accepts; ``["<name>"]`` when they do not compose."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    rest = [o for o in overrides if o != bad and not o.lstrip("+").startswith(f"{node}.")]
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            names = list(compose("config", overrides=rest)[node])
    except Exception:  # noqa: BLE001 - the other overrides have their own errors: a generic hint
        names = []
    finally:
        GlobalHydra.instance().clear()
    return names or ["<name>"]


def _selected_kind(overrides: Sequence[str], block: str) -> str | None:
    """The kind of dataset block ``block`` (``dataset``: the selected ``dataset=`` option, or a model option's) in the
    config the other overrides compose; None when they do not compose."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    rest = [o for o in overrides if not o.lstrip("+~").startswith(f"{block}.")]
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            kind = OmegaConf.select(compose("config", overrides=rest), f"{block}.kind")
    except Exception:  # noqa: BLE001 - the other overrides have their own errors: every kind's keys pass here
        kind = None
    finally:
        GlobalHydra.instance().clear()
    return None if kind is None else str(getattr(kind, "value", kind))


def check_override_keys(overrides: Sequence[str]) -> None:
    """Every ``key=value`` override (``+``/``++`` forms and sweeps included) must name a key of the schema: a typo
    (``sampler.num_inference_step=5``) is a UserError naming the closest valid key, before Hydra runs (Hydra's own
    message would suggest the ``+`` form, which :func:`check_keys` then refuses). Group choices (``model=...``),
    ``hydra.*`` and deletions are left to Hydra; unparsable overrides to Hydra's own message."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # noqa: BLE001 - Hydra reports its own parse errors
        return
    bad = []
    for o in parsed:
        key = o.key_or_group
        if o.is_delete() or o.package or key.startswith("hydra") or "/" in key or (CONF_DIR / key).is_dir():
            continue
        tree: dict = {}
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = None
        block = ".".join(parents)
        if _schema_at(block) is DatasetBase and leaf not in _fields(DatasetBase):  # a key of some kinds only
            node["kind"] = _selected_kind(overrides, block)
        value = o.input_line.split("=", 1)[1] if "=" in o.input_line else "..."
        for path, best in unknown_keys(tree):
            bad.append(
                f"{path}: unknown config key{_kind_note(path, tree)}"
                + (f"; did you mean {best}? e.g. {best}={value}" if best else "")
                + f" (in {o.input_line})"
            )
            break
        else:
            entry = _dict_entry_field(key)
            if entry is not None:  # `features.weights_path=x`: a field of one entry, named without its entry
                names = _selected_entries(overrides, o.input_line, entry[0])
                example = f"{entry[0]}.{names[0]}.{leaf}"
                bad.append(
                    f"{key}: {entry[0]} holds one block per selected option ({', '.join(names)}): "
                    f"{entry[0]}.<name>.{leaf}; did you mean {example}? e.g. {example}={value} (in {o.input_line})"
                )
    if bad:
        raise UserError(
            "; ".join(bad) + f" (a '+' override cannot add keys the schema lacks; only "
            f"{', '.join(FREE_FORM)} takes free-form keys)"
        )


def check_sweep(config: Any, job_check: Any = None) -> None:
    """:func:`check_config` (keys, value ranges) and resolution (``???``, interpolations) of every job of a multirun
    before the first one starts (from :class:`pipeline.record.sweep.SweepCallback`), each job's config composed as
    Hydra's basic sweeper composes it, then ``job_check(job config)`` (the runner's preflight): a bad value anywhere
    refuses the sweep before any job, run dir or MLflow run. Jobs that do not compose are left to Hydra's own
    validation of the batch, which follows."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    check_config(config)
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
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    for batch in BasicSweeper.split_arguments(parsed, None):
        for job in batch:
            try:
                job_cfg = loader.load_sweep_config(config, list(job))
            except Exception:  # noqa: BLE001 - Hydra's validation of the batch reports it
                continue
            where = f"sweep job {' '.join(j for j in job if j.split('=')[0] in swept)}: "
            check_config(job_cfg, where=where)
            task = OmegaConf.masked_copy(job_cfg, [k for k in job_cfg if k != "hydra"])
            try:  # a ??? or a broken interpolation: the whole sweep is refused, before any job or MLflow run
                to_plain(task)
            except MissingMandatoryValue as e:
                raise UserError(
                    f"{where}{e.full_key}: missing mandatory value (???); set it, e.g. {e.full_key}=..."
                ) from None
            except InterpolationResolutionError as e:
                raise UserError(f"{where}{e.full_key}: cannot resolve interpolation: {e.msg}") from None
            if job_check is not None:
                try:
                    job_check(task)
                except UserError as e:
                    raise UserError(f"{where}{e}") from None
