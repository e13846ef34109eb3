"""Forward-process identities, exact target conversions, weightings and the importance-sampled loss."""
import itertools
import math

import numpy as np
import pytest
import scipy.integrate
import torch

from adaptive_sched import diffusion, schedules, weighting
from adaptive_sched.errors import UsageError
from adaptive_sched.losses import DiffusionLoss

LAMS = torch.tensor([-30.0, -20.0, -5.0, -0.3, 0.0, 0.7, 4.0, 20.0, 30.0], dtype=torch.float64)


def test_variance_preserving_identities():
    alpha, sigma = diffusion.alpha_sigma(LAMS)
    np.testing.assert_allclose((alpha ** 2 + sigma ** 2).numpy(), 1.0, rtol=1e-15)
    np.testing.assert_allclose(torch.log(alpha ** 2 / sigma ** 2).numpy(), LAMS.numpy(), rtol=1e-12)
    # unit-variance data stays unit variance; the marginal mean shrinks by α
    gen = torch.Generator().manual_seed(0)
    x0 = 0.5 + torch.randn(200000, dtype=torch.float64, generator=gen)
    eps = torch.randn(200000, dtype=torch.float64, generator=gen)
    lam = torch.full((200000,), 1.3, dtype=torch.float64)
    x_t = diffusion.add_noise(x0, eps, lam)
    a, s = diffusion.alpha_sigma(torch.tensor(1.3, dtype=torch.float64))
    assert x_t.mean().item() == pytest.approx(0.5 * a.item(), abs=0.01)
    assert x_t.var().item() == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("source,dest", list(itertools.product(diffusion.TARGETS, repeat=2)))
def test_conversions_are_exact(source, dest):
    gen = torch.Generator().manual_seed(1)
    lam = torch.tensor([-8.0, -1.0, 0.0, 2.5, 9.0], dtype=torch.float64)
    x0 = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    eps = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    x_t = diffusion.add_noise(x0, eps, lam)
    pred = diffusion.target_value(x0, eps, lam, source)
    out = diffusion.convert(pred, x_t, lam, source, dest)
    np.testing.assert_allclose(out.numpy(), diffusion.target_value(x0, eps, lam, dest).numpy(), rtol=1e-9, atol=1e-9)
    x0_hat, eps_hat = diffusion.to_x0_eps(pred, x_t, lam, source)
    np.testing.assert_allclose(x0_hat.numpy(), x0.numpy(), atol=1e-8 * math.exp(4))
    np.testing.assert_allclose(eps_hat.numpy(), eps.numpy(), atol=1e-8 * math.exp(4.5))


@pytest.mark.parametrize("target", diffusion.TARGETS)
def test_target_mse_is_weighted_eps_mse(target):
    gen = torch.Generator().manual_seed(2)
    lam = torch.linspace(-10, 10, 41, dtype=torch.float64)
    x0 = torch.randn(41, 4, dtype=torch.float64, generator=gen)
    eps = torch.randn(41, 4, dtype=torch.float64, generator=gen)
    x_t = diffusion.add_noise(x0, eps, lam)
    eps_hat = eps + 0.3 * torch.randn(41, 4, dtype=torch.float64, generator=gen)
    x0_hat = (x_t - diffusion.alpha_sigma(lam)[1][:, None] * eps_hat) / diffusion.alpha_sigma(lam)[0][:, None]
    pred = diffusion.target_value(x0_hat, eps_hat, lam, target)
    true = diffusion.target_value(x0, eps, lam, target)
    lhs = (pred - true).square().sum(1)
    rhs = torch.exp(diffusion.log_target_weight(lam, target)) * (eps_hat - eps).square().sum(1)
    np.testing.assert_allclose(lhs.numpy(), rhs.numpy(), rtol=1e-8)


def test_v_conversion_is_finite_at_the_extremes():
    lam = torch.tensor([-60.0, 60.0])
    x_t, v = torch.ones(2, 2), torch.ones(2, 2)
    x0, eps = diffusion.to_x0_eps(v, x_t, lam, "v")
    assert torch.isfinite(x0).all() and torch.isfinite(eps).all()


def test_unknown_target():
    with pytest.raises(UsageError, match="eps, x0, v, flow"):
        diffusion.check_target("score")


