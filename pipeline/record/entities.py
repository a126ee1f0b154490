"""What a run's MLflow 3 entities describe, computed without MLflow (``pipeline.record.tracking`` logs them).

- :func:`run_datasets`: the run's reference set and prompt set as :class:`DatasetRecord` (name, digest, source,
  context). The reference's digest is the identity the reference-feature cache already computed
  (:meth:`pipeline.data.reference.ReferenceSet.content_hash`: a folder's manifest digest, the shapes renderer's
  source + parameters hash), never a second hash of the images; the prompts' digest is the sha256 of the prompts
  file's bytes (``mode.metrics.prompts_file``) or of the caption list when the prompts are the reference captions.
- :func:`model_record`: the checkpoint a run evaluates (``model.path``) as a :class:`ModelRecord`: an MLflow
  logged model per checkpoint identity (resolved directory, or hub id + revision + variant), with its training step
  (``step_00750`` -> 750, :func:`pipeline.zoo.checkpoint_step`) and pipeline class / family from
  ``model_index.json`` (no weights read).

MLflow 3 references: ``mlflow.entities.Dataset`` / ``DatasetInput`` (``mlflow.data.context`` input tag),
``MlflowClient.create_logged_model`` / ``search_logged_models`` (mlflow 3.17).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.stages import num_reference, samples_per_prompt
from pipeline.models.family import family_in_index, read_model_index
from pipeline.zoo import checkpoint_step

log = logging.getLogger(__name__)

__all__ = ["DatasetRecord", "ModelRecord", "run_datasets", "model_record", "REFERENCE", "PROMPTS"]

REFERENCE, PROMPTS = "reference", "prompts"  # the datasets' contexts (MLflow's input tag mlflow.data.context)
DIGEST_CHARS = 20  # MLflow stores a dataset digest in 36 characters; the folder manifest digest is 20 hex
MODEL_TYPE = "diffusers"
_BAD_NAME = re.compile(r"[/:.%\"'\s]+")  # characters MLflow refuses in a logged model's name (and spaces)


@dataclass(frozen=True)
class DatasetRecord:
    """One dataset of a run as MLflow shows it: ``source_type`` ``local`` (``source = {"uri": path}``) or ``code``
    (a built-in, generated dataset: ``source = {"tags": its config identity}``); ``profile``: counts."""

    name: str
    digest: str
    context: str
    source_type: str
    source: dict[str, Any]
    profile: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelRecord:
    """One checkpoint as an MLflow logged model: ``identity`` (hex) is what later runs find it by."""

    name: str
    identity: str
    params: dict[str, str]
    model_type: str = MODEL_TYPE


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]


# ----------------------------------------------------------------------------------------------- datasets
def _reference_source(ref: Any) -> tuple[str, dict[str, Any]]:
    identity = dict(ref.identity)
    if identity.get("root"):
        return "local", {"uri": str(identity["root"])}
    identity.pop("n", None)  # the config, not the count (the profile has it)
    return "code", {"tags": {k: str(v) for k, v in identity.items()}}


def _reference_record(ref: Any) -> DatasetRecord:
    source_type, source = _reference_source(ref)
    profile = {"num_images": int(ref.n)}
    if getattr(ref, "num_skipped", 0):
        profile["num_skipped"] = int(ref.num_skipped)
    return DatasetRecord(
        name=str(ref.identity.get("name")),
        digest=str(ref.content_hash())[:DIGEST_CHARS],
        context=REFERENCE,
        source_type=source_type,
        source=source,
        profile=profile,
    )


def _used_sets(reference: Any) -> list[Any]:
    """The reference sets the run's modes took (:class:`pipeline.data.reference.References` keeps each one), one per
    content hash: the largest."""
    sets = [s for s in reference.taken() if s is not None]
    best: dict[tuple, Any] = {}
    for s in sets:
        key = (str(s.identity.get("name")), s.content_hash())
        if key not in best or s.n > best[key].n:
            best[key] = s
    return list(best.values())


def _prompt_record(cfg: Any, prompts: list[str], ref: Any | None) -> DatasetRecord | None:
    m = cfg.mode.get("metrics") if cfg.get("mode") is not None else None
    k, _ = samples_per_prompt(cfg, len(prompts))  # the run's protocol (k does not depend on the prompt count)
    distinct = len(prompts) // max(k, 1)
    file = m.get("prompts_file") if m is not None else None
    if file:
        path = Path(str(file)).expanduser()
        return DatasetRecord(
            name=path.name,
            digest=_sha(path.read_bytes()),
            context=PROMPTS,
            source_type="local",
            source={"uri": str(path.resolve())},
            profile={"num_prompts": distinct, "samples_per_prompt": k},
        )
    if ref is None or not ref.captions:
        return None
    captions = list(ref.captions)
    source_type, source = _reference_source(ref)
    return DatasetRecord(
        name=f"{ref.identity.get('name')} captions",
        digest=_sha(json.dumps(captions, ensure_ascii=False).encode("utf-8")),
        context=PROMPTS,
        source_type=source_type,
        source=source,
        profile={"num_prompts": len(captions), "samples_per_prompt": k},
    )


def run_datasets(artifacts: dict[str, Any], cfg: Any) -> list[DatasetRecord]:
    """The reference and prompt datasets of a run, from what its stages produced (``artifacts``: the run context's
    ``reference`` and ``prompts``); [] for a run that read neither (a schedule-only run)."""
    reference, prompts = artifacts.get("reference"), artifacts.get("prompts")
    records, compared = [], None
    if reference is not None:
        used = _used_sets(reference)
        records += [_reference_record(s) for s in used]
        want = num_reference(cfg)
        compared = next((s for s in getattr(reference, "_sets", {}).values() if s is not None and s.n == want), None)
        compared = compared or (used[0] if used else None)
    if prompts:
        record = _prompt_record(cfg, list(prompts), compared)
        if record is not None:
            records.append(record)
    return records


# ----------------------------------------------------------------------------------------------- logged models
def _model_name(path: str, local: Path | None, step: int | None) -> str:
    """``shapes_sd_ckpt-step_00250`` for a checkpoint directory (its parent says whose), ``shapes_sd`` for a final
    model, ``org-name`` for a hub id; MLflow refuses ``/ : . % " '`` in a logged model's name."""
    if local is not None:
        raw = f"{local.parent.name}-{local.name}" if step is not None and local.parent.name else local.name
    else:
        raw = path
    return _BAD_NAME.sub("-", raw).strip("-")[:200] or "model"


