"""Structured-config schema for every config group.

Registered in Hydra's ConfigStore as ``base_config`` (the first entry of ``conf/config.yaml``'s defaults), so
a misspelled key or a wrong type in any group fails at composition with Hydra's own message, before any
work starts. Each mode's block ``mode.<name>`` is validated by the schema its stage file registers.
"""

from __future__ import annotations

import enum
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
    import pipeline.stages  # noqa: F401  (registers every stage file's modes)
    from pipeline.registry import MODES

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
    for tests, benchmarks and notebooks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def validate(cfg: Any) -> Any:
    """Merge a plain (e.g. saved, resolved) config onto the schema: the same checks composition does."""
    register_configs()
    schema = OmegaConf.structured(build_schema())
    return OmegaConf.merge(schema, cfg)


def to_plain(cfg: Any, resolve: bool = True) -> dict:
    """Plain containers (enums as strings); with ``resolve`` a ``???`` raises MissingMandatoryValue."""
    return OmegaConf.to_container(cfg, resolve=resolve, enum_to_str=True, throw_on_missing=resolve)
