"""Fixed schedules against closed forms and scipy.stats, truncated exactly to their window."""
import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats as st
import torch

from adaptive_sched import schedules
from adaptive_sched.errors import UsageError

LO, HI = -8.0, 12.0   # a window narrow enough that truncation matters for every case below

# name, non-default parameters, the untruncated scipy law of λ
SCIPY_CASES = [
    ("laplace", dict(mu=0.7, b=1.3), st.laplace(loc=0.7, scale=1.3)),
    ("cauchy", dict(mu=-1.0, gamma=2.5), st.cauchy(loc=-1.0, scale=2.5)),
    ("cosine", dict(shift=1.5, scale=0.8), st.hypsecant(loc=1.5, scale=1.6)),
    ("normal", dict(mean=1.0, std=3.0), st.norm(loc=1.0, scale=3.0)),
    ("edm", dict(p_mean=-0.4, p_std=1.4), st.norm(loc=0.8, scale=2.8)),
    ("logit_normal", dict(m=0.3, s=0.7), st.norm(loc=-0.6, scale=1.4)),
    ("logistic", dict(mu=-0.5, scale=1.7), st.logistic(loc=-0.5, scale=1.7)),
    ("flow", dict(), st.logistic(loc=0.0, scale=2.0)),
    ("uniform", dict(), st.uniform(loc=LO, scale=HI - LO)),
]
IDS = [c[0] for c in SCIPY_CASES]
T_GRID = np.concatenate([[1e-6, 1e-3], np.linspace(0.01, 0.99, 99), [1 - 1e-3, 1 - 1e-6]])


def truncated_logsnr_ref(law, t, lo=LO, hi=HI):
    """Reference λ(t) = S⁻¹(S(hi) + t·Z) by scipy in float64."""
    s_hi, mass = law.sf(hi), law.cdf(hi) - law.cdf(lo)
    return law.isf(s_hi + t * mass)


def build(name, params, lo=LO, hi=HI):
    return schedules.build(name, logsnr_min=lo, logsnr_max=hi, **params)


