"""Run names: what a run is, readable in the MLflow runs table instead of MLflow's random names.

One place for every name a run gets (``tracking.run_name`` wins over all of them when set):

- a run: ``<modes>·<model>·<scheduler>×<steps>·g<guidance>``, e.g. ``metrics·shapes_sd·ddim×25·g7.5``
  (:func:`run_name`; model = the last path component of ``model.path``: the zoo name, a checkpoint directory or
  the hub id's name);
- a sweep job: its swept overrides, e.g. ``scheduler=euler·sampler.num_inference_steps=10`` (:func:`job_name`);
- a sweep parent: ``sweep·`` and the swept keys with their values (:func:`sweep_name`), from :func:`swept_values`.

Path-like values are shortened to their last component (``model.path=step_00250``); names are cut at
:data:`MAX_NAME` characters. Standard library and Hydra's override parser only (no torch, no mlflow).

    >>> job_name(["paths.outputs=/tmp/o", "scheduler=euler", "sampler.num_inference_steps=10"],
    ...          ["scheduler", "sampler.num_inference_steps"])
    'scheduler=euler·sampler.num_inference_steps=10'
    >>> sweep_name({"scheduler": ["ddim", "euler"], "model.path": ["/ckpt/step_1", "/ckpt/step_2"]})
    'sweep·scheduler=ddim,euler·model.path=step_1,step_2'
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath
from typing import Any, Optional

SEP = "·"
MAX_NAME = 250


def _clip(name: str) -> str:
    return name if len(name) <= MAX_NAME else name[: MAX_NAME - 1] + "…"


def short(value: Any) -> str:
    """A value as a name part: a path (or hub id) by its last component, a float without trailing zeros."""
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return (PurePosixPath(text.rstrip("/")).name or text) if "/" in text and not text.startswith("[") else text


def override_key(override: str) -> str:
    """The key of a command-line override: ``+sampler.eta=0.5`` -> ``sampler.eta``."""
    return override.split("=", 1)[0].lstrip("+~")


def run_name(cfg: Any, modes: Iterable[str], choices: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """``tracking.run_name`` if set, else ``<modes>·<model>·<scheduler>×<steps>·g<guidance>``. A part that cannot
    be read (a missing ``model.path``: the run fails on it later, with its own message) is left out."""
    configured = _select(cfg, "tracking.run_name")
    if configured:
        return _clip(str(configured))
    choices = choices or {}
    parts = ["+".join(modes)]
    parts.append(short(_select(cfg, "model.path") or _select(cfg, "model.name") or choices.get("model") or ""))
    scheduler = choices.get("scheduler") or _select(cfg, "scheduler.name")
    steps = _select(cfg, "sampler.num_inference_steps")
    parts.append(f"{scheduler}×{steps}" if scheduler and steps is not None else str(scheduler or ""))
    guidance = _select(cfg, "sampler.guidance_scale")
    parts.append(f"g{short(float(guidance))}" if isinstance(guidance, (int, float)) else "")
    return _clip(SEP.join(p for p in parts if p)) or None


def job_name(task_overrides: Iterable[str], swept: Iterable[str]) -> Optional[str]:
    """A sweep job by the overrides that differ between jobs (``swept`` keys), in command-line order; None when
    none of its overrides is swept."""
    swept = set(swept)
    parts = [
        f"{override_key(o)}={short(o.split('=', 1)[1])}"
        for o in task_overrides
        if "=" in o and override_key(o) in swept
    ]
    return _clip(SEP.join(parts)) if parts else None


def sweep_name(swept: Mapping[str, list[str]]) -> Optional[str]:
    """A sweep parent: ``sweep·<key>=<v1>,<v2>·...``; None when nothing is swept."""
    if not swept:
        return None
    return _clip(SEP.join(["sweep", *(f"{k}={','.join(short(v) for v in vs)}" for k, vs in swept.items())]))


def swept_values(
    task_overrides: Iterable[str], sweeper_params: Optional[Mapping[str, Any]] = None
) -> dict[str, list[str]]:
    """``{key: [values]}`` a multirun sweeps: the sweeper's ``params`` (experiment presets) overridden by the
    command line's overrides (``scheduler=ddim,euler``, ``range(...)``, ``choice(...)``); a single-valued
    command-line override fixes its key, so the key is not swept."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    items = [f"{k}={v}" for k, v in (sweeper_params or {}).items()] + list(task_overrides)
    swept: dict[str, list[str]] = {}
    for item in items:
        try:
            (override,) = parser.parse_overrides([item])
        except Exception:  # noqa: BLE001 - a sweeper's own syntax: not a name's business to reject it
            continue
        key = override.get_key_element().lstrip("+~")
        if not override.is_sweep_override():
            swept.pop(key, None)
            continue
        try:
            swept[key] = [str(v) for v in override.sweep_string_iterator()]
        except Exception:  # noqa: BLE001 - e.g. a glob over a group's options: keep the sweep as written
            swept[key] = [override.get_value_element_as_str()]
    return swept


def _select(cfg: Any, key: str) -> Any:
    """``cfg``'s value at dot ``key``, None when absent, missing (``???``) or not resolvable."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - an interpolation that fails here fails later with its own message
        return None
