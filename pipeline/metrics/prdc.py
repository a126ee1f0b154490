"""k-nearest-neighbour manifold metrics: improved precision/recall and density/coverage.

Notation (code name → paper name):

    real, fake           → {Xᵢ}ᵢ₌₁..N real, {Yⱼ}ⱼ₌₁..M generated features
    sq_radii_real        → NND_k(Xᵢ)²: squared distance from Xᵢ to its k-th nearest other real sample
    ball                 → B(Xᵢ, NND_k(Xᵢ)), the k-NN ball around a sample
    precision            → (1/M) Σⱼ 1[∃ i: Yⱼ ∈ B(Xᵢ)]        (Kynkäänniemi et al. 2019)
    recall               → (1/N) Σᵢ 1[∃ j: Xᵢ ∈ B(Yⱼ)]
    density              → (1/(kM)) Σⱼ Σᵢ 1[Yⱼ ∈ B(Xᵢ)]       (Naeem et al. 2020)
    coverage             → (1/N) Σᵢ 1[∃ j: Yⱼ ∈ B(Xᵢ)]

Distances are Euclidean, computed in float64 in chunks of ``chunk_size`` rows, so memory is O(N · chunk_size),
never the full N × M matrix. Squared distances are compared (the comparison is the same as on distances). Both
sets are first shifted by the real mean (distances are translation invariant; this keeps ‖a‖² + ‖b‖² − 2aᵀb
accurate). The self-distance is excluded from the k-NN radius as in both references: the radius is the
(k+1)-th smallest distance of a sample to its own set, the smallest being itself (0).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.metrics._checks import _check_positive_int, _check_same_dim, _features

DEFAULT_CHUNK_SIZE = 1024


def _sq_dists(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between rows of ``a`` (chunk, d) and ``b`` (N, d); ``b_sq`` = ‖b‖²."""
    d2 = (a.square().sum(dim=1, keepdim=True) + b_sq.unsqueeze(0)).addmm_(a, b.mT, alpha=-2.0)
    return d2.clamp_min_(0.0)


