"""Input checks shared by every metric, kept apart from the math.

Each check raises ``ValueError`` with an "Expected …, got …" message naming the argument at fault, so a user
can tell which input to fix without reading the metric's code.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

# Rows per chunk when a feature matrix is read, checked or converted piecewise (4096 × 2048 float64 = 64 MiB).
# Fixed, so a result never depends on how the caller batched or stored the features.
DEFAULT_CHUNK_ROWS = 4096


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
_NP_INT_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.int32, np.int64))


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


def _device(device: Any, default: torch.device) -> torch.device:
    """The device a metric computes on: ``device`` when given (str or torch.device), else ``default``."""
    if device is None:
        return default
    try:
        dev = torch.device(device)
    except (TypeError, RuntimeError) as err:
        raise ValueError(
            f"Expected `device` to be None, a torch.device or a device string like 'cuda', got {device!r}"
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Expected `device` to be available, got {device!r} but torch.cuda.is_available() is False")
    return dev


def _numpy_to_float64(part: np.ndarray, device: torch.device) -> torch.Tensor:
    """A new float64 tensor on ``device`` from a numpy block (also a read-only memmap slice): widened on the CPU,
    or sent in its own (narrower) dtype and widened on an accelerator."""
    if device.type == "cpu":
        return torch.from_numpy(np.array(part, dtype=np.float64))
    return torch.from_numpy(np.array(part)).to(device=device, dtype=torch.float64)


class _FeatureRows:
    """A validated (N, d) feature matrix that is read in row chunks and never converted whole.

    Holds the caller's numpy array (a ``np.load(..., mmap_mode="r")`` memmap included) or torch tensor as it is;
    ``rows`` / ``take`` return float64 copies of a few rows on the device asked for. Shape and dtype are checked
    on construction (no data read); ``check_finite`` reads the data once, chunk by chunk. Float16/32/64 (and
    integers up to 2⁵³) widen to float64 exactly, so the same features give the same bits whatever their container
    (tensor, array, memmap).
    """

    def __init__(self, x: Any, name: str, min_samples: int = 1, why: str = "") -> None:
        if isinstance(x, torch.Tensor):
            data: Any = x.detach()
            if data.is_complex() or not (data.is_floating_point() or data.dtype in _INT_DTYPES):
                raise ValueError(f"Expected `{name}` to hold real numbers, got dtype {data.dtype}")
        else:
            if not isinstance(x, np.ndarray):
                try:
                    x = np.asarray(x)
                except (TypeError, ValueError) as err:
                    raise ValueError(
                        f"Expected `{name}` to be a numpy array or torch tensor, got {type(x).__name__}"
                    ) from err
            if x.dtype == object:
                raise ValueError(
                    f"Expected `{name}` to be a numpy array or torch tensor, got {type(x).__name__} of Python objects"
                )
            if not (x.dtype.kind == "f" or x.dtype in _NP_INT_DTYPES):
                raise ValueError(f"Expected `{name}` to hold real numbers, got dtype {x.dtype}")
            data = x
        if data.ndim != 2:
            raise ValueError(f"Expected `{name}` to be a 2-D (N, d) feature matrix, got shape {tuple(data.shape)}")
        if data.shape[1] == 0:
            raise ValueError(f"Expected `{name}` to have at least one feature column, got shape {tuple(data.shape)}")
        _check_min_samples(data.shape[0], min_samples, name, why)
        self.data, self.name = data, name

    @property
    def n(self) -> int:
        return int(self.data.shape[0])

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])

    @property
    def device(self) -> torch.device:
        """Where the features live: the tensor's device, CPU for numpy."""
        return self.data.device if isinstance(self.data, torch.Tensor) else torch.device("cpu")

    def rows(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """Rows ``start:stop`` as float64 on ``device`` (may share memory with the input: do not modify in place)."""
        if isinstance(self.data, torch.Tensor):
            return self.data[start:stop].to(device=device, dtype=torch.float64)
        return _numpy_to_float64(self.data[start:stop], device)

    def take(self, index: np.ndarray, device: torch.device) -> torch.Tensor:
        """Rows ``index`` (in that order) as float64 on ``device``; gathered in the input's dtype, then widened."""
        if isinstance(self.data, torch.Tensor):
            return self.data[torch.from_numpy(index).to(self.data.device)].to(device=device, dtype=torch.float64)
        return _numpy_to_float64(self.data[index], device)

    def chunks(
        self, device: torch.device, chunk_rows: int = DEFAULT_CHUNK_ROWS
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, float64 rows on ``device``) over fixed chunks of ``chunk_rows`` rows from row 0."""
        for start in range(0, self.n, chunk_rows):
            stop = min(start + chunk_rows, self.n)
            yield start, stop, self.rows(start, stop, device)

    def check_finite(self, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        """Raise the "Expected finite values" error, with the total NaN and Inf counts, if any entry is not finite.
        One pass in the input's own dtype and device."""
        n_nan = n_inf = 0
        for start in range(0, self.n, chunk_rows):
            part = self.data[start : start + chunk_rows]
            if isinstance(part, torch.Tensor):
                if not bool(torch.isfinite(part).all()):
                    n_nan += int(torch.isnan(part).sum())
                    n_inf += int(torch.isinf(part).sum())
            elif not np.isfinite(part).all():
                n_nan += int(np.isnan(part).sum())
                n_inf += int(np.isinf(part).sum())
        if n_nan or n_inf:
            raise ValueError(f"Expected finite values in `{self.name}`, got {n_nan} NaN and {n_inf} Inf entries")

    def mean(self, device: torch.device, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
        """Column means (d,), float64 on ``device``: the sum of fixed-chunk float64 sums, over N."""
        total = torch.zeros(self.dim, dtype=torch.float64, device=device)
        for _, _, rows in self.chunks(device, chunk_rows):
            total += rows.sum(dim=0)
        return total / self.n

    def centered(
        self, center: torch.Tensor, device: torch.device, chunk_rows: int = DEFAULT_CHUNK_ROWS
    ) -> torch.Tensor:
        """A new (N, d) float64 matrix on ``device``: the rows minus ``center``, filled chunk by chunk (the only
        full-size copy; no float32 or unshifted float64 copy of the whole set is made on the way)."""
        out = torch.empty(self.n, self.dim, dtype=torch.float64, device=device)
        for start, stop, rows in self.chunks(device, chunk_rows):
            torch.sub(rows, center, out=out[start:stop])
        return out
