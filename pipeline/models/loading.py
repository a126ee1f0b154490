"""Model loading: a hub id or a local directory, safe defaults.

* weights: ``use_safetensors=True``; pickled ``*.bin``/``*.ckpt`` only with ``model.allow_pickle=true``;
* never ``trust_remote_code`` / custom pipelines;
* a mode that needs only the scheduler reads only ``scheduler/scheduler_config.json`` (no weights).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.models.family import family_of_class, read_model_index

log = logging.getLogger(__name__)


class _NoTorchvisionFallbackNotice(logging.Filter):
    """transformers 5 announces, on every run without torchvision, that it falls back to the PIL image processors of
    the pipelines' optional ``feature_extractor`` components; diffusion-lens never uses them, so the notice is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNotice())

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"model.device: {device!r} is not a device; expected auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"model.device: {device!r} requested but CUDA is not available; use model.device=auto or cpu")
    return dev


def resolve_dtype(dtype: Any) -> torch.dtype:
    name = getattr(dtype, "value", dtype)
    if name not in _DTYPES:
        raise UserError(f"model.dtype: {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _local_or_hub(path: str) -> tuple[Path | None, str | None]:
    """(local dir, None) or (None, hub id); a path that is neither is a UserError naming it."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p.resolve(), None
    if p.exists():
        raise UserError(f"model.path: {path!r} is a file; expected a model directory or a hub id")
    looks_like_path = path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path
    if looks_like_path or not _HUB_ID.match(path):
        raise UserError(
            f"model.path: directory {str(p)!r} does not exist; expected a local model directory or a hub id"
        )
    return None, path


def _offline_hint(hub_id: str) -> str:
    return (
        f"model.path: {hub_id!r} is not a local directory and could not be fetched from the hub "
        "(offline: HF_HUB_OFFLINE=1 or no network). Download it on a connected machine "
        f"(`huggingface-cli download {hub_id} --local-dir DIR`) and set model.path=DIR"
    )


def load_scheduler_config(model_path: str) -> tuple[dict[str, Any], str]:
    """Read only the scheduler config of a model (no weights). Returns (config, where it came from)."""
    local, hub_id = _local_or_hub(model_path)
    if local is not None:
        candidates = [local / "scheduler" / "scheduler_config.json", local / "scheduler_config.json"]
        file = next((c for c in candidates if c.is_file()), None)
        if file is None:
            raise UserError(f"model.path: no scheduler config in {str(local)!r}; expected {candidates[0]}")
    else:
        from huggingface_hub import hf_hub_download

        try:
            file = Path(hf_hub_download(hub_id, "scheduler/scheduler_config.json"))
        except Exception as e:  # offline, unknown repo, gated repo: all the same to the user
            raise UserError(_offline_hint(hub_id) + f" [{type(e).__name__}]") from e
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError (not UTF-8)
        raise UserError(
            f"scheduler config {str(file)!r} is not valid JSON ({type(e).__name__}: {e}); expected a "
            "JSON object of scheduler settings (diffusers' scheduler_config.json)"
        ) from e
    if not isinstance(config, dict):
        raise UserError(f"scheduler config {str(file)!r}: expected a JSON object, got {type(config).__name__}")
    return config, str(file)


def _has_pickled_weights(local: Path) -> bool:
    return any(local.rglob("*.bin")) or any(local.rglob("*.ckpt")) or any(local.rglob("*.pt"))


def _component_kwargs(local: Path | None) -> dict[str, Any]:
    """Components to pass explicitly, from ``model_index.json``: ``None`` for every component recorded as
    ``[null, null]`` (an SD3 saved without T5 loads), and no safety checker at all — SD 1.x checkpoints list one
    (~1.2 GB); analysis needs the raw images, so it is never loaded."""
    index = read_model_index(local) if local is not None else None
    if index is None:
        return {}
    kwargs: dict[str, Any] = {
        k: None
        for k, v in index.items()
        if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is None and v[1] is None
    }
    checker = index.get("safety_checker")
    if isinstance(checker, list) and checker and checker[0] is not None:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    return kwargs


def _dtype_kwarg() -> str:
    """diffusers >= 0.36 calls it ``dtype`` (``torch_dtype`` still works, with a deprecation warning)."""
    import inspect

    from diffusers import DiffusionPipeline

    src = inspect.getsource(DiffusionPipeline.from_pretrained)
    return "dtype" if 'kwargs.pop("dtype"' in src else "torch_dtype"


def load_pipeline(model_cfg: Any, device: torch.device | None = None):
    """Load a diffusers pipeline from ``model_cfg.path`` with safe defaults, on ``device``. A local pipeline class
    the project cannot drive is refused from ``model_index.json`` before any weights are read."""
    from diffusers import DiffusionPipeline

    local, hub_id = _local_or_hub(model_cfg.path)
    source = str(local) if local is not None else hub_id
    device = device or resolve_device(model_cfg.device)
    kwargs: dict[str, Any] = {
        _dtype_kwarg(): resolve_dtype(model_cfg.dtype),
        # safetensors only, unless the user explicitly accepts pickle (which can execute code on load)
        "use_safetensors": None if model_cfg.allow_pickle else True,
    }
    if model_cfg.variant:
        kwargs["variant"] = model_cfg.variant
    if model_cfg.revision:
        kwargs["revision"] = model_cfg.revision
    if local is not None and not (local / "model_index.json").is_file():
        raise UserError(f"model.path: {source!r} has no model_index.json; expected a diffusers pipeline directory")
    if local is not None:
        family_of_class(read_model_index(local)["_class_name"])
    kwargs.update(_component_kwargs(local))
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except Exception as e:
        if local is not None and not model_cfg.allow_pickle and _has_pickled_weights(local):
            raise UserError(
                f"model.path: {source!r} has only pickled weights (*.bin/*.ckpt); pickle can run code on load. "
                "Convert them to safetensors, or set model.allow_pickle=true if you trust the source"
            ) from e
        if hub_id is not None:
            raise UserError(_offline_hint(hub_id) + f" [{type(e).__name__}: {e}]") from e
        raise UserError(f"model.path: could not load a pipeline from {source!r}: {type(e).__name__}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    log.info("loaded %s from %s on %s", type(pipe).__name__, source, device)
    return pipe.to(device)