@pytest.mark.parametrize("name,params,expected", [
    ("min-snr", dict(gamma=5.0), lambda lam: np.minimum(np.exp(lam), 5.0) / np.exp(lam)),
    ("soft-min-snr", dict(gamma=2.0), lambda lam: 2.0 / (np.exp(lam) + 2.0)),
    ("p2", dict(k=1.0, gamma=0.5), lambda lam: (1.0 + np.exp(lam)) ** -0.5),
    ("edm", dict(sigma_data=0.5), lambda lam: 1 + np.exp(-lam) / 0.25),
    ("x0", dict(), lambda lam: np.exp(-lam)),
    ("v", dict(), lambda lam: 1 + np.exp(-lam)),
])
def test_relative_weightings_closed_forms(name, params, expected):
    w = weighting.build(name, **params)
    lam = np.linspace(-12, 12, 49)
    got = torch.exp(w.log_multiplier(torch.tensor(lam), None, "eps")).numpy()
    np.testing.assert_allclose(got, expected(lam), rtol=1e-10)


def test_absolute_weighting_divides_by_the_sampling_density():
    sched = schedules.build("laplace", mu=1.0, b=2.0)
    w = weighting.build("sigmoid", b=1.5)
    lam = torch.linspace(-10, 10, 21, dtype=torch.float64)
    got = torch.exp(w.log_multiplier(lam, sched.log_density, "eps"))
    np.testing.assert_allclose(got.numpy(), (torch.sigmoid(1.5 - lam) / sched.density(lam)).numpy(), rtol=1e-10)


def test_default_weighting_is_the_plain_target_mse():
    """`schedule` weighting: the loss equals the unweighted target MSE for every target."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(16, 5, generator=gen)
    model = lambda x, lam, y=None: 0.5 * x   # noqa: E731
    for target in diffusion.TARGETS:
        loss = DiffusionLoss(schedules.build("cosine"), target)
        terms = loss.terms(model, x0, generator=torch.Generator().manual_seed(4))
        gen2 = torch.Generator().manual_seed(4)
        lam = loss.schedule.sample(16, generator=gen2)
        eps = torch.randn(x0.shape, generator=gen2)
        x_t = diffusion.add_noise(x0, eps, lam)
        ref = (model(x_t, lam) - diffusion.target_value(x0, eps, lam, target)).square().mean(1)
        np.testing.assert_allclose(terms.loss.numpy(), ref.numpy(), rtol=1e-5)
        eps_hat = diffusion.to_x0_eps(model(x_t, lam), x_t, lam, target)[1]
        np.testing.assert_allclose(terms.eps_mse.numpy(), (eps_hat - eps).square().mean(1).numpy(), rtol=1e-3)


def test_importance_sampling_estimates_the_weighted_integral():
    """E_{λ~p}[w/p · ℓ] = ∫ w ℓ dλ for any sampling density p (Kingma & Gao 2023)."""
    ell = lambda lam: torch.sigmoid(lam) + 0.1   # noqa: E731  a known loss profile ℓ(λ)
    w = weighting.build("sigmoid", b=2.0)
    exact, _ = scipy.integrate.quad(lambda v: 1 / (1 + np.exp(v - 2.0)) * (1 / (1 + np.exp(-v)) + 0.1), -20, 20)
    # (a narrow laplace would be unbiased too, but its w/p reaches e^40 in the tails: the variance the
    # learned schedule's `variance` objective exists to remove)
    for name, params in (("laplace", dict(b=3.0)), ("cosine", {}), ("uniform", {})):
        sched = schedules.build(name, **params)
        lam = sched.sample(400000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        estimate = (torch.exp(w.log_multiplier(lam, sched.log_density, "eps")) * ell(lam)).mean().item()
        assert estimate == pytest.approx(exact, rel=0.02), name


def test_like_weighting_reproduces_another_schedule():
    """Sampling cosine but weighting `like` laplace gives laplace's expected loss."""
    ell = lambda lam: 1 / (1 + lam.square())   # noqa: E731
    laplace = schedules.build("laplace", b=1.0)
    cosine = schedules.build("cosine")
    w = weighting.build("like", schedule="laplace", b=1.0)
    lam_c = cosine.sample(400000, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    lam_l = laplace.sample(400000, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    via_cosine = (torch.exp(w.log_multiplier(lam_c, cosine.log_density, "eps")) * ell(lam_c)).mean().item()
    assert via_cosine == pytest.approx(ell(lam_l).mean().item(), rel=0.02)


def test_weighting_errors():
    with pytest.raises(UsageError, match="choose one of"):
        weighting.build("minsnr")
    with pytest.raises(UsageError, match="no parameter"):
        weighting.build("min-snr", k=3)
    with pytest.raises(UsageError, match="> 0"):
        weighting.build("min-snr", gamma=-1)
