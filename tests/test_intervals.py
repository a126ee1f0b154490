"""CMMD, Vendi, intervals and FD∞ against independent NumPy implementations and simulations."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_cmmd_equals_an_independent_numpy_implementation_and_is_small_between_halves():
    from pipeline.metrics.cmmd import cmmd

    rng = np.random.default_rng(0)
    x, y = _unit(rng.normal(size=(300, 24))), _unit(rng.normal(size=(250, 24)) + 0.3)

    def numpy_cmmd(a, b, sigma=10.0):  # Jayasumana et al.: biased MMD², every pair incl. i = j, × 1000
        def k(u, v):
            d2 = (u**2).sum(1)[:, None] + (v**2).sum(1)[None, :] - 2 * u @ v.T
            return np.exp(-d2 / (2 * sigma**2))

        return 1000 * (k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean())

    assert cmmd(x, y, chunk_rows=64) == pytest.approx(numpy_cmmd(x, y), rel=1e-6)
    halves = _unit(rng.normal(size=(10_000, 768)).astype(np.float32))
    assert 0 <= cmmd(halves[:5000], halves[5000:]) < 0.05


def test_vendi_equals_the_eigenvalue_definition_on_both_sides_of_n_equals_d():
    from pipeline.metrics.vendi import vendi_score

    rng = np.random.default_rng(1)
    for n, d in ((20, 50), (300, 8)):  # K/N directly, and the d × d Gram
        x = rng.normal(size=(n, d))
        xn = _unit(x)
        lam = np.linalg.eigvalsh(xn @ xn.T / n)
        lam = lam[lam > 1e-12]
        assert vendi_score(x) == pytest.approx(np.exp(-(lam * np.log(lam)).sum()), rel=1e-9)
    assert vendi_score(np.repeat(rng.normal(size=(1, 5)), 10, axis=0)) == pytest.approx(1.0)


def test_fd_interval_covers_the_expected_fd_and_a_fresh_run_mostly():
    from pipeline.metrics import FeatureStats, frechet_distance
    from pipeline.metrics.intervals import fd_subsample_sd, normal_interval

    rng = np.random.default_rng(0)
    d, n = 16, 600
    mix = np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)
    ref = FeatureStats.from_features(torch.from_numpy(rng.normal(size=(20_000, d)))).reference()

    def draw():
        return torch.from_numpy(rng.normal(size=(n, d)) @ mix + 0.1)

    fresh = [frechet_distance(FeatureStats.from_features(draw()), ref) for _ in range(100)]
    expected = float(np.mean(fresh))
    covers = fresh_covers = 0
    for trial in range(50):
        x = draw()
        lo, hi = normal_interval(
            frechet_distance(FeatureStats.from_features(x), ref), fd_subsample_sd(x, ref, replicates=20, seed=trial)
        )
        covers += lo <= expected <= hi
        fresh_covers += lo <= fresh[trial] <= hi
    assert covers >= 45  # a 95 % interval for the expected FD at this N
    assert fresh_covers >= 35  # a fresh run scatters with the same sd around it: ~83 % expected


def test_kernel_interval_is_not_narrower_than_the_spread_of_fresh_runs():
    from pipeline.metrics.intervals import kernel_subsample_sd

    rng = np.random.default_rng(2)
    d, n = 16, 400
    ref = torch.from_numpy(_unit(rng.normal(size=(800, d))))

    def draw():
        return torch.from_numpy(_unit(rng.normal(size=(n, d)) + 0.2))

    def full_kid(y):  # unbiased MMD² of the whole sets (the reference term is constant)
        k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
        kyy = k(y, y)
        return float((kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1)) - 2 * k(ref, y).mean())

    true_sd = np.std([full_kid(draw()) for _ in range(40)])
    est = np.mean([kernel_subsample_sd(ref, draw(), "kid", replicates=20, seed=i) for i in range(5)])
    assert 0.8 * true_sd < est < 2.0 * true_sd  # conservative: the degenerate part of the U-statistic
    assert kernel_subsample_sd(ref, draw(), "cmmd", replicates=10) > 0


def test_bootstrap_interval_and_fd_inf():
    from pipeline.metrics import FeatureStats, frechet_distance
    from pipeline.metrics.intervals import bootstrap_interval, fd_inf

    rng = np.random.default_rng(3)
    v = rng.normal(size=2000)
    lo, hi = bootstrap_interval(v)
    assert lo < v.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / np.sqrt(2000), rel=0.15)
    d = 8
    ref = FeatureStats.from_features(torch.from_numpy(rng.normal(size=(50_000, d)))).reference()
    x = torch.from_numpy(rng.normal(size=(4000, d)) + 0.05)
    # FD∞ removes the 1/N bias: same-distribution FD at N = 4000 is biased upwards, FD∞ is near the true 8·0.05²
    assert fd_inf(x, ref) < frechet_distance(FeatureStats.from_features(x), ref)
    assert abs(fd_inf(x, ref) - d * 0.05**2) < 0.01
