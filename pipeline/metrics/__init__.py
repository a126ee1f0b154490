"""Pure metric functions on features: no I/O, no models. Numpy arrays or torch tensors in, Python floats out.

Each function's docstring states its convention and the reference implementation it matches:

- ``frechet_distance`` / ``frechet_distance_from_stats``: FID as torchmetrics / torch-fidelity (float64,
  symmetric-eigen square-root trace, finite when N ≤ d); ``FeatureStats`` streams the statistics and
  ``ReferenceStats`` caches the reference side's square-root factor.
- ``kernel_distance``: KID as torch-fidelity (unbiased polynomial MMD², 100 × 1000 subsets, ddof=0 std).
- ``inception_score``: IS as torch-fidelity (float64 softmax of logits, seeded permutation, ddof=0 std).
- ``precision_recall``: improved P/R as torch-fidelity's PRC (k = 3, inclusive balls).
- ``density_coverage``: D/C as the prdc package (k = 5, strict balls).
- ``clip_score``: mean over pairs of 100 · max(cos, 0).

``one_thread`` runs torch CPU work on one intra-op thread: reductions and LAPACK then give the same bits whatever
the process's thread count (FD and its statistics use it always; the metrics mode wraps its other statistics too).

``HIGHER_IS_BETTER`` says, per metric name, which direction is better (per logged result key, for every mode:
``pipeline.core.metric_keys.higher_is_better``, which needs no torch; the two agree, tested).

The metrics *mode* (schema, stages, plots) is :mod:`pipeline.modes.metrics`; this package is its math and nothing
else. The functions above are imported on first use (:pep:`562`), so importing the package loads no torch.
"""

import importlib

# name -> the module defining it, imported on first access
_LAZY = {
    "clip_score": "clip",
    "clip_scores": "clip",
    "vendi_score": "vendi",
    "precision_recall_density_coverage": "prdc",
    "frechet_distance": "frechet",
    "frechet_distance_from_stats": "frechet",
    "inception_score": "inception",
    "kernel_distance": "kernel",
    "density_coverage": "prdc",
    "precision_recall": "prdc",
    "FeatureStats": "stats",
    "ReferenceStats": "stats",
    "one_thread": "stats",
}

HIGHER_IS_BETTER: dict[str, bool] = {
    "fid": False,  # frechet_distance, frechet_distance_from_stats (also FD with other extractors)
    "kid": False,  # kernel_distance (mean; the std is a spread, not a score)
    "is": True,  # inception_score
    "precision": True,
    "recall": True,
    "density": True,  # ≈ 1 when fake ~ real; above 1 means fake crowds the dense real regions
    "coverage": True,
    "clip_score": True,
    "cmmd": False,
    "vendi": True,  # effective number of distinct samples (diversity)
}

__all__ = [
    "HIGHER_IS_BETTER",
    "FeatureStats",
    "ReferenceStats",
    "clip_score",
    "clip_scores",
    "vendi_score",
    "precision_recall_density_coverage",
    "density_coverage",
    "frechet_distance",
    "frechet_distance_from_stats",
    "inception_score",
    "kernel_distance",
    "precision_recall",
    "one_thread",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
