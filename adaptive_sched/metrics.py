"""Sample-quality metrics on feature arrays (N, D): Fréchet distance (FID) and kernel distance (KID).

FID (Heusel et al. 2017): ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2}) between Gaussian fits of two
feature sets. KID (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel
k(x, y) = (xᵀy / D + 1)³, averaged over random equal-size subsets. Both follow the reference
implementations (pytorch-fid, torch-fidelity / clean-fid); the features come from adaptive_sched.features.
The first set is the samples, the second the reference: non-finite sample features (a diverged model's samples)
score NaN, as evaluate.sliced_wasserstein's NaN/inf does, so the run finishes and compare reports it diverged;
non-finite reference features, and shapes that cannot be scored, raise UsageError.
Pure numpy in and out; scipy is imported where it is used.
"""
from __future__ import annotations

import warnings

import numpy as np

from adaptive_sched.errors import UsageError

FID_EPS = 1e-6  # ridge added to both covariances when sqrtm(Σ_a Σ_b) fails (as pytorch-fid does)


def _features(a, name: str, finite: bool = True) -> np.ndarray:
    """`a` as a float64 (N, D) array with N >= 2 (and, when `finite`, no NaN/inf), else UsageError."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise UsageError(f"{name}: features must be a 2-D array (N, D), got shape {a.shape}; flatten them first")
    if a.shape[0] < 2:
        raise UsageError(f"{name}: need at least 2 feature rows, got {a.shape[0]}; pass more samples")
    if finite and not np.isfinite(a).all():
        raise UsageError(f"{name}: reference features contain NaN or inf; check the data and the feature network")
    return a


def _same_dim(a: np.ndarray, b: np.ndarray) -> None:
    """UsageError unless both feature arrays have the same width D."""
    if a.shape[1] != b.shape[1]:
        raise UsageError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}; use the same feature network for both sets")


def feature_stats(a) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian fit of features (N, D): mean μ (D,) and unbiased covariance Σ = (A−μ)ᵀ(A−μ)/(N−1) (D, D); NaN in both
    when a feature is not finite."""
    a = _features(a, "features", finite=False)
    if not np.isfinite(a).all():
        return np.full(a.shape[1], np.nan), np.full((a.shape[1], a.shape[1]), np.nan)
    return a.mean(axis=0), np.atleast_2d(np.cov(a, rowvar=False))


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray) -> np.ndarray | None:
    """Real part of sqrtm(Σ1 Σ2), or None when it is non-finite or far from real."""
    from scipy.linalg import LinAlgWarning, sqrtm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LinAlgWarning)  # singular Σ (N <= D) is expected; checked below
        warnings.simplefilter("ignore", RuntimeWarning)
        root = sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        return None
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):  # pytorch-fid's tolerance
            return None
        root = root.real
    return root


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2, eps: float = FID_EPS) -> float:
    """Fréchet distance of N(μ1, Σ1) and N(μ2, Σ2): ‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}); NaN when the samples'
    (μ1, Σ1) are not finite, UsageError when the reference's (μ2, Σ2) are not.

    The square root is taken of the covariances divided by their mean variance s (and the trace scaled back by s),
    so its realness tolerance and the eps ridge are relative: FID(c·a, c·b) = c²·FID(a, b) at any feature scale."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise UsageError(f"stats shapes differ: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}; "
                         "need mu (D,) and sigma (D, D) from the same feature network")
    if not (np.isfinite(mu2).all() and np.isfinite(sigma2).all()):
        raise UsageError("reference stats contain NaN or inf; recompute them from finite features")
    if not (np.isfinite(mu1).all() and np.isfinite(sigma1).all()):
        return float("nan")                                 # the samples of a diverged model
    scale = (np.trace(sigma1) + np.trace(sigma2)) / (2 * d)
    scale = scale if scale > 0 else 1.0                     # (both constant: any scale gives a zero root)
    s1, s2 = sigma1 / scale, sigma2 / scale
    root = _sqrtm_product(s1, s2)
    if root is None:  # near-singular product: add eps·I to both (scaled) covariances and retry
        ridge = eps * np.eye(d)
        root = _sqrtm_product(s1 + ridge, s2 + ridge)
        if root is None:
            raise UsageError(f"sqrtm(Σ1 Σ2) has no finite real value even with a ridge of {eps:g} times the mean "
                             f"variance; use more samples than feature dimensions ({d})")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * scale * np.trace(root))


def frechet_distance(a, b) -> float:
    """FID between sample features a (N, D) and reference features b (M, D): the Fréchet distance of their Gaussian
    fits (NaN when a is not finite)."""
    a, b = _features(a, "a", finite=False), _features(b, "b")
    _same_dim(a, b)
    return frechet_distance_from_stats(*feature_stats(a), *feature_stats(b))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID kernel matrix k(x_i, y_j) = (x_iᵀ y_j / D + 1)³, shape (len(x), len(y))."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² (Gretton et al. 2012, eq. 3): Σ_{i≠j} k(x_i,x_j)/(m(m−1)) + same for y − 2 Σ_{i,j} k(x_i,y_j)/(m n)."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2 * kxy.mean())


def kernel_inception_distance(a, b, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID of sample features a (N, D) against reference features b (M, D): mean and std (ddof=0) over `subsets`
    random subsets of m = min(subset_size, N, M) rows of unbiased MMD² ((NaN, NaN) when a is not finite)."""
    a, b = _features(a, "a", finite=False), _features(b, "b")
    _same_dim(a, b)
    if subsets < 1 or subset_size < 2:
        raise UsageError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    if not np.isfinite(a).all():
        return float("nan"), float("nan")
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = np.array([mmd2_unbiased(a[rng.choice(len(a), m, replace=False)],
                                     b[rng.choice(len(b), m, replace=False)]) for _ in range(subsets)])
    return float(values.mean()), float(values.std())
