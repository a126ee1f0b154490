"""The pure metrics library (pipeline.metrics): closed forms, agreement with torchmetrics, independent naive
reference implementations, streaming statistics, and every bad input. Fast: small sets, float64."""

from __future__ import annotations

import doctest
import importlib
import logging
import math

import numpy as np
import pytest
import torch
from scipy.special import log_softmax as sp_log_softmax
from scipy.special import softmax as sp_softmax

from pipeline.metrics import (
    HIGHER_IS_BETTER,
    FeatureStats,
    ReferenceStats,
    clip_score,
    density_coverage,
    frechet_distance,
    frechet_distance_from_stats,
    inception_score,
    kernel_distance,
    precision_recall,
)
from pipeline.metrics.prdc import precision_recall_density_coverage

torch.set_num_threads(2)
# torchmetrics' KID and IS warn that they buffer all features; irrelevant for these small comparisons
pytestmark = pytest.mark.filterwarnings("ignore:Metric .* will save all extracted features:UserWarning")


class Identity(torch.nn.Module):
    """A 'feature extractor' that returns its input, so torchmetrics' metrics can be fed features directly."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def gaussian_sets(n1=400, n2=300, d=32, seed=0, shift=0.3, scale=1.2):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / math.sqrt(d)  # correlated features
    a = rng.standard_normal((n1, d)) @ mix + 0.1
    b = (rng.standard_normal((n2, d)) * scale) @ mix + shift
    return a, b


# ---------------------------------------------------------------------------------------------- FID


def test_fid_closed_form_2048():
    d = 2048
    eye = torch.eye(d, dtype=torch.float64)
    assert frechet_distance_from_stats(torch.zeros(d), eye, torch.ones(d), eye) == pytest.approx(2048.0, rel=1e-12)


def test_fid_closed_form_scaled_covariance():
    # N(0, a²I) vs N(0, b²I) in d dims: d (a − b)²
    d, a, b = 64, 3.0, 1.5
    value = frechet_distance_from_stats(np.zeros(d), a**2 * np.eye(d), np.zeros(d), b**2 * np.eye(d))
    assert value == pytest.approx(d * (a - b) ** 2, rel=1e-12)


def test_fid_identical_sets_is_zero():
    a, _ = gaussian_sets()
    assert abs(frechet_distance(a, a)) < 1e-9
    assert abs(frechet_distance(torch.from_numpy(a).float(), a.astype(np.float32))) < 1e-6


def test_fid_matches_torchmetrics_compute_fid_on_same_stats():
    from torchmetrics.image.fid import _compute_fid

    a, b = gaussian_sets(n1=500, n2=400, d=64)
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    ours = frechet_distance_from_stats(mu1, s1, mu2, s2)
    theirs = float(_compute_fid(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2))))
    assert ours > 1.0
    assert rel(ours, theirs) < 1e-5
    assert rel(ours, theirs) < 1e-9  # in fact much closer: both float64


def test_fid_matches_torchmetrics_frechet_inception_distance_on_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = gaussian_sets(n1=500, n2=450, d=48, seed=3)
    tm = FrechetInceptionDistance(feature=Identity(48))
    for chunk in np.array_split(a, 4):
        tm.update(torch.from_numpy(chunk), real=True)
    for chunk in np.array_split(b, 3):
        tm.update(torch.from_numpy(chunk), real=False)
    theirs = float(tm.compute())
    assert rel(frechet_distance(a, b), theirs) < 1e-5
    # streamed through FeatureStats in other batch sizes, and with the reference cached: same value
    sa, sb = FeatureStats(), FeatureStats()
    for chunk in np.array_split(a, 7):
        sa.update(chunk)
    for chunk in np.array_split(b, 2):
        sb.update(torch.from_numpy(chunk))
    assert rel(frechet_distance(sa, sb), theirs) < 1e-5
    assert rel(frechet_distance(sa.reference(), sb), theirs) < 1e-5
    assert rel(frechet_distance(sb, sa.reference(factor="eigh")), theirs) < 1e-5


def test_fid_is_symmetric_and_positive_for_different_sets():
    a, b = gaussian_sets(seed=5)
    ab, ba = frechet_distance(a, b), frechet_distance(b, a)
    assert ab > 0.5
    assert rel(ab, ba) < 1e-10


def test_reference_stats_caches_its_square_root(monkeypatch):
    import pipeline.metrics.stats as stats_mod

    a, b = gaussian_sets(d=24, seed=1)
    calls = []
    real_factor = stats_mod._psd_factor
    monkeypatch.setattr(stats_mod, "_psd_factor", lambda *args: calls.append(1) or real_factor(*args))
    ref = ReferenceStats.from_features(a)
    assert "cached=False" in repr(ref)  # lazy
    values = [frechet_distance(ref, b + i) for i in range(3)] + [frechet_distance(b, ref)]
    assert len(calls) == 1  # computed once, reused four times
    assert "cached=True" in repr(ref)
    f = ref.sqrt_factor
    assert torch.allclose(f @ f.T, ref.sigma, rtol=0, atol=1e-12)
    assert torch.equal(f, f.tril())  # Cholesky by default
    for i, v in enumerate(values[:3]):
        assert rel(v, frechet_distance(a, b + i)) < 1e-10
    # the symmetric root and the Cholesky factor give the same distance
    sym = ReferenceStats(ref.mu, ref.sigma, factor="eigh")
    assert torch.allclose(sym.sqrt_factor, sym.sqrt_factor.T, atol=1e-12)
    assert rel(frechet_distance(sym, b), values[0]) < 1e-10


def test_sqrt_trace_equals_general_eigenvalues_of_the_product():
    from pipeline.metrics._linalg import _psd_factor, _sqrt_trace

    a, b = gaussian_sets(n1=300, n2=300, d=40, seed=12)
    s1 = torch.from_numpy(np.cov(a, rowvar=False))
    s2 = torch.from_numpy(np.cov(b, rowvar=False))
    # independent: Tr((Σ₁Σ₂)^½) from the general (complex) eigenvalues of the non-symmetric product
    via_eigvals = float(torch.linalg.eigvals(s1 @ s2).sqrt().real.sum())
    for method in ("cholesky", "eigh"):
        factor, lower = _psd_factor(s1, method)
        assert lower == (method == "cholesky")
        for block in (256, 7):  # dense products, and blocks that skip the Cholesky factor's zeros (ragged end)
            value, rank = _sqrt_trace(factor, s2, lower, block=block)
            assert rank == 40
            assert rel(value, via_eigvals) < 1e-10


def test_fid_rank_deficient_is_finite_exact_and_warns(caplog):
    # N < d: Σ has rank N − 1. Independent check: Tr((Σ₁Σ₂)^½) = ‖A₁ᵀA₂‖_* / √((n₁−1)(n₂−1)) with Aᵢ the
    # centred feature matrices (nonzero eigenvalues of A₁A₁ᵀA₂A₂ᵀ = squared singular values of A₁ᵀA₂).
    rng = np.random.default_rng(7)
    n1, n2, d = 40, 30, 100
    a = rng.standard_normal((n1, d))
    b = rng.standard_normal((n2, d)) * 1.3 + 0.2
    ca, cb = a - a.mean(0), b - b.mean(0)
    sqrt_trace = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    s1, s2 = ca.T @ ca / (n1 - 1), cb.T @ cb / (n2 - 1)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * sqrt_trace
    with caplog.at_level(logging.WARNING, logger="pipeline.metrics.frechet"):
        value = frechet_distance(a, b)
    assert math.isfinite(value)
    assert rel(value, expected) < 1e-6
    assert any("fewer samples than feature dimensions" in r.getMessage() for r in caplog.records)
    # from statistics alone (n unknown): rank deficiency detected numerically, still finite, still exact
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.metrics.frechet"):
        value2 = frechet_distance_from_stats(a.mean(0), s1, b.mean(0), s2)
    assert rel(value2, expected) < 1e-6
    assert any("numerical rank" in r.getMessage() for r in caplog.records)
    # identical rank-deficient sets: ≈ 0, not NaN
    assert abs(frechet_distance(a, a)) < 1e-5


def test_fid_bad_inputs():
    a, b = gaussian_sets(d=8)
    with pytest.raises(ValueError, match="Expected `feats_a` and `feats_b` to have the same feature dimension"):
        frechet_distance(a, b[:, :7])
    with pytest.raises(ValueError, match="Expected at least 2 samples in `feats_b`"):
        frechet_distance(a, b[:1])
    bad = b.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="Expected finite values in `feats_b`, got 1 NaN"):
        frechet_distance(a, bad)
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(a[0], b)
    with pytest.raises(ValueError, match=r"Expected `sigma2` to be a \(8, 8\) covariance matrix"):
        frechet_distance_from_stats(np.zeros(8), np.eye(8), np.zeros(8), np.eye(7))
    with pytest.raises(ValueError, match="symmetric"):
        frechet_distance_from_stats(np.zeros(2), np.eye(2), np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance_from_stats(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -1.0]))
    with pytest.raises(ValueError, match="Expected `factor`"):
        ReferenceStats(np.zeros(2), np.eye(2), factor="sqrtm")


# ------------------------------------------------------------------------------------- FeatureStats


def test_feature_stats_streaming_matches_numpy_and_merges_exactly(tmp_path):
    a, _ = gaussian_sets(n1=257, d=16, seed=2)
    one = FeatureStats().update(a)
    assert one.n == 257
    np.testing.assert_allclose(one.mean.numpy(), a.mean(0), rtol=0, atol=1e-13)
    np.testing.assert_allclose(one.cov.numpy(), np.cov(a, rowvar=False, ddof=1), rtol=1e-11, atol=1e-13)
    # shards streamed separately then merged == one pass
    shards = [FeatureStats().update(s) for s in np.array_split(a, 5)]
    merged = FeatureStats()
    for s in shards:
        merged.merge(s)
    assert merged.n == one.n
    np.testing.assert_allclose(merged.cov.numpy(), one.cov.numpy(), rtol=1e-12, atol=1e-14)
    # disk round trip through np.savez
    np.savez(tmp_path / "stats.npz", **merged.to_dict())
    with np.load(tmp_path / "stats.npz") as state:
        loaded = FeatureStats.from_dict(state)
    assert loaded.n == 257 and loaded.dim == 16
    assert torch.equal(loaded.cov, merged.cov)
    ref = ReferenceStats.from_dict(one.reference().to_dict())
    assert ref.n == 257 and torch.equal(ref.sigma, one.cov)


def test_feature_stats_bad_inputs():
    stats = FeatureStats().update(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="Expected batches of 4 features, got shape"):
        stats.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="Expected finite values in `batch`"):
        stats.update(np.full((2, 4), np.inf))
    with pytest.raises(ValueError, match="dimension 4 to merge, got dimension 3"):
        stats.merge(FeatureStats().update(np.zeros((2, 3))))
    with pytest.raises(ValueError, match="Expected at least 2 samples for the covariance, got 1"):
        _ = FeatureStats().update(np.zeros((1, 4))).cov
    assert stats.n == 3  # failed updates left it untouched


# ---------------------------------------------------------------------------------------------- KID


def naive_unbiased_poly_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3) -> float:
    """Written independently: explicit pair loops over index masks, float64."""
    d = x.shape[1]

    def k(u, v):
        return (u @ v.T / d + 1.0) ** degree

    m, n = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    off_x, off_y = ~np.eye(m, dtype=bool), ~np.eye(n, dtype=bool)
    return kxx[off_x].mean() + kyy[off_y].mean() - 2.0 * k(x, y).mean()


def test_kid_one_subset_covering_all_equals_unbiased_mmd2_exactly():
    a, b = gaussian_sets(n1=120, n2=120, d=20, seed=4)
    expected = naive_unbiased_poly_mmd2(a, b)
    for seed in (0, 1, 123):
        mean, std = kernel_distance(a, b, subsets=1, subset_size=120, seed=seed)
        assert rel(mean, expected) < 1e-12
        assert std == 0.0
    assert expected > 0.01  # not a trivially zero comparison


def test_kid_matches_torchmetrics_on_same_features():
    from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd

    a, b = gaussian_sets(n1=150, n2=150, d=24, seed=6)
    tm = KernelInceptionDistance(feature=Identity(24), subsets=1, subset_size=150)
    tm.update(torch.from_numpy(a), real=True)
    tm.update(torch.from_numpy(b), real=False)
    tm_mean, _ = tm.compute()
    assert rel(kernel_distance(a, b, subsets=1, subset_size=150)[0], float(tm_mean)) < 1e-12
    # several subsets: same draws as torch-fidelity (RandomState(seed), real then fake per subset)
    rng = np.random.RandomState(11)
    mmds = []
    for _ in range(5):
        ia, ib = rng.choice(150, 60, replace=False), rng.choice(150, 60, replace=False)
        mmds.append(float(poly_mmd(torch.from_numpy(a[ia]), torch.from_numpy(b[ib]))))
    mean, std = kernel_distance(a, b, subsets=5, subset_size=60, seed=11)
    assert rel(mean, np.mean(mmds)) < 1e-12
    assert rel(std, np.std(mmds, ddof=0)) < 1e-9  # ddof=0 as torch-fidelity and torchmetrics
    assert std > 0


def test_kid_orders_and_seeds():
    a, b = gaussian_sets(n1=300, n2=300, d=16, seed=8, shift=0.1, scale=1.0)
    _, far = gaussian_sets(n1=300, n2=300, d=16, seed=9, shift=1.0, scale=1.0)
    _, mid = gaussian_sets(n1=300, n2=300, d=16, seed=9, shift=0.3, scale=1.0)
    near_mean, _ = kernel_distance(a, b, subsets=10, subset_size=100)  # same distribution: ≈ 0 (± 0.07)
    mid_mean, _ = kernel_distance(a, mid, subsets=10, subset_size=100)
    far_mean, _ = kernel_distance(a, far, subsets=10, subset_size=100)
    assert abs(near_mean) < 0.2 < mid_mean < 2.0 < far_mean
    assert kernel_distance(a, far, subsets=10, subset_size=100, seed=3) == kernel_distance(
        a, far, subsets=10, subset_size=100, seed=3
    )
    assert kernel_distance(a, far, subsets=10, subset_size=100, seed=3) != kernel_distance(
        a, far, subsets=10, subset_size=100, seed=4
    )


def test_kid_bad_inputs():
    a, b = gaussian_sets(n1=50, n2=40, d=8)
    with pytest.raises(
        ValueError,
        match="Expected `subset_size` ≤ the number of samples in both sets, "
        "got subset_size=45 with 50 real and 40 fake",
    ):
        kernel_distance(a, b, subset_size=45)
    with pytest.raises(ValueError, match="Expected `subsets` to be a positive integer, got 0"):
        kernel_distance(a, b, subsets=0, subset_size=10)
    with pytest.raises(ValueError, match="same feature dimension"):
        kernel_distance(a, b[:, :4], subset_size=10)
    with pytest.raises(ValueError, match="NaN"):
        kernel_distance(np.full((50, 8), np.nan), b, subset_size=10)


# ----------------------------------------------------------------------------------------------- IS


def naive_inception_score(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """Written independently with scipy: KL per row against the split marginal, splits of equal size."""
    scores = []
    for part in np.array_split(logits, splits):
        p = sp_softmax(part, axis=1)
        p_y = p.mean(axis=0)
        kl = (p * (sp_log_softmax(part, axis=1) - np.log(p_y))).sum(axis=1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_matches_naive_and_seeded_permutation():
    logits = np.random.default_rng(0).standard_normal((500, 20)) * 3
    mean, std = inception_score(logits, splits=10, seed=None)
    exp_mean, exp_std = naive_inception_score(logits, 10)
    assert rel(mean, exp_mean) < 1e-12 and rel(std, exp_std) < 1e-9
    perm = np.random.RandomState(5).permutation(500)  # torch-fidelity's shuffle
    mean5, std5 = inception_score(logits, splits=10, seed=5)
    exp_mean5, exp_std5 = naive_inception_score(logits[perm], 10)
    assert rel(mean5, exp_mean5) < 1e-12 and rel(std5, exp_std5) < 1e-9
    assert mean5 != mean  # the permutation changes the splits


def test_inception_score_matches_torchmetrics_up_to_its_std_convention():
    from torchmetrics.image.inception import InceptionScore

    logits = torch.from_numpy(np.random.default_rng(1).standard_normal((400, 15)) * 2)
    tm = InceptionScore(feature=Identity(15), splits=8)
    tm.update(logits)
    torch.manual_seed(99)
    tm_mean, tm_std = (float(v) for v in tm.compute())
    torch.manual_seed(99)
    perm = torch.randperm(400)  # the permutation torchmetrics drew
    mean, std = inception_score(logits[perm], splits=8, seed=None)
    assert rel(mean, tm_mean) < 1e-12
    assert rel(std * math.sqrt(8 / 7), tm_std) < 1e-9  # torchmetrics: unbiased std


def test_inception_score_closed_forms_and_bad_inputs():
    confident = torch.eye(10).repeat(20, 1) * 60.0  # each image sure of its class, classes balanced per split
    assert inception_score(confident, splits=4, seed=None) == pytest.approx((10.0, 0.0), abs=1e-9)
    assert 8.0 < inception_score(confident, splits=4, seed=0)[0] < 10.0  # shuffled: splits not balanced
    assert inception_score(torch.zeros(100, 10), splits=5) == pytest.approx((1.0, 0.0), abs=1e-12)
    collapsed = torch.zeros(100, 10)
    collapsed[:, 3] = 60.0  # every image the same confident class
    assert inception_score(collapsed, splits=5)[0] == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="Expected at least 10 samples in `logits`"):
        inception_score(torch.zeros(9, 10), splits=10)
    with pytest.raises(ValueError, match="at least 2 classes"):
        inception_score(torch.zeros(20, 1), splits=2)


# ------------------------------------------------------------------------------ precision / recall, D / C


def naive_prdc(real: np.ndarray, fake: np.ndarray, k: int, inclusive: bool) -> dict[str, float]:
    """Full-matrix reference, written differently: explicit difference tensors and a full sort."""
    d_rr = np.sqrt(((real[:, None, :] - real[None, :, :]) ** 2).sum(-1))
    d_ff = np.sqrt(((fake[:, None, :] - fake[None, :, :]) ** 2).sum(-1))
    d_rf = np.sqrt(((real[:, None, :] - fake[None, :, :]) ** 2).sum(-1))
    r_real = np.sort(d_rr, axis=1)[:, k]  # index 0 is the sample itself
    r_fake = np.sort(d_ff, axis=1)[:, k]
    inside = np.less_equal if inclusive else np.less
    in_real_ball = inside(d_rf, r_real[:, None])  # [i, j]: fake j in the ball of real i
    in_fake_ball = inside(d_rf, r_fake[None, :])  # [i, j]: real i in the ball of fake j
    return {
        "precision": in_real_ball.any(axis=0).mean(),
        "recall": in_fake_ball.any(axis=1).mean(),
        "density": in_real_ball.sum() / (k * fake.shape[0]),
        "coverage": (d_rf.min(axis=1) < r_real).mean(),
    }


@pytest.mark.parametrize("k,chunk_size", [(1, 7), (3, 16), (3, 1024), (5, 33)])
def test_precision_recall_density_coverage_match_naive_reference_exactly(k, chunk_size):
    rng = np.random.default_rng(k * 100 + chunk_size)
    real = rng.standard_normal((150, 6))
    fake = rng.standard_normal((110, 6)) * 1.3 + 0.4
    p, r = precision_recall(real, fake, k=k, chunk_size=chunk_size)
    d, c = density_coverage(real, fake, k=k, chunk_size=chunk_size)
    inc, strict = naive_prdc(real, fake, k, inclusive=True), naive_prdc(real, fake, k, inclusive=False)
    assert (p, r) == (inc["precision"], inc["recall"])
    assert (d, c) == (strict["density"], strict["coverage"])
    assert 0 < p < 1 and 0 < r < 1 and 0 < c < 1  # a non-trivial case
    # both pairs in one call (one real-radii pass for both k, one real-fake pass): the same numbers
    assert precision_recall_density_coverage(real, fake, k_pr=k, k_dc=k + 2, chunk_size=chunk_size) == (
        p,
        r,
        *density_coverage(real, fake, k=k + 2, chunk_size=chunk_size),
    )


def test_inclusive_versus_strict_ball_on_a_lattice():
    # integer points: many exact distance ties, where `<=` (torch-fidelity) and `<` (prdc) differ
    grid = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2).astype(float)
    # (-1, y) lies exactly on the k-NN sphere (radius 1) of the edge point (0, y), inside only the corners'
    # balls (radius √2) when strict
    fake = np.array([(-1.0, y) for y in range(6)] + [(2.5, 2.5), (7.0, 3.0)])
    p, r = precision_recall(grid, fake, k=3)
    d, c = density_coverage(grid, fake, k=3)
    inc, strict = naive_prdc(grid, fake, 3, inclusive=True), naive_prdc(grid, fake, 3, inclusive=False)
    assert (p, r) == (inc["precision"], inc["recall"])
    assert (d, c) == (strict["density"], strict["coverage"])
    assert (p, inc["precision"], strict["precision"]) == (7 / 8, 7 / 8, 3 / 8)  # the tie rule matters here


def test_precision_high_recall_low_for_a_narrow_fake_set():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(1000, 8, generator=g, dtype=torch.float64)
    narrow = 0.25 * torch.randn(1000, 8, generator=g, dtype=torch.float64)  # mode collapse onto the centre
    p, r = precision_recall(real, narrow)
    assert p > 0.95  # measured 1.0
    assert r < 0.05  # measured 0.008
    d, c = density_coverage(real, narrow)
    assert d > 2.0 and c < 0.4  # crowds the dense centre (2.33), covers little (0.26)
    # and the other way round: a wide fake set has low precision, high recall
    p_wide, r_wide = precision_recall(real, 3.0 * real.flip(0))
    assert p_wide < 0.3 and r_wide > 0.95


def test_identical_and_disjoint_sets():
    x = np.random.default_rng(2).standard_normal((200, 5))
    assert precision_recall(x, x) == (1.0, 1.0)
    # strict balls: each real ball holds the sample itself and its k − 1 nearest (the k-th is on the boundary)
    assert density_coverage(x, x) == (1.0, 1.0)
    # all samples coinciding: radius 0, strict balls are empty → density = coverage = 0; inclusive P/R = 1
    const = np.ones((30, 5))
    assert density_coverage(const, const) == (0.0, 0.0)
    assert precision_recall(const, const) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)
    assert density_coverage(x, x + 100.0) == (0.0, 0.0)


def test_prdc_readme_regime_at_smaller_size():
    # prdc README: 10000×1000 N(0,I) vs N(0,I), k=5 → P 0.477, R 0.471, D 1.056, C 0.974. D and C do not depend
    # on N for identical distributions (E[D] = 1, C → 1 − 2⁻ᵏ ≈ 0.969); P and R shrink as N grows (0.62 at
    # N = 1000 here), so only D and C are compared at this size (full size: the slow test below).
    g = torch.Generator().manual_seed(0)
    real = torch.randn(1500, 1000, generator=g)
    fake = torch.randn(1500, 1000, generator=g)
    d, c = density_coverage(real, fake, k=5)
    p, r = precision_recall(real, fake, k=5)
    assert d == pytest.approx(1.0, abs=0.08)
    assert c == pytest.approx(0.97, abs=0.015)
    assert 0.47 < p < 0.7 and 0.47 < r < 0.7 and abs(p - r) < 0.06


@pytest.mark.slow
def test_prdc_readme_example_full_size():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(10000, 1000, generator=g)
    fake = torch.randn(10000, 1000, generator=g)
    p, r = precision_recall(real, fake, k=5)
    d, c = density_coverage(real, fake, k=5)
    assert p == pytest.approx(0.477, abs=0.02) and r == pytest.approx(0.471, abs=0.02)
    assert d == pytest.approx(1.056, abs=0.06) and c == pytest.approx(0.974, abs=0.01)


def test_pairwise_distances_are_chunked(monkeypatch):
    import pipeline.metrics.prdc as prdc_mod

    shapes = []
    real_sq_dists = prdc_mod._sq_dists
    monkeypatch.setattr(
        prdc_mod, "_sq_dists", lambda a, b, b_sq: shapes.append((a.shape[0], b.shape[0])) or real_sq_dists(a, b, b_sq)
    )
    real, fake = np.random.default_rng(0).standard_normal((300, 4)), np.random.default_rng(1).standard_normal((250, 4))
    unchunked = precision_recall(real, fake, chunk_size=10_000), density_coverage(real, fake, chunk_size=10_000)
    shapes.clear()
    chunked = precision_recall(real, fake, chunk_size=32), density_coverage(real, fake, chunk_size=32)
    assert chunked == unchunked
    assert max(rows for rows, _ in shapes) == 32  # never a full N × M block: memory O(N · chunk)
    assert max(rows * cols for rows, cols in shapes) == 32 * 300


def test_prdc_bad_inputs():
    x = np.random.default_rng(0).standard_normal((10, 3))
    with pytest.raises(ValueError, match=r"Expected at least 4 samples in `fake` \(k=3 nearest neighbours"):
        precision_recall(x, x[:3], k=3)
    with pytest.raises(ValueError, match="Expected at least 6 samples in `real`"):
        density_coverage(x[:5], x, k=5)
    assert density_coverage(x, x[:1], k=5)[1] >= 0.0  # D/C need k + 1 real samples only
    with pytest.raises(ValueError, match="same feature dimension"):
        precision_recall(x, x[:, :2])
    with pytest.raises(ValueError, match="Expected `k` to be a positive integer, got 0"):
        precision_recall(x, x, k=0)
    with pytest.raises(ValueError, match="Expected `k_dc` to be a positive integer, got 0"):
        precision_recall_density_coverage(x, x, k_dc=0)
    with pytest.raises(ValueError, match=r"Expected at least 10 samples in `real` \(k=9 nearest"):
        precision_recall_density_coverage(x[:9], x, k_pr=3, k_dc=9)
    with pytest.raises(ValueError, match=r"Expected at least 4 samples in `fake` \(k=3 nearest"):
        precision_recall_density_coverage(x, x[:3], k_pr=3, k_dc=2)
    with pytest.raises(ValueError, match="NaN"):
        density_coverage(x, np.where(x > 1, np.nan, x))


def test_knn_radii_strips_handle_blocks_smaller_than_k():
    # each distance pair is computed once (upper strips); blocks of 2 rows < k + 1 = 4 and a ragged last block
    rng = np.random.default_rng(3)
    real, fake = rng.standard_normal((41, 5)), rng.standard_normal((37, 5)) + 0.3
    inc, strict = naive_prdc(real, fake, 3, inclusive=True), naive_prdc(real, fake, 3, inclusive=False)
    for chunk_size in (1, 2, 40):
        assert precision_recall(real, fake, k=3, chunk_size=chunk_size) == (inc["precision"], inc["recall"])
        assert density_coverage(real, fake, k=3, chunk_size=chunk_size) == (strict["density"], strict["coverage"])


# ------------------------------------------------------------------------- memmaps, chunking, devices


@pytest.fixture()
def memmapped_sets(tmp_path):
    """Two float32 feature sets saved as .npy and opened as read-only memmaps, with tensor copies."""
    a, b = gaussian_sets(n1=300, n2=260, d=24, seed=21)
    np.save(tmp_path / "real.npy", a.astype(np.float32))
    np.save(tmp_path / "fake.npy", b.astype(np.float32))
    real_mm = np.load(tmp_path / "real.npy", mmap_mode="r")
    fake_mm = np.load(tmp_path / "fake.npy", mmap_mode="r")
    assert isinstance(real_mm, np.memmap) and not real_mm.flags.writeable
    return real_mm, fake_mm, torch.from_numpy(np.array(real_mm)), torch.from_numpy(np.array(fake_mm))


def test_memmap_input_gives_the_same_numbers_as_tensor_input(memmapped_sets, recwarn):
    real_mm, fake_mm, real_t, fake_t = memmapped_sets
    for k in (3, 5):
        assert precision_recall(real_mm, fake_mm, k=k, chunk_size=64) == precision_recall(
            real_t, fake_t, k=k, chunk_size=64
        )
        assert density_coverage(real_mm, fake_mm, k=k) == density_coverage(real_t, fake_t, k=k)
    both = precision_recall_density_coverage(real_mm, fake_mm, k_pr=3, k_dc=5)
    assert both == precision_recall(real_t, fake_t, k=3) + density_coverage(real_t, fake_t, k=5)
    kid_mm = kernel_distance(real_mm, fake_mm, subsets=7, subset_size=50, seed=3)
    assert kid_mm == kernel_distance(real_t, fake_t, subsets=7, subset_size=50, seed=3)
    assert kid_mm == kernel_distance(np.array(real_mm), fake_t, subsets=7, subset_size=50, seed=3)
    assert frechet_distance(real_mm, fake_mm) == frechet_distance(real_t, fake_t)
    # and the float32 values mean what float64 copies of them mean, to rounding
    assert rel(frechet_distance(real_mm, fake_mm), frechet_distance(real_t.double(), fake_t.double())) < 1e-12
    assert not [w for w in recwarn if "not writable" in str(w.message)]  # read-only memmaps are never wrapped


def test_feature_stats_from_features_streams_fixed_chunks(memmapped_sets):
    real_mm, _, real_t, _ = memmapped_sets
    ref = FeatureStats.from_features(real_t, chunk_rows=64)
    for x in (real_mm, np.array(real_mm), real_t.numpy()):
        other = FeatureStats.from_features(x, chunk_rows=64)  # same chunks, any container: the same bits
        assert other.n == 300 and torch.equal(other.cov, ref.cov) and torch.equal(other.mean, ref.mean)
    assert torch.equal(FeatureStats().update(real_mm).cov, FeatureStats.from_features(real_t).cov)  # default chunks
    # other chunkings agree to float64 rounding, and with the numpy covariance of the float32 values
    other = FeatureStats.from_features(real_mm, chunk_rows=7)
    np.testing.assert_allclose(other.cov.numpy(), ref.cov.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        ref.cov.numpy(), np.cov(np.asarray(real_mm, np.float64), rowvar=False), rtol=1e-11, atol=1e-13
    )
    assert ReferenceStats.from_features(real_mm).n == 300
    with pytest.raises(ValueError, match="Expected `chunk_rows` to be a positive integer, got 0"):
        FeatureStats.from_features(real_mm, chunk_rows=0)
    bad = np.array(real_mm)
    bad[299, 0], bad[5, 1] = np.inf, np.nan
    with pytest.raises(ValueError, match="Expected finite values in `feats`, got 1 NaN and 1 Inf entries"):
        FeatureStats.from_features(bad, chunk_rows=64)  # counted over all chunks


def test_metrics_device_argument(memmapped_sets):
    real_mm, fake_mm, real_t, fake_t = memmapped_sets
    assert precision_recall(real_mm, fake_mm, device="cpu") == precision_recall(real_t, fake_t)
    assert kernel_distance(real_mm, fake_mm, subsets=2, subset_size=40, device=torch.device("cpu")) == kernel_distance(
        real_t, fake_t, subsets=2, subset_size=40
    )
    with pytest.raises(ValueError, match="Expected `device` to be None, a torch.device or a device string"):
        density_coverage(real_mm, fake_mm, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch.cuda.is_available\\(\\) is False"):
            precision_recall(real_mm, fake_mm, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(memmapped_sets):
    real_mm, fake_mm, real_t, fake_t = memmapped_sets
    a, b = gaussian_sets(n1=3000, n2=2500, d=256, seed=22)
    a32, b32 = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    # PR / DC: the same counts (random features: no exact distance ties); memmaps and CUDA tensors as input
    for real, fake, cuda_real, cuda_fake in ((a32, b32, a32.cuda(), b32.cuda()), (real_mm, fake_mm, real_mm, fake_mm)):
        kw = {} if isinstance(cuda_real, torch.Tensor) else {"device": "cuda"}
        assert precision_recall(cuda_real, cuda_fake, **kw) == precision_recall(real, fake)
        assert density_coverage(cuda_real, cuda_fake, **kw) == density_coverage(real, fake)
        assert precision_recall(real, fake, device="cuda", chunk_size=333) == precision_recall(real, fake)
    # KID: the same subsets (numpy RandomState), Gram sums in float64
    cpu_kid = kernel_distance(a32, b32, subsets=20, subset_size=500, seed=2020)
    for kid in (
        kernel_distance(a32.cuda(), b32.cuda(), subsets=20, subset_size=500, seed=2020),
        kernel_distance(a32, b32, subsets=20, subset_size=500, seed=2020, device="cuda"),
    ):
        assert rel(kid[0], cpu_kid[0]) < 1e-6 and rel(kid[1], cpu_kid[1]) < 1e-6
    # FID: statistics accumulated on the GPU, distance there or on the CPU
    cpu_fid = frechet_distance(a32, b32)
    assert cpu_fid > 0.5
    sa, sb = FeatureStats.from_features(a32, device="cuda"), FeatureStats.from_features(b32.cuda())
    assert sa.mean.is_cuda and sb.mean.is_cuda
    for fid in (
        frechet_distance(sa, sb),
        frechet_distance(a32, b32, device="cuda"),
        frechet_distance(sa.reference(), b32),
        frechet_distance(a32.cuda(), b32.cuda()),
    ):
        assert rel(fid, cpu_fid) < 1e-6


# --------------------------------------------------------------------------------------- CLIP score


def test_clip_score_convention():
    rng = np.random.default_rng(0)
    img, txt = rng.standard_normal((50, 16)), rng.standard_normal((50, 16))
    cos = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    assert (cos < 0).any() and (cos > 0).any()
    assert clip_score(img, txt) == pytest.approx(100 * np.maximum(cos, 0).mean(), rel=1e-12)
    # scale invariant (normalised inside); identical embeddings score 100
    assert clip_score(3 * img, 0.5 * txt) == pytest.approx(clip_score(img, txt), rel=1e-12)
    assert clip_score(img, img) == pytest.approx(100.0, rel=1e-12)
    # when every cosine is positive this is also torchmetrics' max(mean(100·cos), 0)
    pos_txt = img + 0.3 * txt
    cos_pos = (img * pos_txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(pos_txt, axis=1)
    assert (cos_pos > 0).all()
    assert clip_score(img, pos_txt) == pytest.approx(max(100 * cos_pos.mean(), 0), rel=1e-12)


def test_clip_score_bad_inputs():
    with pytest.raises(ValueError, match=r"same shape, got \(4, 8\) and \(3, 8\)"):
        clip_score(np.ones((4, 8)), np.ones((3, 8)))
    with pytest.raises(ValueError, match="nonzero embeddings in `text_embeds`, got 1 all-zero rows"):
        clip_score(np.ones((2, 8)), np.vstack([np.ones(8), np.zeros(8)]))


# ------------------------------------------------------------------------------------------ contract


def test_higher_is_better_and_float_outputs():
    assert HIGHER_IS_BETTER == {
        "fid": False,
        "kid": False,
        "is": True,
        "precision": True,
        "recall": True,
        "density": True,
        "coverage": True,
        "clip_score": True,
        "cmmd": False,
        "vendi": True,
    }
    assert frechet_distance.higher_is_better is False and inception_score.higher_is_better is True
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    outs = [
        frechet_distance(x, x + 1),
        *kernel_distance(x, x + 1, subsets=2, subset_size=20),
        *inception_score(x, 4),
        *precision_recall(x, x + 1),
        *density_coverage(x, x + 1),
        clip_score(x, x + 1),
    ]
    assert all(type(v) is float for v in outs)


@pytest.mark.parametrize("module", ["frechet", "kernel", "inception", "prdc", "clip", "stats"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(f"pipeline.metrics.{module}"))
    assert result.attempted > 0 and result.failed == 0
