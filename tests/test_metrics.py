"""Tests for adaptive_sched.metrics: FID against closed forms, KID against a naive double-loop MMD²."""
from __future__ import annotations

import math

import numpy as np
import pytest

from adaptive_sched.errors import UsageError
from adaptive_sched.metrics import (feature_stats, frechet_distance, frechet_distance_from_stats,
                                    kernel_inception_distance, mmd2_unbiased)


def commuting_gaussians(d: int, seed: int = 0):
    """Two Gaussians whose covariances share eigenvectors Q: Σ1 = Q diag(s1) Qᵀ, Σ2 = Q diag(s2) Qᵀ."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1, s2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    return mu1, q @ np.diag(s1) @ q.T, s1, mu2, q @ np.diag(s2) @ q.T, s2


def closed_form(mu1, s1, mu2, s2) -> float:
    """FD for covariances with common eigenvectors and eigenvalues s1, s2: ‖Δμ‖² + Σ (s1 + s2 − 2√(s1 s2))."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))


def test_fd_from_stats_equals_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    got = frechet_distance_from_stats(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(closed_form(mu1, s1, mu2, s2), rel=1e-12, abs=1e-12)


def test_fd_from_stats_equals_closed_form_for_rotated_covariances():
    mu1, sigma1, s1, mu2, sigma2, s2 = commuting_gaussians(5)
    got = frechet_distance_from_stats(mu1, sigma1, mu2, sigma2)
    assert got == pytest.approx(closed_form(mu1, s1, mu2, s2), rel=1e-9)


def test_fd_from_stats_handles_singular_covariances():
    # Σ1 Σ2 = 0, so its square root is 0: FD = ‖Δμ‖² + Tr Σ1 + Tr Σ2 = 1 + 1 + 1
    assert frechet_distance_from_stats([0, 0], np.diag([1.0, 0]), [1, 0], np.diag([0, 1.0])) == pytest.approx(3.0)


def test_fd_of_gaussian_samples_approaches_the_true_parameters():
    mu1, sigma1, s1, mu2, sigma2, s2 = commuting_gaussians(4, seed=2)
    rng = np.random.default_rng(3)
    n = 100_000
    a = rng.multivariate_normal(mu1, sigma1, size=n)
    b = rng.multivariate_normal(mu2, sigma2, size=n)
    exact = closed_form(mu1, s1, mu2, s2)
    # Sampling error: each mean is off by ~√(s/N) ≈ 0.004, moving ‖Δμ‖² by ~2‖Δμ‖·0.004·√2 ≈ 0.03 at most
    # here; covariance entries are off by ~s√(2/N) ≈ 0.01. The estimator's bias is O(D/N) ≈ 4e-5.
    # 0.1 absolute is > 3 standard errors.
    assert frechet_distance(a, b) == pytest.approx(exact, abs=0.1)


def eigen_fid(a: np.ndarray, b: np.ndarray) -> float:
    """An independent FID: Tr (Σ1 Σ2)^{1/2} = Σ √eig(R Σ2 R), R = Σ1^{1/2} from eigh (real and PSD throughout)."""
    m1, m2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(c1)
    r = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    root_trace = np.sqrt(np.clip(np.linalg.eigvalsh(r @ c2 @ r), 0, None)).sum()
    return float((m1 - m2) @ (m1 - m2) + np.trace(c1) + np.trace(c2) - 2 * root_trace)


@pytest.mark.parametrize("n", [50, 127, 200])
def test_fd_scales_with_the_square_of_the_feature_scale_even_with_fewer_samples_than_dimensions(n):
    """Features of scale 1e3 (a TorchScript net's logits) with N <= D: the absolute realness tolerance and ridge
    refused them ("not finite"), though FID(c·a, c·b) = c²·FID(a, b) exactly."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(n, 128)), rng.normal(0.1, 1.3, size=(n, 128))
    unit = frechet_distance(a, b)
    assert unit == pytest.approx(eigen_fid(a, b), rel=1e-6)
    assert frechet_distance(1e3 * a, 1e3 * b) == pytest.approx(1e6 * unit, rel=1e-6)


def test_fd_is_zero_on_itself_and_symmetric():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(500, 8)), rng.normal(1.0, 2.0, size=(300, 8))
    assert abs(frechet_distance(a, a)) < 1e-8
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 1.0
    few = rng.normal(size=(10, 20))  # N < D: singular covariance, still ≈ 0 on itself
    assert abs(frechet_distance(few, few)) < 1e-5


def test_feature_stats_are_mean_and_unbiased_covariance():
    a = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, sigma = feature_stats(a)
    np.testing.assert_allclose(mu, [2.0, 4.0])
    centred = a - mu
    np.testing.assert_allclose(sigma, centred.T @ centred / 2)
    assert feature_stats(np.arange(4.0).reshape(4, 1))[1].shape == (1, 1)


@pytest.mark.parametrize("a, b, match", [
    (np.zeros((5, 3)), np.zeros((5, 4)), "widths differ"),
    (np.zeros((1, 3)), np.zeros((5, 3)), "at least 2"),
    (np.zeros((5, 3)), np.full((5, 3), np.nan), "reference features contain NaN"),
    (np.zeros(5), np.zeros((5, 1)), "2-D"),
])
def test_bad_features_raise_one_line_usage_errors(a, b, match):
    for fn in (frechet_distance, kernel_inception_distance):
        with pytest.raises(UsageError, match=match) as info:
            fn(a, b)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_samples_of_a_diverged_model_score_nan_as_sliced_wasserstein_does(bad):
    """FID/KID raised on non-finite sample features, so a diverged run failed at every eval and compare retrained it
    on every call; now they score NaN (the run finishes, compare reports it diverged), as SWD's NaN/inf does."""
    import torch
    from adaptive_sched.evaluate import sliced_wasserstein
    rng = np.random.default_rng(0)
    samples, reference = rng.normal(size=(20, 3)), rng.normal(size=(30, 3))
    samples[4, 1] = bad
    assert math.isnan(frechet_distance(samples, reference))
    assert all(math.isnan(v) for v in kernel_inception_distance(samples, reference, subsets=3, subset_size=10))
    assert all(math.isnan(v) for v in feature_stats(samples)[0]) and np.isnan(feature_stats(samples)[1]).all()
    assert math.isnan(frechet_distance_from_stats(*feature_stats(samples), *feature_stats(reference)))
    assert not math.isfinite(sliced_wasserstein(torch.tensor(samples), torch.tensor(reference)))
    with pytest.raises(UsageError, match="reference stats contain NaN or inf"):     # a broken reference stays loud
        frechet_distance_from_stats(*feature_stats(reference), *feature_stats(samples))


def test_bad_stats_raise_usage_error():
    with pytest.raises(UsageError, match="shapes differ"):
        frechet_distance_from_stats(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def naive_mmd2(x, y) -> float:
    """Unbiased MMD² by explicit double loops with k(u, v) = (u·v/D + 1)³."""
    d = x.shape[1]

    def k(u, v):
        return (sum(ui * vi for ui, vi in zip(u, v)) / d + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_single_full_subset_matches_naive_double_loop():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(15, 4)), rng.normal(0.3, 1.2, size=(15, 4))
    mean, std = kernel_inception_distance(a, b, subsets=1, subset_size=1000)  # m capped at 15: the full sets
    assert mean == pytest.approx(naive_mmd2(a, b), rel=1e-10)
    assert std == 0.0
    c = rng.normal(size=(9, 4))  # unequal sizes
    assert mmd2_unbiased(a, c) == pytest.approx(naive_mmd2(a, c), rel=1e-10)


def test_kid_subsets_are_seeded_and_average_the_subset_estimates():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(40, 3)), rng.normal(0.5, 1.0, size=(30, 3))
    first = kernel_inception_distance(a, b, subsets=5, subset_size=10, seed=3)
    assert first == kernel_inception_distance(a, b, subsets=5, subset_size=10, seed=3)
    pick = np.random.default_rng(3)
    values = [naive_mmd2(a[pick.choice(40, 10, replace=False)], b[pick.choice(30, 10, replace=False)])
              for _ in range(5)]
    assert first[0] == pytest.approx(np.mean(values), rel=1e-10)
    assert first[1] == pytest.approx(np.std(values), rel=1e-8)


def test_kid_is_unbiased_for_same_distribution_and_positive_for_shifted():
    rng = np.random.default_rng(7)
    same = [kernel_inception_distance(rng.normal(size=(200, 8)), rng.normal(size=(200, 8)), subsets=1)[0]
            for _ in range(30)]
    mean, se = np.mean(same), np.std(same, ddof=1) / np.sqrt(len(same))
    assert abs(mean) < 4 * se  # unbiased: E[MMD²_u] = 0; the biased (V-statistic) estimate is ≫ se above 0
    shifted = kernel_inception_distance(rng.normal(size=(200, 8)), rng.normal(0.5, 1.0, size=(200, 8)),
                                        subsets=20, subset_size=100)
    assert shifted[0] > 10 * max(np.std(same), shifted[1] / np.sqrt(20))
