"""Tests for the Gaussian-mixture oracle: moments, exact posterior mean against independent references."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate, stats

from adaptive_sched.data.gmm import GaussianMixture, make_gmm, make_gmm_dataset
from adaptive_sched.errors import UsageError

F64 = torch.float64


def _noisy(mix: GaussianMixture, n: int, lam: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, x_λ) with x_λ = α x0 + σ ε, float64."""
    g = torch.Generator().manual_seed(seed)
    x0 = mix.sample(n, g, dtype=F64)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    return x0, math.sqrt(1 / (1 + math.exp(-lam))) * x0 + math.sqrt(1 / (1 + math.exp(lam))) * eps


def _wiener(mean: torch.Tensor, cov: torch.Tensor, x: torch.Tensor, lam: float) -> torch.Tensor:
    """Gaussian posterior mean in precision form: P = C⁻¹ + (α²/σ²) I, E[x0|x] = P⁻¹ (C⁻¹ m + (α/σ²) x)."""
    a2, s2 = 1 / (1 + math.exp(-lam)), 1 / (1 + math.exp(lam))
    c_inv = torch.linalg.inv(cov)
    prec = c_inv + (a2 / s2) * torch.eye(len(mean), dtype=F64)
    rhs = (c_inv @ mean)[:, None] + (math.sqrt(a2) / s2) * x.T             # (D, N)
    return torch.linalg.solve(prec, rhs).T


def test_sample_moments_match_exact_moments():
    mix = make_gmm(dim=8, k=5, seed=3)
    n = 200_000
    x = mix.sample(n, torch.Generator().manual_seed(0), dtype=F64)
    # Monte-Carlo standard error: ≈ 1/√n = 0.0022 for the mean, ≲ √2/√n = 0.0032 for covariance entries
    assert (x.mean(0) - mix.mean()).abs().max() < 0.015
    assert (torch.cov(x.T) - mix.covariance()).abs().max() < 0.02


def test_make_gmm_is_seeded_standardised_and_in_range():
    a, b, c = make_gmm(seed=0), make_gmm(seed=0), make_gmm(seed=1)
    assert torch.equal(a.means, b.means) and torch.equal(a.stds, b.stds) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.means, c.means)
    assert a.means.shape == (8, 16) and a.means.dtype == F64
    torch.testing.assert_close(a.covariance().diagonal(), torch.ones(16, dtype=F64))
    assert a.stds.min() >= 0.2 and a.stds.max() <= 0.6
    assert math.isclose(float(a.weights.sum()), 1.0) and a.weights.max() / a.weights.min() <= 3.0
    assert a.mean().abs().max() > 0.1                     # not centred: a sampler outputting N(0, I) fails


def test_denoise_single_gaussian_equals_wiener_filter():
    g = torch.Generator().manual_seed(1)
    mean, std = torch.randn(5, generator=g, dtype=F64), 0.3 + torch.rand(5, generator=g, dtype=F64)
    mix = GaussianMixture(torch.ones(1), mean[None], std[None])
    for lam in (-6.0, -1.0, 0.0, 2.5, 8.0):
        _, x = _noisy(mix, 64, lam, seed=2)
        torch.testing.assert_close(mix.denoise(x, lam), _wiener(mean, torch.diag(std**2), x, lam))


def test_denoise_two_components_matches_numerical_integration():
    mix = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-1.2], [0.8]]), torch.tensor([[0.3], [0.5]]))
    w, mu, s = mix.weights.tolist(), mix.means[:, 0].tolist(), mix.stds[:, 0].tolist()
    for lam in (-4.0, 0.0, 3.0):
        a, sig = math.sqrt(1 / (1 + math.exp(-lam))), math.sqrt(1 / (1 + math.exp(lam)))
        xs = torch.tensor([[-2.0], [-0.3], [0.1], [1.5]], dtype=F64)
        got = mix.denoise(xs, torch.full((4,), lam, dtype=F64))[:, 0]
        for x, d in zip(xs[:, 0].tolist(), got.tolist()):
            def joint(x0: float) -> float:  # p(x0) p(x | x0)
                prior = sum(wk * stats.norm.pdf(x0, mk, sk) for wk, mk, sk in zip(w, mu, s))
                return prior * stats.norm.pdf(x, a * x0, sig)
            pts = [x / a, *mu]
            num = integrate.quad(lambda z: z * joint(z), -8, 8, points=pts, limit=200, epsabs=1e-13)[0]
            den = integrate.quad(joint, -8, 8, points=pts, limit=200, epsabs=1e-13)[0]
            assert d == pytest.approx(num / den, abs=1e-7)


