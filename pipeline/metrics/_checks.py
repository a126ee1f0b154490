"""Input checks shared by every metric, kept apart from the math.

Each check raises ``ValueError`` with an "Expected …, got …" message naming the argument at fault, so a user
can tell which input to fix without reading the metric's code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _as_float64(x: Any, name: str) -> torch.Tensor:
    """Numpy array, torch tensor or nested sequence → float64 torch tensor (on the input's device)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as err:
            raise ValueError(f"Expected `{name}` to be a numpy array or torch tensor, got {type(x).__name__}") from err
    if t.is_complex() or not (t.is_floating_point() or t.dtype in _INT_DTYPES):
        raise ValueError(f"Expected `{name}` to hold real numbers, got dtype {t.dtype}")
    return t.to(torch.float64)


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise ValueError(f"Expected finite values in `{name}`, got {n_nan} NaN and {n_inf} Inf entries")


def _features(x: Any, name: str, min_samples: int = 1, why: str = "") -> torch.Tensor:
    """Validate an (N, d) feature matrix: 2-D, at least ``min_samples`` rows, finite. Returns float64."""
    t = _as_float64(x, name)
    if t.ndim != 2:
        raise ValueError(f"Expected `{name}` to be a 2-D (N, d) feature matrix, got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"Expected `{name}` to have at least one feature column, got shape {tuple(t.shape)}")
    _check_min_samples(t.shape[0], min_samples, name, why)
    _check_finite(t, name)
    return t


def _check_min_samples(n: int, min_samples: int, name: str, why: str = "") -> None:
    if n < min_samples:
        reason = f" ({why})" if why else ""
        raise ValueError(f"Expected at least {min_samples} samples in `{name}`{reason}, got {n}")


def _check_same_dim(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"Expected `{name_a}` and `{name_b}` to have the same feature dimension, "
            f"got {a.shape[-1]} and {b.shape[-1]}"
        )


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"Expected `{name_a}` and `{name_b}` to have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, got {value!r}")
    return int(value)


def _mean_vector(x: Any, name: str) -> torch.Tensor:
    t = _as_float64(x, name)
    if t.ndim != 1:
        raise ValueError(f"Expected `{name}` to be a 1-D mean vector of shape (d,), got shape {tuple(t.shape)}")
    _check_finite(t, name)
    return t


def _cov_matrix(x: Any, name: str, dim: int) -> torch.Tensor:
    t = _as_float64(x, name)
    if t.shape != (dim, dim):
        raise ValueError(f"Expected `{name}` to be a ({dim}, {dim}) covariance matrix, got shape {tuple(t.shape)}")
    _check_finite(t, name)
    return t