def _kth_nn_sq_radii(x: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """Squared distance of each row of ``x`` to its k-th nearest other row: the (k+1)-th smallest of its
    distances to all rows, itself (distance 0) included."""
    x_sq = x.square().sum(dim=1)
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        stop = min(start + chunk_size, x.shape[0])
        d2 = _sq_dists(x[start:stop], x, x_sq)
        d2[torch.arange(stop - start, device=x.device), torch.arange(start, stop, device=x.device)] = 0.0
        out[start:stop] = torch.topk(d2, k + 1, dim=1, largest=False, sorted=False).values.max(dim=1).values
    return out


def _real_fake_blocks(real: torch.Tensor, fake: torch.Tensor, chunk_size: int):
    """Yield (start, stop, squared distances real[start:stop] × fake) block by block: one pass over the
    real–fake distances, O(chunk_size · M) memory."""
    fake_sq = fake.square().sum(dim=1)
    for start in range(0, real.shape[0], chunk_size):
        stop = min(start + chunk_size, real.shape[0])
        yield start, stop, _sq_dists(real[start:stop], fake, fake_sq)


def _prepare(real: Any, fake: Any, k: int, chunk_size: int, fake_needs_k: bool) -> tuple[torch.Tensor, torch.Tensor]:
    k = _check_positive_int(k, "k")
    _check_positive_int(chunk_size, "chunk_size")
    why = f"k={k} nearest neighbours besides the sample itself"
    r = _features(real, "real", min_samples=k + 1, why=why)
    f = _features(fake, "fake", min_samples=k + 1 if fake_needs_k else 1, why=why)
    _check_same_dim(r, f, "real", "fake")
    center = r.mean(dim=0, keepdim=True)
    return r - center, f.to(r.device) - center


def precision_recall(real: Any, fake: Any, k: int = 3, chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of generated features against real ones.

    Convention: torch-fidelity's PRC: k = 3; the radius of each real (resp. fake) sample is the distance to its
    k-th nearest neighbour in its own set, itself excluded; balls are inclusive (``<=``). Precision = fraction
    of fake samples inside at least one real ball; recall = fraction of real samples inside at least one fake
    ball. Equals ``torch_fidelity.metric_prc`` on the same features (it computes distances in float32 with
    ``torch.cdist``; only exact ties can differ). The prdc package's precision/recall use a strict ``<`` instead.

    Args:
        real, fake: (N, d) and (M, d) feature matrices, each with at least k + 1 rows.
        k: neighbourhood size. chunk_size: rows per distance block (memory ∝ chunk_size · max(N, M)).

    Returns:
        (precision, recall) as Python floats in [0, 1].

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> real = torch.randn(300, 2, generator=g)
        >>> narrow = 0.1 * torch.randn(300, 2, generator=g)   # mode collapse onto the centre
        >>> p, r = precision_recall(real, narrow)
        >>> p > 0.95 and r < 0.3
        True
    """
    r, f = _prepare(real, fake, k, chunk_size, fake_needs_k=True)
    # 1. k-NN radii within each set
    sq_radii_real = _kth_nn_sq_radii(r, k, chunk_size)
    sq_radii_fake = _kth_nn_sq_radii(f, k, chunk_size)
    # 2. one pass over the real–fake distances serves both directions
    fake_in_real = torch.zeros(f.shape[0], dtype=torch.bool, device=r.device)
    real_in_fake = torch.empty(r.shape[0], dtype=torch.bool, device=r.device)
    for start, stop, d2 in _real_fake_blocks(r, f, chunk_size):
        real_in_fake[start:stop] = (d2 <= sq_radii_fake.unsqueeze(0)).any(dim=1)
        fake_in_real |= (d2 <= sq_radii_real[start:stop].unsqueeze(1)).any(dim=0)
    # 3. fractions
    precision = fake_in_real.double().mean()
    recall = real_in_fake.double().mean()
    return float(precision), float(recall)


def density_coverage(real: Any, fake: Any, k: int = 5, chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020) of generated features against real ones.

    Convention: the prdc package (``compute_prdc``): k = 5; real k-NN radii with the sample itself excluded;
    strict balls (``<``). Density = Σⱼ #{i: Yⱼ ∈ B(Xᵢ)} / (k·M) (unbounded above, ≈ 1 when fake ~ real);
    coverage = fraction of real samples whose ball contains at least one fake sample. Equals prdc on the same
    features. Because the balls are strict, a sample at distance exactly equal to a radius is outside; in
    particular, when all real samples coincide (radius 0) density = coverage = 0 even for identical fake samples.

    Args:
        real: (N, d) features, N ≥ k + 1. fake: (M, d) features, M ≥ 1.
        k: neighbourhood size. chunk_size: rows per distance block (memory ∝ chunk_size · max(N, M)).

    Returns:
        (density, coverage) as Python floats; coverage in [0, 1], density in [0, N/k].

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> real, fake = torch.randn(500, 4, generator=g), torch.randn(500, 4, generator=g)
        >>> density, coverage = density_coverage(real, fake)
        >>> 0.8 < density < 1.2 and coverage > 0.9
        True
    """
    r, f = _prepare(real, fake, k, chunk_size, fake_needs_k=False)
    # 1. k-NN radii of the real samples
    sq_radii_real = _kth_nn_sq_radii(r, k, chunk_size)
    # 2. one pass over the real–fake distances: strict ball membership
    balls_per_fake = torch.zeros(f.shape[0], dtype=torch.int64, device=r.device)
    covered = torch.empty(r.shape[0], dtype=torch.bool, device=r.device)
    for start, stop, d2 in _real_fake_blocks(r, f, chunk_size):
        inside = d2 < sq_radii_real[start:stop].unsqueeze(1)
        balls_per_fake += inside.sum(dim=0)
        covered[start:stop] = inside.any(dim=1)  # nearest fake strictly inside the ball
    # 3. density counts balls per fake sample; coverage counts real balls holding any fake sample
    density = balls_per_fake.sum().double() / (k * f.shape[0])
    coverage = covered.double().mean()
    return float(density), float(coverage)


precision_recall.higher_is_better = True  # type: ignore[attr-defined]
density_coverage.higher_is_better = True  # type: ignore[attr-defined]