@pytest.mark.parametrize("name,params,law", SCIPY_CASES, ids=IDS)
def test_logsnr_matches_scipy_truncated_inverse_cdf(name, params, law):
    sched = build(name, params)
    lam = sched.logsnr(torch.tensor(T_GRID, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(lam, truncated_logsnr_ref(law, T_GRID), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,params,law", SCIPY_CASES, ids=IDS)
def test_density_matches_scipy_truncated_pdf(name, params, law):
    sched = build(name, params)
    x = np.linspace(LO, HI, 401)
    dens = sched.density(torch.tensor(x)).numpy()
    ref = law.pdf(x) / (law.cdf(HI) - law.cdf(LO))
    np.testing.assert_allclose(dens, ref, rtol=1e-9, atol=1e-14)
    outside = sched.density(torch.tensor([LO - 1.0, HI + 0.5])).numpy()
    assert (outside == 0).all()


@pytest.mark.parametrize("name,params,law", SCIPY_CASES, ids=IDS)
def test_density_normalised_and_consistent_with_logsnr(name, params, law):
    sched = build(name, params)
    total, _ = scipy.integrate.quad(lambda v: float(sched.density(torch.tensor(v, dtype=torch.float64))),
                                    LO, HI, points=[0.0, 1.0], limit=200)
    assert total == pytest.approx(1.0, abs=1e-7)
    # p(λ(t))·|dλ/dt| = 1 (finite differences in t)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    slope = (sched.logsnr(t + h) - sched.logsnr(t - h)) / (2 * h)
    np.testing.assert_allclose((sched.density(sched.logsnr(t)) * slope.abs()).numpy(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in schedules.names() if n != "table"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_round_trip_endpoints_and_finiteness(name, dtype, tol):
    sched = schedules.build(name, logsnr_min=-15.0, logsnr_max=17.0)
    t = torch.cat([torch.tensor([0.0, 1.0, 1e-45, 1e-38, 1 - 1e-7], dtype=dtype),
                   torch.linspace(0, 1, 1001, dtype=dtype)])
    lam = sched.logsnr(t)
    assert lam.dtype == dtype and torch.isfinite(lam).all()
    assert sched.logsnr_max == min(17.0, getattr(sched, "support", (None, math.inf))[1])   # a support may end lower
    assert lam[0].item() == torch.tensor(sched.logsnr_max, dtype=dtype).item()
    assert lam[1].item() == torch.tensor(sched.logsnr_min, dtype=dtype).item()
    assert ((lam >= sched.logsnr_min) & (lam <= sched.logsnr_max)).all()
    grid = lam[5:]
    assert (grid[1:] <= grid[:-1]).all(), "λ(t) must be non-increasing"
    back = sched.t_of(grid)
    assert torch.isfinite(back).all()
    # compare in t where λ moves (flat-in-λ stretches cannot be resolved better than the λ rounding)
    dlam = (grid[2:] - grid[:-2]).abs()
    ok = dlam > 1e-3
    assert (back[1:-1][ok] - t[5:][1:-1][ok]).abs().max().item() < tol
    assert torch.isfinite(sched.density(lam)).all() and (sched.density(lam[5:-1]) > 0).all()


def test_linear_is_ddpm_continuous_time():
    sched = schedules.build("linear", logsnr_min=-20.0, logsnr_max=25.0)
    # window below the support's end: λ(1) is DDPM's last level
    g1 = 0.1 + 0.5 * (20 - 0.1)
    assert sched.logsnr_min == pytest.approx(-math.log(math.expm1(g1)), abs=1e-12)
    assert sched.logsnr(torch.tensor(1.0, dtype=torch.float64)).item() == sched.logsnr_min
    # with a window above the last level, λ(t) is the DDPM curve rescaled in t between the window's ends
    sched = schedules.build("linear", logsnr_min=-5.0, logsnr_max=8.0)

    def lam_ddpm(t):
        return -np.log(np.expm1(0.1 * t + 0.5 * 19.9 * t ** 2))

    def t_ddpm(lam):
        return scipy.optimize.brentq(lambda t: lam_ddpm(t) - lam, 1e-12, 1.0)

    import scipy.optimize
    t0, t1 = t_ddpm(8.0), t_ddpm(-5.0)
    t = np.linspace(0.02, 0.98, 25)
    ref = lam_ddpm(t0 + t * (t1 - t0))
    np.testing.assert_allclose(sched.logsnr(torch.tensor(t)).numpy(), ref, rtol=1e-9, atol=1e-9)
    # its density is |dt/dλ| of the DDPM curve, renormalised
    lam = np.linspace(-4.5, 7.5, 13)
    h = 1e-6
    dt = np.array([(t_ddpm(v - h) - t_ddpm(v + h)) / (2 * h) for v in lam]) / (t1 - t0)
    np.testing.assert_allclose(sched.density(torch.tensor(lam)).numpy(), dt, rtol=1e-6)


CLOSED_FORMS = [  # untruncated closed forms from the papers, checked with a window wide enough to be exact
    ("cosine", dict(shift=-1.0, scale=0.7), lambda t: -1.0 + 0.7 * (-2 * np.log(np.tan(np.pi * t / 2)))),
    ("laplace", dict(mu=1.0, b=0.8),
     lambda t: 1.0 - 0.8 * np.sign(0.5 - t) * np.log(1 - 2 * np.abs(t - 0.5))),
    ("cauchy", dict(mu=0.5, gamma=0.3), None),
    ("flow", dict(), lambda t: 2 * np.log((1 - t) / t)),
]


@pytest.mark.parametrize("name,params,formula", [c for c in CLOSED_FORMS if c[2] is not None],
                         ids=[c[0] for c in CLOSED_FORMS if c[2] is not None])
def test_closed_form_logsnr_of_t(name, params, formula):
    sched = schedules.build(name, logsnr_min=-200.0, logsnr_max=200.0, **params)
    t = np.linspace(0.01, 0.99, 99)
    np.testing.assert_allclose(sched.logsnr(torch.tensor(t)).numpy(), formula(t), rtol=1e-8, atol=1e-8)


def test_cauchy_closed_form_with_truncation():
    # Hang & Gu: λ(t) = mu + γ tan(π/2 (1 − 2t)) before truncation; truncated: apply it to the window's t-range
    mu, gamma = 0.5, 0.3
    sched = schedules.build("cauchy", mu=mu, gamma=gamma, logsnr_min=-6.0, logsnr_max=9.0)
    cdf = lambda x: 0.5 + np.arctan((x - mu) / gamma) / np.pi   # noqa: E731
    t_hi, t_lo = 1 - cdf(9.0), 1 - cdf(-6.0)
    t = np.linspace(0.01, 0.99, 50)
    u = t_hi + t * (t_lo - t_hi)
    np.testing.assert_allclose(sched.logsnr(torch.tensor(t)).numpy(), mu + gamma * np.tan(np.pi / 2 * (1 - 2 * u)),
                               rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name,params,law", SCIPY_CASES, ids=IDS)
def test_sample_passes_ks_test(name, params, law):
    sched = build(name, params)
    gen = torch.Generator().manual_seed(1234)
    draws = sched.sample(20000, generator=gen, dtype=torch.float64).numpy()
    assert draws.min() >= LO and draws.max() <= HI
    z, c_lo = law.cdf(HI) - law.cdf(LO), law.cdf(LO)
    result = st.kstest(draws, lambda x: (law.cdf(np.clip(x, LO, HI)) - c_lo) / z)
    assert result.pvalue > 1e-3
    # a negative control: the same draws shifted by a tenth of the law's scale fail the test
    shifted = st.kstest(draws + 0.1 * law.std() if np.isfinite(law.std()) else draws + 0.3,
                        lambda x: (law.cdf(np.clip(x, LO, HI)) - c_lo) / z)
    assert shifted.pvalue < 1e-3


def test_sample_device_dtype_and_seed():
    sched = schedules.build("laplace")
    a = sched.sample(64, generator=torch.Generator().manual_seed(0))
    b = sched.sample(64, generator=torch.Generator().manual_seed(0))
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert sched.sample(8, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("name,params,law", SCIPY_CASES, ids=IDS)
def test_float32_agrees_with_float64(name, params, law):
    sched = build(name, params)
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    lam64 = sched.logsnr(t)
    lam32 = sched.logsnr(t.float())
    assert (lam32.double() - lam64).abs().max().item() < 1e-4 * max(1.0, HI)
    np.testing.assert_allclose(sched.density(lam64.float()).double().numpy(), sched.density(lam64).numpy(),
                               rtol=2e-4, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", [n for n in schedules.names() if n != "table"])
def test_cuda_matches_cpu(name):
    sched = schedules.build(name)
    t = torch.linspace(0, 1, 101)
    assert torch.allclose(sched.logsnr(t.cuda()).cpu(), sched.logsnr(t), atol=1e-4)
    assert sched.sample(16, device="cuda").device.type == "cuda"


@pytest.mark.parametrize("name,params", [
    ("laplace", dict(b=0)), ("laplace", dict(b=-1)), ("cauchy", dict(gamma=0)), ("normal", dict(std=-2)),
    ("cosine", dict(scale=0)), ("logistic", dict(scale=-1)), ("edm", dict(p_std=0)), ("logit_normal", dict(s=0)),
    ("laplace", dict(mu=float("nan"))), ("laplace", dict(logsnr_min=5.0, logsnr_max=5.0)),
    ("cosine", dict(logsnr_min=3.0, logsnr_max=-3.0)), ("laplace", dict(b="wide")),
    ("linear", dict(logsnr_min=-30.0, logsnr_max=-12.0)),
])
def test_invalid_parameters_raise_usage_error(name, params):
    with pytest.raises(UsageError):
        schedules.build(name, **params)


def test_unknown_names_and_parameters_are_explained():
    with pytest.raises(UsageError, match="choose one of: .*laplace"):
        schedules.build("laplase")
    with pytest.raises(UsageError, match="did you mean 'laplace'"):
        schedules.build("laplase")
    with pytest.raises(UsageError, match="parameters are: mu, b"):
        schedules.build("laplace", sigma=1.0)


def test_describe_lists_every_schedule_with_defaults():
    rows = {name: params for name, _, params in schedules.describe()}
    assert set(rows) == set(schedules.names())
    assert rows["laplace"]["b"] == 0.5 and rows["cosine"]["shift"] == 0.0 and rows["edm"]["p_mean"] == -1.2
    assert {"cosine", "laplace", "cauchy", "normal", "edm", "logit_normal", "logistic", "flow", "linear",
            "uniform", "table"} <= set(rows)


def test_deep_tail_windows_keep_their_mass():
    """A window far in a tail is still a valid schedule (the normal CDF is evaluated with erfc)."""
    sched = schedules.build("normal", mean=0.0, std=1.0, logsnr_min=9.0, logsnr_max=20.0)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    law = st.norm()
    ref = law.isf(law.sf(20.0) + t.numpy() * (law.sf(9.0) - law.sf(20.0)))   # survival form: no cancellation
    np.testing.assert_allclose(sched.logsnr(t).numpy(), ref, rtol=1e-7)
    edm = schedules.build("edm")
    assert edm.t_of(torch.tensor(16.0)).item() == pytest.approx(
        st.norm(2.4, 2.4).sf(16.0) / (st.norm(2.4, 2.4).cdf(20) - st.norm(2.4, 2.4).cdf(-20)), rel=1e-3)


def test_training_draws_never_hit_the_ends():
    from adaptive_sched.schedules.base import uniform_t
    t = uniform_t(1 << 20, torch.Generator().manual_seed(0))
    assert t.min().item() > 0 and t.max().item() < 1
    assert t.min().item() >= 2 ** -25 and t.max().item() <= 1 - 2 ** -25


def test_draws_come_back_on_the_device_asked_for_whatever_device_the_schedule_computes_on():
    # a module schedule (learned, adaptive_binned) computes on its parameters' device; sample(device=...) must still
    # return draws there (the CUDA run found them on the CPU)
    from types import SimpleNamespace
    from adaptive_sched.schedules.base import sample_by_inverse_transform
    computes_on_cpu = SimpleNamespace(logsnr=lambda t: torch.zeros(t.shape, dtype=torch.float64))
    draws = sample_by_inverse_transform(computes_on_cpu, 8, device="meta")
    assert draws.device.type == "meta" and draws.dtype == torch.float32 and draws.shape == (8,)


def _window_ref(law, lo, hi):
    """(λ(t), t(λ), Z) of `law` truncated to [lo, hi] by scipy in float64, each tail from the side where it is accurate
    (a window wholly in one tail has F(lo) = F(hi) = 1 or S(lo) = S(hi) = 1 in floats: the other side is used)."""
    upper = law.cdf(lo) >= 0.5 or (law.sf(hi) < 0.5 and law.cdf(lo) >= law.sf(hi))
    if upper:                                                    # S = 1 − F carries the digits
        s_hi, mass = law.sf(hi), law.sf(lo) - law.sf(hi)
        return (lambda t: law.isf(s_hi + t * mass)), (lambda x: (law.sf(np.clip(x, lo, hi)) - s_hi) / mass), mass
    c_lo, mass = law.cdf(lo), law.cdf(hi) - law.cdf(lo)
    return (lambda t: law.ppf(c_lo + (1 - t) * mass)), (lambda x: 1 - (law.cdf(np.clip(x, lo, hi)) - c_lo) / mass), mass


EXTREME_CASES = [  # valid parameters whose float32 evaluation used to lose every digit or give NaN
    ("cauchy", dict(mu=1.0, gamma=1e6), st.cauchy(1.0, 1e6)),         # window mass 1.3e-5 beside S(hi) ≈ ½: λ off by 0.1
    ("normal", dict(mean=45.0, std=1.0), st.norm(45.0, 1.0)),         # Z = 3e-138 is 0 in float32: t(λ) = 0/0
    ("cosine", dict(shift=-300.0), st.hypsecant(-300.0, 2.0)),         # the window deep in the upper tail
    ("logistic", dict(mu=500.0), st.logistic(500.0, 1.0)),             # ... and in the lower tail
    ("laplace", dict(b=1e-300), st.laplace(0.0, 1e-300)),             # b is 0 in float32: z = x/0 = NaN at λ = mu
]


@pytest.mark.parametrize("name,params,law", EXTREME_CASES, ids=[f"{c[0]}-{list(c[1].values())[-1]:g}" for c in EXTREME_CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_parameters_match_scipy_in_float32_and_float64(name, params, law, dtype):
    """A fixed schedule computes in float64 whatever the input dtype: float32 t or λ gets float64's answer, rounded."""
    sched = schedules.build(name, logsnr_min=-20.0, logsnr_max=20.0, **params)
    lam_ref, t_ref, mass = _window_ref(law, -20.0, 20.0)
    t = torch.tensor([1e-30, 1e-7, 0.01, 0.3, 0.5, 0.7, 0.99, 1 - 1e-6], dtype=dtype)
    lam = sched.logsnr(t)
    assert lam.dtype == dtype
    np.testing.assert_allclose(lam.double().numpy(), lam_ref(t.double().numpy()), rtol=2e-7,
                               atol=1e-5 if dtype == torch.float32 else 1e-9)
    x = np.linspace(-20.0, 20.0, 41)
    back = sched.t_of(torch.tensor(x, dtype=dtype))
    assert back.dtype == dtype and torch.isfinite(back).all()
    np.testing.assert_allclose(back.double().numpy(), t_ref(x), rtol=1e-6, atol=1e-7 if dtype == torch.float32 else 1e-14)
    dens = sched.density(torch.tensor(x, dtype=dtype)).double().numpy()
    ref = np.exp(law.logpdf(x) - np.log(mass))                  # in log space: pdf(x)/Z underflows before Z does
    assert not np.isnan(dens).any()
    tiny, big = torch.finfo(dtype).tiny, torch.finfo(dtype).max
    ok = (ref > 1e3 * tiny) & (ref < big)                       # beyond, the dtype underflows to 0 or overflows to inf
    np.testing.assert_allclose(dens[ok], ref[ok], rtol=1e-5)
    assert (dens[ref <= 1e3 * tiny] <= 1e3 * tiny).all() and (dens[ref >= big] == np.inf).all()


def test_linear_with_a_large_beta_max_builds_and_matches_its_closed_form():
    """beta_max = 2000 made −log expm1(g(1)) overflow (OverflowError: a traceback) before any check ran."""
    sched = schedules.build("linear", beta_max=2000.0)
    assert sched.logsnr_min == -20.0 and sched.logsnr_max == 20.0      # the support ends near −1000, below the window

    def t_nat(lam):  # DDPM's t(λ): ½Δβ t² + β0 t = g = log1p(e^{−λ})
        g = np.log1p(np.exp(-lam))
        return 2 * g / (0.1 + np.sqrt(0.01 + 2 * (2000.0 - 0.1) * g))

    x = np.linspace(-20.0, 20.0, 21)
    ref = (t_nat(x) - t_nat(20.0)) / (t_nat(-20.0) - t_nat(20.0))
    np.testing.assert_allclose(sched.t_of(torch.tensor(x)).numpy(), ref, rtol=1e-9, atol=1e-15)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    np.testing.assert_allclose(sched.t_of(sched.logsnr(t)).numpy(), t.numpy(), rtol=1e-9)


@pytest.mark.parametrize("rho", [1e-300, 0.01])
def test_polynomial_rho_too_small_for_its_sigma_range_is_a_usage_error(rho):
    """rho = 1e-300 raised OverflowError (σ_max^{1/ρ}); rho = 0.01 built, but (a − b)/b overflowed and λ(1e-30) came
    back as 0.0 (a NaN turned into 0), between λ(0) = 12.4 and λ(0.3) = −8.8: not monotone."""
    with pytest.raises(UsageError, match="rho"):
        schedules.build("polynomial", rho=rho)


def test_polynomial_small_rho_that_fits_in_float64_is_exact():
    sched = schedules.build("polynomial", rho=0.05)            # a = 80^20 ≈ 1e38, b = 0.002^20 ≈ 1e-54
    t = np.array([1e-30, 1e-8, 0.3, 0.5, 0.7, 1 - 1e-8])
    a, b = 80.0 ** 20, 0.002 ** 20
    ref = -2 * 0.05 * np.log(a * t + (1 - t) * b)              # c = 1: s = 1 − t, σ = (a + s(b − a))^ρ
    np.testing.assert_allclose(sched.logsnr(torch.tensor(t)).numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("name", [n for n in schedules.names() if n != "table"])
def test_a_window_wider_than_a_float_is_a_usage_error(name):
    """[-1e308, 1e308] has an infinite width: the learned schedule returned λ(0.25) = −1e308 and p = 0, the binned one
    NaN everywhere."""
    with pytest.raises(UsageError, match="wider than a float can hold"):
        schedules.build(name, logsnr_min=-1e308, logsnr_max=1e308, **({"init": "none"} if name == "learned" else {}))
