"""Which model family a diffusers pipeline belongs to, from its class name alone (no weights needed).

The families and the pipeline classes each drives are registered in :mod:`pipeline.models.families` (one file per
family); this module answers questions about them for the adapter (a loaded pipeline), the scheduler options
(``model_index.json`` only), the modes' up-front checks (which modes a family declares) and the
``${family_solvers:...}`` sweep resolver. A pipeline class that is not registered is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import UserError
from pipeline.models.families import DRIVERS, FAMILIES, Family, FamilyDriver
from pipeline.models.families.base import driver_named, image_tokens
from pipeline.models.native import NATIVE_FAMILY, NativeCall, native_refusal

__all__ = [
    "Family",
    "FAMILIES",
    "family_of",
    "family_of_class",
    "driver_of",
    "family_in_index",
    "read_json",
    "read_model_index",
    "check_mode_support",
    "check_loaded",
    "families_for",
    "classes_for",
    "flow_geometry",
    "flow_pipeline_classes",
    "local_pipeline_class",
    "family_table",
    "where_class_runs",
]


def supported() -> str:
    return ", ".join(f"{cls} ({f.name})" for cls, f in FAMILIES.items())


def family_of_class(class_name: str, mode: str | None = None) -> Family:
    """The family of a pipeline class name: a registered family, else the native path (:mod:`pipeline.models.native`)
    when the class's own ``__call__`` can make the images; any other class is a UserError naming it, why, the mode
    and what works."""
    fam = FAMILIES.get(class_name)
    if fam is not None:
        return fam
    why = native_refusal(class_name)
    if why is None:
        return NATIVE_FAMILY
    where = f" for mode {mode!r}" if mode else ""
    raise UserError(
        f"model.path: pipeline class {class_name!r} is not supported{where}: {why}. Supported families: "
        f"{supported()}; any other text-to-image pipeline runs on the native path (metrics, schedule)"
    )


def family_of(pipe, mode: str | None = None) -> Family:
    return family_of_class(type(pipe).__name__, mode)


def driver_of(pipe, mode: str | None = None) -> type[FamilyDriver]:
    """The driver class of a loaded pipeline (refused by name, as :func:`family_of`); the native path's for a
    class no family drives."""
    fam = family_of(pipe, mode)
    return NativeCall if fam is NATIVE_FAMILY else DRIVERS[type(pipe).__name__]


def family_in_index(model_index: dict | None) -> Family | None:
    """The family ``model_index.json`` names (None: no index, or a class no family drives; the native path's
    family for a class that runs on it)."""
    name = str((model_index or {}).get("_class_name"))
    if name in FAMILIES:
        return FAMILIES[name]
    return NATIVE_FAMILY if model_index and native_refusal(name) is None else None


def families_for(mode: str) -> set[str]:
    """Names of the families that declare ``mode``."""
    return {f.name for f in FAMILIES.values() if f.supports(mode)}


def classes_for(mode: str, families: set[str] | None = None) -> list[str]:
    """Pipeline classes whose family declares ``mode`` (and, if given, is one of ``families``)."""
    return [c for c, f in FAMILIES.items() if f.supports(mode) and (families is None or f.name in families)]


def flow_pipeline_classes() -> list[str]:
    return sorted(c for c, f in FAMILIES.items() if f.flow)


def read_json(path: str | Path) -> dict | None:
    """A model directory's JSON config file, or None when there is none; invalid JSON names the file."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"model.path: {str(path)!r} is not valid JSON: {e}") from e


_MODEL_INDEX_EXPECTED = (
    'expected a JSON object naming the pipeline class, e.g. {"_class_name": '
    '"StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"], ...}'
)


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
        raise UserError(
            f"model.path: {str(file)!r} is not valid JSON ({type(e).__name__}: {e}); {_MODEL_INDEX_EXPECTED}"
        ) from e
    if not isinstance(index, dict):
        kind = (
            "null"
            if index is None
            else {list: "a JSON list", str: "a JSON string", bool: "a JSON boolean"}.get(type(index), "a JSON number")
        )
        raise UserError(f"model.path: {str(file)!r} holds {kind}; {_MODEL_INDEX_EXPECTED}")
    if not isinstance(index.get("_class_name"), str) or not index["_class_name"]:
        got = 'no "_class_name" key' if "_class_name" not in index else f'"_class_name": {index["_class_name"]!r}'
        raise UserError(f"model.path: {str(file)!r} has {got}; {_MODEL_INDEX_EXPECTED}")
    return index


def local_pipeline_class(model_path: str) -> str | None:
    """The ``_class_name`` of a local pipeline directory's ``model_index.json`` (None: not one)."""
    path = Path(str(model_path))
    index = read_model_index(path) if path.is_dir() else None
    return None if index is None else str(index.get("_class_name"))