def model_record(model_cfg: Any) -> ModelRecord | None:
    """The checkpoint ``model_cfg.path`` names as a logged model: name, identity (resolved directory, or hub id +
    revision + variant) and params (``path``, ``step`` when the directory is a ``step_NNNNN`` checkpoint,
    ``pipeline_class`` and ``family`` from ``model_index.json`` when local). None when there is no path."""
    path = str(model_cfg.get("path") or "")
    if not path:
        return None
    p = Path(path).expanduser()
    local = p.resolve() if p.is_dir() else None
    revision, variant = model_cfg.get("revision"), model_cfg.get("variant")
    where = str(local) if local is not None else path
    identity = _sha(json.dumps(["local" if local else "hub", where, revision, variant]).encode())
    step = checkpoint_step(local or path.rstrip("/"))
    params = {"path": where}
    if step is not None:
        params["step"] = str(step)
    if revision:
        params["revision"] = str(revision)
    if variant:
        params["variant"] = str(variant)
    if local is not None:
        try:
            index = read_model_index(local)
        except Exception:  # noqa: BLE001 - a bad model_index.json is the model stage's to report
            index = None
        if index is not None:
            params["pipeline_class"] = str(index.get("_class_name"))
            family = family_in_index(index)
            if family is not None:
                params["family"] = family.name
    return ModelRecord(name=_model_name(path, local, step), identity=identity, params=params)
