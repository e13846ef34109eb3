"""The polynomial noise distribution against its recipe σ = σ_karras(u^c) and scipy's Beta law of s = u^c."""
import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats as st
import torch

from adaptive_sched import schedules
from adaptive_sched.errors import UsageError

F64 = torch.float64
PARAMS = dict(c=2.5, rho=5.0, sigma_min=0.01, sigma_max=40.0)   # non-default; support [−7.38, 9.21]
LO, HI = -6.0, 8.0                                              # a window inside the support: truncation matters


def karras_sigma(s, c=None, rho=5.0, sigma_min=0.01, sigma_max=40.0):
    """σ_karras(s) = (σ_max^{1/ρ} + s(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, written out independently of the module."""
    return (sigma_max ** (1 / rho) + s * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def index_of(lam, rho=5.0, sigma_min=0.01, sigma_max=40.0):
    """s(λ), the inverse of λ = −2 log σ_karras(s)."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a - np.exp(-lam / (2 * rho))) / (a - b)


def reference_cdf(lam, lo=LO, hi=HI, c=2.5):
    """Truncated F(λ) = (B(s(λ)) − B(s(lo)))/(B(s(hi)) − B(s(lo))), B the CDF of s = u^c ~ Beta(1/c, 1)."""
    beta = st.beta(1 / c, 1)
    f = lambda v: beta.cdf(np.clip(index_of(v), 0, 1))   # noqa: E731
    return (f(np.clip(lam, lo, hi)) - f(lo)) / (f(hi) - f(lo))


def recipe_logsnr(n, seed, c=2.5, **kw):
    """λ = −2 log σ_karras(u^c), u ~ U(0, 1) by numpy: the paper's recipe, untruncated."""
    u = np.random.default_rng(seed).random(n)
    return -2 * np.log(karras_sigma(u ** c, **{**dict(rho=5.0, sigma_min=0.01, sigma_max=40.0), **kw}))


def build(lo=LO, hi=HI, **overrides):
    return schedules.build("polynomial", logsnr_min=lo, logsnr_max=hi, **{**PARAMS, **overrides})


def test_logsnr_and_t_of_match_the_beta_closed_form():
    sched = build()
    lam = np.linspace(LO, HI, 301)
    np.testing.assert_allclose(1 - sched.t_of(torch.tensor(lam)).numpy(), reference_cdf(lam), rtol=1e-10, atol=1e-12)
    t = np.linspace(0.0, 1.0, 101)
    beta = st.beta(1 / 2.5, 1)
    b_lo, b_hi = beta.cdf(index_of(LO)), beta.cdf(index_of(HI))
    s = beta.ppf(b_lo + (1 - t) * (b_hi - b_lo))
    np.testing.assert_allclose(sched.logsnr(torch.tensor(t)).numpy(), -2 * np.log(karras_sigma(s)), rtol=1e-9,
                               atol=1e-9)


@pytest.mark.parametrize("c", [0.4, 1.0, 2.5])
def test_density_integrates_to_one_and_is_the_cdf_slope(c):
    for lo, hi in ((LO, HI), (-20.0, 20.0)):                   # truncated, and the whole support
        sched = build(lo, hi, c=c)
        a, b = sched.logsnr_min, sched.logsnr_max
        total, _ = scipy.integrate.quad(lambda v: float(sched.density(torch.tensor(v, dtype=F64))), a, b, limit=200)
        assert total == pytest.approx(1.0, abs=1e-7), (lo, hi)
        lam = torch.linspace(a + 0.05, b - 0.05, 41, dtype=F64)
        h = 1e-5
        slope = (sched.t_of(lam - h) - sched.t_of(lam + h)) / (2 * h)
        np.testing.assert_allclose(sched.density(lam).numpy(), slope.numpy(), rtol=1e-6)
        assert (sched.density(torch.tensor([a - 0.1, b + 0.1], dtype=F64)) == 0).all()


def test_inverse_round_trip_and_exact_tails():
    sched = build(-20.0, 20.0)
    t = torch.tensor([1e-9, 1e-6, *np.linspace(0.01, 0.99, 99), 1 - 1e-6], dtype=F64)
    lam = sched.logsnr(t)
    # λ is known to an ulp, and t moves by p(λ) per unit of λ: that is all the accuracy t_of can give back
    tol = 1e-12 + 8 * np.finfo(np.float64).eps * (lam.abs() + 1) * sched.density(lam)
    assert ((sched.t_of(lam) - t).abs() <= tol).all()
    lam = torch.linspace(sched.logsnr_min + 1e-3, sched.logsnr_max - 1e-3, 201, dtype=F64)
    np.testing.assert_allclose(sched.logsnr(sched.t_of(lam)).numpy(), lam.numpy(), rtol=0, atol=1e-9)
    # tails to full relative precision (a 1 − F would give 0 or noise): first order in δ from each end,
    # S(λ_hi − δ) ≈ r/c with r = b·δ/(2ρ(a − b)), and F(λ_lo + δ) ≈ s^{1/c} with s = a·δ/(2ρ(a − b))
    a, b, rho, c = 40 ** (1 / 5), 0.01 ** (1 / 5), 5.0, 2.5
    lo, hi = sched.support
    delta = 1e-9
    upper = sched.t_of(torch.tensor(hi - delta, dtype=F64)).item()
    lower = 1 - sched.t_of(torch.tensor(lo + delta, dtype=F64)).item()
    assert upper == pytest.approx(b * delta / (2 * rho * (a - b)) / c, rel=1e-6)
    assert sched._cdf(torch.tensor(lo + delta, dtype=F64)).item() == pytest.approx(
        (a * delta / (2 * rho * (a - b))) ** (1 / c), rel=1e-6)
    assert lower == pytest.approx((a * delta / (2 * rho * (a - b))) ** (1 / c), rel=1e-6)
    t32 = torch.linspace(0, 1, 1001)
    assert (sched.logsnr(t32).double() - sched.logsnr(t32.double())).abs().max().item() < 1e-4 * 20


def test_endpoints_are_the_support_or_the_window():
    full = schedules.build("polynomial", c=3.0)                     # defaults: σ in [0.002, 80]
    ends = full.logsnr(torch.tensor([0.0, 1.0], dtype=F64)).tolist()
    assert ends == [-2 * math.log(0.002), -2 * math.log(80.0)]
    assert (full.logsnr_min, full.logsnr_max) == (-2 * math.log(80.0), -2 * math.log(0.002))
    assert build().logsnr(torch.tensor([0.0, 1.0], dtype=F64)).tolist() == [HI, LO]
    assert math.isfinite(full.density(torch.tensor(full.logsnr_min, dtype=F64)).item())  # c > 1: huge, not inf


def test_sample_matches_the_recipe_by_monte_carlo():
    sched = build()
    draws = sched.sample(20000, generator=torch.Generator().manual_seed(3), dtype=F64).numpy()
    assert draws.min() >= LO and draws.max() <= HI
    ref = recipe_logsnr(200000, seed=7)
    ref = ref[(ref >= LO) & (ref <= HI)]                            # truncation = conditioning on the window
    assert st.ks_2samp(draws, ref).pvalue > 1e-3
    assert st.kstest(draws, reference_cdf).pvalue > 1e-3
    other = recipe_logsnr(200000, seed=8, c=2.0)                    # negative control: c = 2 instead of 2.5
    assert st.ks_2samp(draws, other[(other >= LO) & (other <= HI)]).pvalue < 1e-3


def test_c_one_is_the_karras_sampling_grid_and_rho_one_is_uniform_sigma():
    sched = schedules.build("polynomial", c=1.0, logsnr_min=-30.0, logsnr_max=30.0)
    n = 10
    i = np.arange(n + 1)
    karras = (80 ** (1 / 7) + i / n * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7      # EDM eq. 5, σ_max first
    np.testing.assert_allclose(sched.logsnr(torch.tensor(1 - i / n)).numpy()[::-1], -2 * np.log(karras[::-1]),
                               rtol=1e-12, atol=1e-12)
    # ρ = 1, c = 1: σ ~ U(σ_min, σ_max), so p(λ) = (σ/2)·pdf_U(σ) with σ = e^{−λ/2}
    uni = schedules.build("polynomial", c=1.0, rho=1.0, sigma_min=0.5, sigma_max=3.0)
    lam = np.linspace(uni.logsnr_min, uni.logsnr_max, 52)[1:-1]
    sigma = np.exp(-lam / 2)
    np.testing.assert_allclose(uni.density(torch.tensor(lam)).numpy(), sigma / 2 * st.uniform(0.5, 2.5).pdf(sigma),
                               rtol=1e-10)


def nearest_level_frequencies(n_levels, lo, hi, seed, n=400000, c=2.5):
    """Monte Carlo of the discrete variant: recipe draws inside the window, rounded to the nearest kept level in s."""
    lam = recipe_logsnr(n, seed, c=c)
    s = index_of(lam[(lam >= lo) & (lam <= hi)])
    levels = np.arange(n_levels) / (n_levels - 1)
    lam_levels = -2 * np.log(karras_sigma(levels))
    kept = levels[(lam_levels >= lo) & (lam_levels <= hi)]
    idx = np.abs(s[:, None] - kept[None, :]).argmin(1)
    return np.bincount(idx, minlength=len(kept)) / len(idx)


@pytest.mark.parametrize("lo,hi", [(-20.0, 20.0), (LO, HI)])
def test_discrete_levels_variant(lo, hi):
    n_levels = 12
    sched = build(lo, hi, levels=n_levels)
    lam_levels, mass = sched.level_masses()
    assert mass.sum().item() == pytest.approx(1.0, abs=1e-12) and (mass > 0).all()
    if lo < -8:                  # whole support: masses in closed form, half cells at the ends
        j = np.arange(n_levels)
        cell_hi, cell_lo = np.minimum(1, (j + 0.5) / (n_levels - 1)), np.maximum(0, (j - 0.5) / (n_levels - 1))
        beta = st.beta(1 / 2.5, 1)
        np.testing.assert_allclose(mass.numpy(), beta.cdf(cell_hi) - beta.cdf(cell_lo), rtol=1e-10)
    np.testing.assert_allclose(mass.numpy(), nearest_level_frequencies(n_levels, lo, hi, seed=5), atol=4e-3)
    draws = sched.sample(20000, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert set(draws.unique().tolist()) <= set(lam_levels.tolist())
    counts = torch.stack([(draws == v).sum() for v in lam_levels]).numpy()
    assert st.chisquare(counts, mass.numpy() * len(draws)).pvalue > 1e-3
    # λ(0), λ(1) are the extreme levels, which become the window; the histogram density integrates to 1
    assert sched.logsnr(torch.tensor([0.0, 1.0], dtype=F64)).tolist() == [lam_levels[-1].item(), lam_levels[0].item()]
    assert (sched.logsnr_min, sched.logsnr_max) == (lam_levels[0].item(), lam_levels[-1].item())
    edges = sched._cell_edges.tolist()
    total = sum(scipy.integrate.quad(lambda v: float(sched.density(torch.tensor(v, dtype=F64))), a, b)[0]
                for a, b in zip(edges[:-1], edges[1:]))
    assert total == pytest.approx(1.0, abs=1e-9)
    assert sched.t_of(torch.tensor(edges, dtype=F64)).tolist() == pytest.approx(sched._cell_t.tolist(), abs=1e-15)


@pytest.mark.parametrize("params", [
    dict(c=0), dict(c=-1.0), dict(rho=0), dict(sigma_min=0.0), dict(sigma_min=5.0, sigma_max=5.0),
    dict(sigma_min=10.0, sigma_max=1.0), dict(c=float("nan")), dict(levels=1), dict(levels=-3), dict(levels=2.5),
    dict(logsnr_min=13.0, logsnr_max=20.0), dict(levels=3, logsnr_min=0.0, logsnr_max=1.0),
])
def test_invalid_parameters_raise_one_line_usage_errors(params):
    with pytest.raises(UsageError) as err:
        schedules.build("polynomial", **params)
    assert "\n" not in str(err.value)