def test_denoise_limits():
    mix = make_gmm(dim=6, k=4, seed=2)
    _, x = _noisy(mix, 256, 0.0, seed=3)
    a20 = math.sqrt(1 / (1 + math.exp(-20.0)))
    torch.testing.assert_close(mix.denoise(x, 20.0), x / a20, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mix.denoise(x, -20.0), mix.mean().expand_as(x), atol=1e-3, rtol=0)


def test_exact_denoiser_beats_gaussian_fit_and_mmse_agrees():
    mix = make_gmm(dim=8, k=5, seed=4)
    x0, x = _noisy(mix, 20_000, 0.0, seed=5)
    mse_exact = ((mix.denoise(x, 0.0) - x0) ** 2).mean()
    mse_wiener = ((_wiener(mix.mean(), mix.covariance(), x, 0.0) - x0) ** 2).mean()
    assert mse_exact < 0.8 * mse_wiener
    floor = mix.mmse(0.0, n=20_000, generator=torch.Generator().manual_seed(6))
    assert floor == pytest.approx(float(mse_exact), rel=0.05)
    g = torch.Generator().manual_seed(7)
    assert mix.mmse(4.0, n=5000, generator=g) < floor < mix.mmse(-4.0, n=5000, generator=g) < 1.0


def test_eps_hat_is_consistent_and_float32_roundtrips():
    mix = make_gmm(dim=4, k=3, seed=5)
    _, x = _noisy(mix, 128, 0.0, seed=7)
    lam = torch.linspace(-30, 30, 128, dtype=F64)
    alpha, sigma = torch.sigmoid(lam).sqrt()[:, None], torch.sigmoid(-lam).sqrt()[:, None]
    torch.testing.assert_close(alpha * mix.denoise(x, lam) + sigma * mix.eps_hat(x, lam), x)
    x32 = x.float()
    for lam32 in (lam.float(), torch.tensor(30.0), torch.tensor(-30.0), 0.5):
        out, eps = mix.denoise(x32, lam32), mix.eps_hat(x32, lam32)
        assert out.dtype == eps.dtype == torch.float32 and out.shape == x32.shape
        assert torch.isfinite(out).all() and torch.isfinite(eps).all()
    torch.testing.assert_close(mix.denoise(x, 1.5), mix.denoise(x, torch.full((128,), 1.5, dtype=F64)))


def test_bad_input_raises_usage_error():
    with pytest.raises(UsageError):
        GaussianMixture(torch.ones(2), torch.zeros(3, 4), torch.ones(3, 4))
    with pytest.raises(UsageError):
        GaussianMixture(torch.ones(2), torch.zeros(2, 4), -torch.ones(2, 4))
    mix = make_gmm(dim=4, k=2)
    with pytest.raises(UsageError):
        mix.denoise(torch.zeros(3, 5), 0.0)
    with pytest.raises(UsageError):
        mix.denoise(torch.zeros(3, 4), torch.zeros(2))
    with pytest.raises(UsageError):
        make_gmm_dataset("valid")


def test_gmm_dataset_splits_share_the_mixture():
    train, test = make_gmm_dataset("train", n=500, dim=6), make_gmm_dataset("test", n=300, dim=6)
    again = make_gmm_dataset("train", n=500, dim=6)
    assert train.name == "gmm" and train.x.shape == (500, 6) and train.x.dtype == torch.float32
    assert train.num_classes == 8 and train.y.shape == (500,) and 0 <= train.y.min() and train.y.max() < 8
    assert torch.equal(train.oracle.means, test.oracle.means)
    assert torch.equal(train.x, again.x) and not torch.equal(train.x[:300], test.x)
    nearest = ((train.x[:, None, :].double() - train.oracle.means) / train.oracle.stds).pow(2).sum(-1).argmin(1)
    assert (nearest == train.y).float().mean() > 0.9      # labels are the generating components