def _refuse(cls: str, fam: Family, mode: str, families: set[str] | None) -> None:
    if fam.supports(mode) and (families is None or fam.name in families):
        return
    ok = ", ".join(classes_for(mode, families))
    if fam is NATIVE_FAMILY:
        raise UserError(
            f"mode=[{mode}]: {cls} runs on the native path (its own __call__, generation.path=native_call), which "
            f"exposes no single denoiser steps or attention layers; mode {mode} needs a family driver for it (a file "
            f"in pipeline/models/families, see CONTRIBUTING.md). Classes it supports: {ok}"
        )
    raise UserError(f"mode=[{mode}]: {cls} ({fam.name}) is not supported by the {mode} mode; it supports {ok}")


def check_mode_support(model_path: str, mode: str, families: set[str] | None = None) -> Family | None:
    """Refuse, before any work, a local pipeline whose class the project cannot drive, or whose family does not
    declare ``mode`` (``families``: further restricted to these names). Returns the family (None: not a local
    pipeline directory — a hub id is checked once loaded, a scheduler-only directory needs no weights)."""
    cls = local_pipeline_class(model_path)
    if cls is None:
        return None
    fam = family_of_class(cls, mode)
    _refuse(cls, fam, mode, families)
    return fam


def check_loaded(pipe, mode: str, families: set[str] | None = None) -> Family:
    """The same check on a loaded pipeline (a hub id is only known once loaded)."""
    fam = family_of(pipe, mode)
    _refuse(type(pipe).__name__, fam, mode, families)
    return fam


def component_config(model_path: str, component: str) -> dict | None:
    """``<component>/config.json`` of a local model directory (or the hub, if reachable); None if absent."""
    local = Path(str(model_path)).expanduser()
    if local.is_dir():
        file = local / component / "config.json"
    else:
        try:
            from huggingface_hub import hf_hub_download  # only for a hub id, and slow to import (config time)

            file = Path(hf_hub_download(str(model_path), f"{component}/config.json"))
        except Exception:  # offline / no such file: the pipelines' defaults apply
            return None
    return read_json(file)


def flow_geometry(
    model_path: str, family: Family | None, height: int | None, width: int | None
) -> tuple[int, int, int | None]:
    """(height, width, image_seq_len) of a flow model at ``height x width`` pixels (None: its native size), from
    configs only: the VAE scale (:meth:`FamilyDriver.vae_scale_of`), then the family's native side
    and pixels per image token (:meth:`FamilyDriver.flow_geometry`). image_seq_len is None for an unknown family
    (a scheduler-only directory)."""
    driver = driver_named(family.name) if family is not None else None
    scale = (driver or FamilyDriver).vae_scale_of(component_config(model_path, "vae"))
    geometry = driver.flow_geometry(scale, lambda name: component_config(model_path, name)) if driver else None
    native, step = geometry if geometry is not None else (None, 1)
    h, w = int(height or native or 0), int(width or native or 0)
    for key, v in (("height", h), ("width", w)):
        if v <= 0:
            raise UserError(f"mode.schedule.{key}: expected a positive number of pixels, got {v}")
    if native is None:
        return h, w, None
    return h, w, image_tokens(h, w, step)


def family_table() -> str:
    """The family × mode table (markdown) from the registry itself: one row per family with its pipeline classes,
    then the native path's row. README carries this table verbatim (a test regenerates it)."""
    from pipeline.models.families.base import ALL_MODES

    rows: dict[str, list[str]] = {}
    for cls, fam in FAMILIES.items():
        rows.setdefault(fam.name, []).append(f"`{cls}`")
    by_name = {f.name: f for f in FAMILIES.values()}
    lines = [
        "| family | pipeline classes | path | " + " | ".join(ALL_MODES) + " |",
        "|" + "---|" * (3 + len(ALL_MODES)),
    ]
    for name, classes in rows.items():
        marks = " | ".join("✓" if by_name[name].supports(m) else "—" for m in ALL_MODES)
        lines.append(f"| {name} | {', '.join(classes)} | adapter | {marks} |")
    marks = " | ".join("✓" if NATIVE_FAMILY.supports(m) else "—" for m in ALL_MODES)
    lines.append(f"| any other | a text-to-image class (`python -m pipeline.models CLASS`) | native_call | {marks} |")
    return "\n".join(lines)


def where_class_runs(class_name: str) -> str:
    """One line: the family and modes of ``class_name``, the native path, or why it is refused."""
    fam = FAMILIES.get(class_name)
    if fam is not None:
        return f"{class_name}: family {fam.name} through the adapter; modes {', '.join(fam.modes)}"
    why = native_refusal(class_name)
    if why is None:
        return f"{class_name}: the native path (its own __call__, generation.path=native_call); modes {', '.join(NATIVE_FAMILY.modes)}"
    return f"{class_name}: refused: {why}"
