"""Which model family a diffusers pipeline belongs to, from its class name alone (no weights needed).

One table, read by the adapter (a loaded pipeline), the scheduler options (``model_index.json`` only) and the
``${family_solvers:...}`` sweep resolver. A pipeline class that is not in the table is refused by name.

Fields:
    denoiser      the component that predicts: ``unet`` | ``transformer``
    conditioning  ``text`` | ``class`` | ``none``
    space         ``latent`` (a KL/VQ VAE: ``vae`` or ``vqvae``) | ``pixel``
    flow          True for rectified-flow models (velocity prediction, σ ∈ [0, 1], FlowMatch* schedulers);
                  otherwise the scheduler config's ``prediction_type`` (ε, v, x₀) on a DDPM β schedule
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.errors import UserError

__all__ = ["Family", "FAMILIES", "family_of", "family_of_class", "read_json", "read_model_index"]


@dataclass(frozen=True)
class Family:
    name: str
    denoiser: Literal["unet", "transformer"]
    conditioning: Literal["text", "class", "none"]
    space: Literal["latent", "pixel"]
    flow: bool = False
    vae_attr: str = "vae"


FAMILIES: dict[str, Family] = {
    "StableDiffusionPipeline": Family("sd", "unet", "text", "latent"),  # SD 1.x (ε) and 2.x (v)
    "StableDiffusionXLPipeline": Family("sdxl", "unet", "text", "latent"),
    "PixArtAlphaPipeline": Family("pixart", "transformer", "text", "latent"),
    "PixArtSigmaPipeline": Family("pixart", "transformer", "text", "latent"),
    "StableDiffusion3Pipeline": Family("sd3", "transformer", "text", "latent", flow=True),
    "FluxPipeline": Family("flux", "transformer", "text", "latent", flow=True),
    "DiTPipeline": Family("dit", "transformer", "class", "latent"),
    "DDPMPipeline": Family("ddpm", "unet", "none", "pixel"),
    "DDIMPipeline": Family("ddpm", "unet", "none", "pixel"),
    "LDMPipeline": Family("ldm", "unet", "none", "latent", vae_attr="vqvae"),
}


def supported() -> str:
    return ", ".join(f"{cls} ({f.name})" for cls, f in FAMILIES.items())


def family_of_class(class_name: str, mode: str | None = None) -> Family:
    """The family of a pipeline class name; an unsupported class is a UserError naming it, the mode and what works."""
    fam = FAMILIES.get(class_name)
    if fam is None:
        where = f" for mode {mode!r}" if mode else ""
        raise UserError(f"model.path: pipeline class {class_name!r} is not supported{where}; supported families: "
                        f"{supported()}")
    return fam


def family_of(pipe, mode: str | None = None) -> Family:
    return family_of_class(type(pipe).__name__, mode)


def read_json(path: str | Path) -> dict | None:
    """A model directory's JSON config file, or None when there is none; invalid JSON names the file."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"model.path: {str(path)!r} is not valid JSON: {e}") from e


_MODEL_INDEX_EXPECTED = ('expected a JSON object naming the pipeline class, e.g. {"_class_name": '
                         '"StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"], ...}')


def read_model_index(local: str | Path) -> dict | None:
    """``model_index.json`` of a local pipeline directory (None when there is none), checked: a file that is not
    UTF-8 JSON, not a JSON object, or has no string ``_class_name`` is a UserError naming the file and what was
    expected — never a traceback from whichever caller used it first (the preflight checks, loading, the modes)."""
    file = Path(local) / "model_index.json"
    if not file.is_file():
        return None
    try:
        index = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise UserError(f"model.path: {str(file)!r} is not valid JSON ({type(e).__name__}: {e}); "
                        f"{_MODEL_INDEX_EXPECTED}") from e
    if not isinstance(index, dict):
        kind = "null" if index is None else {list: "a JSON list", str: "a JSON string", bool: "a JSON boolean"}.get(
            type(index), "a JSON number")
        raise UserError(f"model.path: {str(file)!r} holds {kind}; {_MODEL_INDEX_EXPECTED}")
    if not isinstance(index.get("_class_name"), str) or not index["_class_name"]:
        got = "no \"_class_name\" key" if "_class_name" not in index else f"\"_class_name\": {index['_class_name']!r}"
        raise UserError(f"model.path: {str(file)!r} has {got}; {_MODEL_INDEX_EXPECTED}")
    return index


def check_mode_support(model_path: str, mode: str, families: set[str] | None = None) -> Family | None:
    """Refuse, before any work, a local pipeline whose class the project cannot drive, or (``families``) whose
    family ``mode`` does not support yet. Returns the family (None: not a local pipeline directory — a hub id is
    checked once loaded, a scheduler-only directory needs no weights)."""
    path = Path(str(model_path))
    index = read_model_index(path) if path.is_dir() else None
    if index is None:
        return None
    cls = str(index.get("_class_name"))
    fam = family_of_class(cls, mode)
    if families is not None and fam.name not in families:
        ok = ", ".join(c for c, f in FAMILIES.items() if f.name in families)
        raise UserError(f"mode=[{mode}]: {cls} ({fam.name}) is not supported by the {mode} mode; it supports {ok}")
    return fam


def check_loaded(pipe, mode: str, families: set[str]) -> Family:
    """The same check on a loaded pipeline (a hub id is only known once loaded)."""
    fam = family_of(pipe, mode)
    if fam.name not in families:
        ok = ", ".join(c for c, f in FAMILIES.items() if f.name in families)
        raise UserError(f"mode=[{mode}]: {type(pipe).__name__} ({fam.name}) is not supported by the {mode} mode; "
                        f"it supports {ok}")
    return fam
