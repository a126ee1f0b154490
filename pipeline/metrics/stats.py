"""Streaming feature statistics (for FID) and frozen reference statistics with a cached square root.

``FeatureStats`` keeps what torchmetrics' ``FrechetInceptionDistance`` keeps: the sample count, a running float64
sum and a running float64 sum of outer products, so features can stream through batch by batch and never be held
all at once. Shards (several jobs, several processes) merge exactly by adding these sums. A whole set on disk
(``np.load(..., mmap_mode="r")``) streams through ``FeatureStats.from_features`` in fixed row chunks: memory is one
chunk plus the d × d sums, and the bits do not depend on how the features were batched or stored.

``ReferenceStats`` freezes (μ, Σ) for the reference side of many FID computations and computes a square-root
factor F of Σ (F Fᵀ = Σ) once, on first use, so each further FID against it skips that factorisation.

Reproducibility: on CPU the sums and the factor are computed on one intra-op thread (:func:`one_thread`), so the
same features give the same bits whatever the process's thread count was set to before.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import cached_property
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.metrics._checks import (
    DEFAULT_CHUNK_ROWS,
    _check_finite,
    _check_positive_int,
    _cov_matrix,
    _device,
    _FeatureRows,
    _mean_vector,
)
from pipeline.metrics._linalg import FactorMethod, _check_symmetric, _psd_factor


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed torch CPU work on one intra-op thread, then restore the thread count.

    Why: MKL's LAPACK (Cholesky, symmetric eigenvalues) and torch's parallel reductions split their work by thread
    count, so the same float64 input gives results that differ in the last bits when the count differs — ~1e-9
    relative on a Fréchet distance once its terms cancel. The count depends on what ran before (``pipeline.core.threads``
    lowers it on a busy machine, torchrun starts ranks with 1, a resumed run that generates nothing keeps its start
    value), so a resumed run's FD differed from the uninterrupted run's. One thread is the one count every machine
    and launch can give: the same bits whatever ran before. CUDA work is unaffected.
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class FeatureStats:
    """Running float64 statistics of a stream of (N, d) feature batches.

    Convention: ``mean`` = Σx / n and ``cov`` = (Σ xxᵀ − n·μμᵀ) / (n − 1), the unbiased (ddof=1) covariance, as
    torchmetrics' ``FrechetInceptionDistance.compute`` and torch-fidelity's ``np.cov(rowvar=False)``. The sums
    accumulate in float64, chunk by chunk from row 0, on one CPU thread (:func:`one_thread`): their bits depend on
    the features and the chunking only.

    Args:
        dim: the feature dimension d; inferred from the first batch when None.

    Example:
        >>> import torch
        >>> stats = FeatureStats()
        >>> _ = stats.update(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
        >>> _ = stats.update(torch.tensor([[4.0, 5.0]]))
        >>> stats.n, stats.mean.tolist(), stats.cov.tolist()
        (3, [2.0, 3.0], [[4.0, 4.0], [4.0, 4.0]])
        >>> FeatureStats.from_dict(stats.to_dict()).mean.tolist()
        [2.0, 3.0]
    """

    def __init__(self, dim: int | None = None) -> None:
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1):
            raise ValueError(f"Expected `dim` to be a positive integer or None, got {dim!r}")
        self.dim: int | None = None if dim is None else int(dim)
        self.n: int = 0
        self._sum: torch.Tensor | None = None
        self._sum_outer: torch.Tensor | None = None
        if self.dim is not None:
            self._allocate(self.dim, torch.device("cpu"))

    def _allocate(self, dim: int, device: torch.device) -> None:
        self.dim = dim
        self._sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self._sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, batch: Any) -> FeatureStats:
        """Add an (N, d) batch of features (numpy, memmap or torch; widened to float64 ``DEFAULT_CHUNK_ROWS`` rows at
        a time, so a large batch is never converted whole). Returns self (updated in place; untouched when the
        batch is rejected)."""
        src = _FeatureRows(batch, "batch", min_samples=0)
        if self.dim is not None and src.dim != self.dim:
            raise ValueError(f"Expected batches of {self.dim} features, got shape {tuple(src.data.shape)}")
        src.check_finite()
        if self._sum is None or (self.n == 0 and self._sum.device != src.device):
            self._allocate(src.dim, src.device)  # accumulate on the device the features arrive on
        return self._add_rows(src, DEFAULT_CHUNK_ROWS)

    def _add_rows(self, src: _FeatureRows, chunk_rows: int) -> FeatureStats:
        """Accumulate validated rows in fixed chunks of ``chunk_rows`` (from row 0) on this object's device, on one
        CPU thread (the reduction order must not depend on the thread count)."""
        with one_thread():
            for _, _, x in src.chunks(self._sum.device, chunk_rows):
                self._sum += x.sum(dim=0)
                self._sum_outer.addmm_(x.mT, x)
        self.n += src.n
        return self

    @classmethod
    def from_features(
        cls, feats: Any, chunk_rows: int = DEFAULT_CHUNK_ROWS, device: Any = None, name: str = "feats"
    ) -> FeatureStats:
        """Statistics of a whole (N, d) feature matrix, streamed in fixed chunks of ``chunk_rows`` rows.

        The input is never converted whole: a ``np.load(..., mmap_mode="r")`` memmap of 50 000 × 2048 float32
        features costs one float64 chunk (64 MiB at the default) plus the d × d sums. The result depends only on
        the features and ``chunk_rows``, not on their container (tensor, array, memmap: same bits) nor on how the
        caller batched them; it equals ``FeatureStats().update(feats)``. Streaming the same features through
        ``update`` in other batch sizes agrees to float64 rounding (~1e-15 relative), not bit for bit.

        Args:
            feats: (N, d) features (numpy array, memmap or torch tensor), finite.
            chunk_rows: rows widened to float64 and accumulated at a time.
            device: where the sums accumulate (float64); default the device of ``feats`` (CPU for numpy).
            name: the argument name used in error messages.
        """
        chunk_rows = _check_positive_int(chunk_rows, "chunk_rows")
        src = _FeatureRows(feats, name, min_samples=0)
        src.check_finite()
        out = cls()
        out._allocate(src.dim, _device(device, src.device))
        return out._add_rows(src, chunk_rows)

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another shard's statistics to this one (in place; returns self). Exact: the sums just add, so
        merging shards equals one pass over all their features up to float64 summation order."""
        if not isinstance(other, FeatureStats):
            raise ValueError(f"Expected a FeatureStats to merge, got {type(other).__name__}")
        if other.n == 0:
            return self
        if self.n == 0 and self.dim is None:
            self._allocate(other.dim, other._sum.device)
        if other.dim != self.dim:
            raise ValueError(f"Expected a FeatureStats of dimension {self.dim} to merge, got dimension {other.dim}")
        self._sum += other._sum.to(self._sum.device)
        self._sum_outer += other._sum_outer.to(self._sum.device)
        self.n += other.n
        return self

    def _require(self, n_min: int, what: str) -> None:
        if self.n < n_min:
            raise ValueError(f"Expected at least {n_min} samples for the {what}, got {self.n}")

    @property
    def mean(self) -> torch.Tensor:
        """μ = Σx / n, float64, shape (d,)."""
        self._require(1, "mean")
        return self._sum / self.n

    @property
    def cov(self) -> torch.Tensor:
        """Σ = (Σ xxᵀ − n·μμᵀ) / (n − 1), float64, shape (d, d) (unbiased, ddof=1)."""
        self._require(2, "covariance")
        mu = self.mean
        cov = (self._sum_outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return (cov + cov.mT) / 2  # exact symmetry (x.T @ x is symmetric only up to rounding in BLAS)

    def to_dict(self) -> dict[str, Any]:
        """State for disk caching: ``{"n": int, "dim": int, "sum": ndarray (d,), "sum_outer": ndarray (d, d)}``
        (float64 numpy arrays; ``np.savez(path, **stats.to_dict())`` works)."""
        if self.dim is None:
            raise ValueError("Expected a FeatureStats with at least one update before saving, got an empty one")
        return {
            "n": int(self.n),
            "dim": int(self.dim),
            "sum": self._sum.cpu().numpy().copy(),
            "sum_outer": self._sum_outer.cpu().numpy().copy(),
        }

    @classmethod
    def from_dict(cls, state: Any) -> FeatureStats:
        """Inverse of ``to_dict`` (also accepts the mapping returned by ``np.load`` of a saved ``.npz``)."""
        missing = {"n", "dim", "sum", "sum_outer"} - set(state.keys())
        if missing:
            raise ValueError(
                f"Expected FeatureStats state with keys n, dim, sum, sum_outer, got missing {sorted(missing)}"
            )
        dim = int(np.asarray(state["dim"]))
        out = cls(dim)
        s = torch.as_tensor(np.asarray(state["sum"], dtype=np.float64))
        so = torch.as_tensor(np.asarray(state["sum_outer"], dtype=np.float64))
        if s.shape != (dim,) or so.shape != (dim, dim):
            raise ValueError(
                f"Expected sum of shape ({dim},) and sum_outer of shape ({dim}, {dim}), "
                f"got {tuple(s.shape)} and {tuple(so.shape)}"
            )
        _check_finite(s, "sum")
        _check_finite(so, "sum_outer")
        out._sum, out._sum_outer, out.n = s.clone(), so.clone(), int(np.asarray(state["n"]))
        return out

    def reference(self, factor: FactorMethod = "cholesky") -> ReferenceStats:
        """Freeze into ``ReferenceStats`` (μ, Σ, n) for repeated FID computations against this set."""
        return ReferenceStats(self.mean, self.cov, n=self.n, factor=factor)

    def __repr__(self) -> str:
        return f"FeatureStats(n={self.n}, dim={self.dim})"


class ReferenceStats:
    """Frozen (μ, Σ) of a reference set, with a lazily computed and cached square-root factor of Σ.

    The factor F (F Fᵀ = Σ) is what the Fréchet distance needs from this side: Tr((Σ Σ₂)^½) = Σᵢ √λᵢ(Fᵀ Σ₂ F).
    It is computed on first use and reused by every later ``frechet_distance`` against this object.

    Args:
        mu: mean, shape (d,).
        sigma: covariance, shape (d, d), symmetric PSD.
        n: number of samples behind the statistics, if known (used to warn when n ≤ d).
        factor: ``"cholesky"`` (default; the lower Cholesky factor, falling back to the symmetric root when Σ is
            rank-deficient) or ``"eigh"`` (always the symmetric root Σ^½ = U diag(√λ) Uᵀ). Both give the same
            FID up to rounding; Cholesky is several times cheaper to compute.

    Example:
        >>> import torch
        >>> ref = ReferenceStats(torch.zeros(2), torch.eye(2) * 4.0)
        >>> ref.sqrt_factor.tolist()
        [[2.0, 0.0], [0.0, 2.0]]
    """

    def __init__(self, mu: Any, sigma: Any, n: int | None = None, factor: FactorMethod = "cholesky") -> None:
        self.mu = _mean_vector(mu, "mu")
        self.sigma = _cov_matrix(sigma, "sigma", self.mu.shape[0])
        _check_symmetric(self.sigma, "sigma")
        if factor not in ("cholesky", "eigh"):
            raise ValueError(f"Expected `factor` to be one of 'cholesky', 'eigh', got {factor!r}")
        self.factor_method: FactorMethod = factor
        self.n = None if n is None else int(n)

    @classmethod
    def from_features(cls, feats: Any, factor: FactorMethod = "cholesky", device: Any = None) -> ReferenceStats:
        """(μ, Σ) of an (N, d) feature matrix (float64, unbiased covariance), streamed through
        ``FeatureStats.from_features`` (memmaps welcome; ``device``: where the statistics are computed)."""
        src = _FeatureRows(feats, "feats", min_samples=2, why="a covariance needs two")
        return FeatureStats.from_features(src.data, device=device).reference(factor)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @cached_property
    def _factor(self) -> tuple[torch.Tensor, bool]:
        with one_thread():  # LAPACK's bits depend on the thread count
            return _psd_factor(self.sigma, self.factor_method, "sigma")

    @property
    def sqrt_factor(self) -> torch.Tensor:
        """F with F Fᵀ = Σ (float64), computed once on first access (lower triangular when Cholesky)."""
        return self._factor[0]

    @property
    def factor_is_lower(self) -> bool:
        """Whether ``sqrt_factor`` is lower triangular (the Cholesky factor, not the symmetric-root fallback)."""
        return self._factor[1]

    def to_dict(self) -> dict[str, Any]:
        """``{"mu", "sigma", "n"}`` as numpy (n = -1 when unknown); the factor is recomputed after loading."""
        return {
            "mu": self.mu.cpu().numpy().copy(),
            "sigma": self.sigma.cpu().numpy().copy(),
            "n": -1 if self.n is None else self.n,
        }

    @classmethod
    def from_dict(cls, state: Any, factor: FactorMethod = "cholesky") -> ReferenceStats:
        n = int(np.asarray(state["n"])) if "n" in state else -1
        return cls(np.asarray(state["mu"]), np.asarray(state["sigma"]), n=None if n < 0 else n, factor=factor)

    def __repr__(self) -> str:
        cached = "_factor" in self.__dict__
        return f"ReferenceStats(dim={self.dim}, n={self.n}, factor={self.factor_method!r}, cached={cached})"
