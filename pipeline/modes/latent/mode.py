"""The latent mode's config schema (types only: every default is in ``conf/mode/latent.yaml``), its cross-key checks
and its registration. Parts (``mode.latent.parts``) and what they log are described in :mod:`pipeline.modes.latent.stage`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from pipeline.config import DatasetConfig, bounded
from pipeline.core.registry import register_mode
from pipeline.errors import UserError
from pipeline.models.family import check_mode_support

PARTS = ("vae", "interpolation", "inversion", "direction", "ood")
MIN_FIT = 100


@dataclass
class DirectionConfig:
    source: str = MISSING  # text models: the prompt pair whose condition difference is the direction
    target: str = MISSING
    prompts: List[str] = MISSING
    source_class: Optional[int] = bounded(ge=0)  # class-conditional models: the class pair (null: part skipped)
    target_class: Optional[int] = bounded(ge=0)
    classes: List[int] = bounded(ge=0)  # class-conditional models: the base classes edited
    scales: List[float] = MISSING
    scale: float = MISSING  # the scale latent/direction_flip_rate reports
    samples_per_prompt: int = bounded(ge=1)


@dataclass
class LatentModeConfig:
    parts: List[str] = MISSING
    steps: Optional[int] = bounded(ge=1)  # null = sampler.num_inference_steps
    batch_size: Optional[int] = bounded(ge=1)  # null = sampler.batch_size
    vae_samples: int = bounded(ge=1)
    interp_points: int = bounded(ge=3, note="endpoints and a midpoint")
    interp_prompt: Optional[str] = MISSING
    ppl_pairs: int = bounded(ge=1)
    ppl_epsilon: float = bounded(gt=0, lt=0.5)
    inversion_samples: int = bounded(ge=1)
    direction: DirectionConfig = field(default_factory=DirectionConfig)
    ood_fit_samples: int = bounded(ge=1)  # >= MIN_FIT when the ood part runs (validate)
    ood_eval_samples: int = bounded(ge=2)
    ood_dataset: DatasetConfig = MISSING
    ood_noise: bool = MISSING
    recon_timesteps: List[int] = bounded(ge=0)
    recon_steps: int = bounded(ge=1)
    recon_distances: List[str] = MISSING
    shrinkage: str = MISSING


# the families that declare the latent mode (every one: a part whose math does not apply to one — the VAE part
# of a pixel model, prompt directions of an unconditional one — is skipped with a skipped.<key> tag naming why)


def validate(cfg) -> None:
    check_mode_support(cfg.model.path, "latent")
    a = cfg.mode.latent
    bad = [p for p in a.parts if p not in PARTS]
    if bad or not a.parts:
        raise UserError(f"mode.latent.parts={list(a.parts)}: expected a non-empty subset of {list(PARTS)}")
    if a.steps is not None and a.steps < 1:
        raise UserError(f"mode.latent.steps={a.steps}: expected >= 1 (or null = sampler.num_inference_steps)")
    if a.interp_points < 3:
        raise UserError(f"mode.latent.interp_points={a.interp_points}: expected >= 3 (endpoints and a midpoint)")
    if not 0 < a.ppl_epsilon < 0.5:
        raise UserError(f"mode.latent.ppl_epsilon={a.ppl_epsilon}: expected a small step in (0, 0.5), e.g. 1e-4")
    for key in ("vae_samples", "ppl_pairs", "inversion_samples"):
        if a[key] < 1:
            raise UserError(f"mode.latent.{key}={a[key]}: expected >= 1")
    d = a.direction
    if "direction" in a.parts and (not d.prompts or not d.scales or d.samples_per_prompt < 1):
        raise UserError("mode.latent.direction: expected non-empty prompts and scales and samples_per_prompt >= 1")
    if "ood" in a.parts:
        if a.ood_fit_samples < MIN_FIT:
            raise UserError(
                f"mode.latent.ood_fit_samples={a.ood_fit_samples}: fitting the OOD scores needs at least "
                f"{MIN_FIT} in-distribution samples"
            )
        if a.ood_eval_samples < 2:
            raise UserError(f"mode.latent.ood_eval_samples={a.ood_eval_samples}: expected >= 2")
        if not a.recon_timesteps or any(t < 1 for t in a.recon_timesteps) or a.recon_steps < 1:
            raise UserError(
                f"mode.latent.recon_timesteps={list(a.recon_timesteps)} / recon_steps={a.recon_steps}: "
                "expected training timesteps >= 1 and >= 1 step"
            )
        if a.shrinkage not in ("ledoit_wolf", "oas"):
            raise UserError(f"mode.latent.shrinkage={a.shrinkage!r}: expected ledoit_wolf or oas")
        if not a.recon_distances or any(x not in ("mse", "features") for x in a.recon_distances):
            raise UserError(
                f"mode.latent.recon_distances={list(a.recon_distances)}: expected a non-empty subset of [mse, features]"
            )


register_mode(
    "latent",
    schema=LatentModeConfig,
    validate=validate,
    stages=["latent_model", "latent_vae", "latent_interpolation", "latent_inversion", "latent_direction", "latent_ood"],
)
