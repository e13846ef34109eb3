"""VLB in bits/dim against closed forms: Gaussian data (exact NLL, quad of the MMSE curve), uniform 8-bit data, bins."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate, special, stats

from adaptive_sched.data.gmm import GaussianMixture, make_gmm
from adaptive_sched.diffusion import convert
from adaptive_sched.errors import UsageError
from adaptive_sched.likelihood import eps_model, log_bin_mass, reconstruction_nll, vlb
from adaptive_sched.models import build_model

F64 = torch.float64
LO, HI = -10.0, 13.3                                             # the default window


def _sigmoid(v: float) -> float:
    """Logistic function."""
    return 1 / (1 + math.exp(-v))


def _softplus(v: float) -> float:
    """log(1 + e^v)."""
    return math.log1p(math.exp(v))


def _gaussian(dim: int = 16, n: int = 1000, seed: int = 0) -> tuple[GaussianMixture, torch.Tensor]:
    """One-component mixture N(0, diag(s²)), s_d ~ U(0.3, 1.5), and n float64 draws from it."""
    g = torch.Generator().manual_seed(seed)
    stds = 0.3 + 1.2 * torch.rand(1, dim, generator=g, dtype=F64)
    mix = GaussianMixture(torch.ones(1), torch.zeros(1, dim, dtype=F64), stds)
    return mix, mix.sample(n, g, dtype=F64)


def _gaussian_terms(stds: list[float], lo: float, hi: float) -> tuple[float, float, float]:
    """E_x of (prior, diffusion, reconstruction) for x ~ N(0, diag(s²)) and the exact denoiser.

    prior = ½ Σ [α₀²(s² − 1) + softplus(λ₀)];  diffusion = ½ Σ ∫ α²s²/(α²s² + σ²) dλ (quad of the ε-MMSE);
    reconstruction = ½ Σ [log 2π − λ₁ + 1].
    """
    prior = sum(0.5 * (_sigmoid(lo) * (s * s - 1) + _softplus(lo)) for s in stds)
    mmse = lambda lam, s2: _sigmoid(lam) * s2 / (_sigmoid(lam) * s2 + _sigmoid(-lam))  # noqa: E731
    diff = sum(0.5 * integrate.quad(mmse, lo, hi, args=(s * s,), epsabs=1e-12, limit=200)[0] for s in stds)
    return prior, diff, 0.5 * len(stds) * (math.log(2 * math.pi) - hi + 1)


def _discrete_oracle(bins: int = 256):
    """Exact E[ε | z_λ] for x uniform on the `bins` levels of [−1, 1], independent per coordinate.

    r_b = (z − α x_b)/σ, w_b = softmax_b(−r_b²/2), E[ε|z] = Σ_b w_b r_b (no division of a difference by σ).
    """
    levels = torch.linspace(-1, 1, bins, dtype=F64)

    def eps_fn(z: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(lam).sqrt().reshape(-1, *[1] * (z.ndim - 1), 1)
        s = torch.sigmoid(-lam).sqrt().reshape(a.shape)
        r = (z[..., None] - a * levels) / s                                   # (N, D, bins)
        return (torch.softmax(-0.5 * r.square(), -1) * r).sum(-1)
    return eps_fn


def test_diffusion_term_matches_quad_of_gaussian_mmse():
    mix, x = _gaussian()
    out = vlb(eps_model(mix.eps_hat), "eps", x)
    _, expected, _ = _gaussian_terms(mix.stds[0].tolist(), LO, HI)
    d = out["per_example"][:, 1]
    stderr = float(d.std()) / math.sqrt(len(d))                  # Monte Carlo over x, ε and λ; ≈ 0.15 nats here
    assert abs(out["diffusion"] - expected) < 4 * stderr, (out["diffusion"], expected, stderr)
    assert stderr < 0.01 * expected                              # the check resolves 1% errors
    # the same expectation without the control variate (unbiased both ways, noisier without)
    plain = vlb(eps_model(mix.eps_hat), "eps", x, control_variate=False)["per_example"][:, 1]
    assert abs(float(plain.mean()) - expected) < 4 * float(plain.std()) / math.sqrt(len(plain))
    assert float(plain.std()) > 2 * float(d.std())


def test_vlb_approaches_gaussian_nll_from_above_as_window_widens():
    mix, x = _gaussian(n=1500)
    nll = -mix.log_prob(x)                                        # (N,) exact −log p(x)
    closed_gaps = []
    for lo, hi in [(-3.0, 3.0), (-6.0, 7.0), (LO, HI)]:
        out = vlb(eps_model(mix.eps_hat), "eps", x, logsnr_min=lo, logsnr_max=hi)
        gaps = out["per_example"].sum(1) - nll                    # paired: removes the spread of −log p(x)
        mc_gap, stderr = float(gaps.mean()), float(gaps.std()) / math.sqrt(len(gaps))
        # closed-form E_x[VLB] − E_x[NLL] = ½ Σ_d log(1 + e^{−λ₁}/s²) + (λ₀ end ≈ ¼ e^{2λ₀}(s² − 1)²) ≥ 0
        entropy = 0.5 * sum(math.log(2 * math.pi * s * s) + 1 for s in mix.stds[0].tolist())
        closed_gap = sum(_gaussian_terms(mix.stds[0].tolist(), lo, hi)) - entropy
        assert abs(mc_gap - closed_gap) < 4 * stderr, (lo, hi, mc_gap, closed_gap)
        assert mc_gap > -4 * stderr                               # an upper bound, within Monte Carlo error
        closed_gaps.append(closed_gap)
    assert closed_gaps[0] > 0.5 and closed_gaps[0] > closed_gaps[1] > closed_gaps[2] >= 0
    assert closed_gaps[2] < 1e-4                                  # default window: gap < 1e-4 nats per example
    assert abs(mc_gap) < 4 * stderr and stderr < 0.15             # ... and the estimate is consistent with NLL


def test_worse_denoiser_gets_higher_vlb_and_oracle_bounds_nll():
    mix = make_gmm(dim=8, k=4, seed=1)
    x = mix.sample(500, torch.Generator().manual_seed(0), dtype=F64)
    oracle = vlb(eps_model(mix.eps_hat), "eps", x)
    scaled = vlb(eps_model(lambda z, lam: 0.8 * mix.eps_hat(z, lam)), "eps", x)
    zero = vlb(eps_model(lambda z, lam: torch.zeros_like(z)), "eps", x)
    assert oracle["bpd"] < scaled["bpd"] < zero["bpd"]
    assert oracle["prior"] == scaled["prior"] and oracle["reconstruction"] == zero["reconstruction"]
    # ε̂ = 0 has ε-MSE D at every λ, so E[diffusion] = ½ D Δ
    d = zero["per_example"][:, 1]
    assert abs(zero["diffusion"] - 0.5 * 8 * (HI - LO)) < 4 * float(d.std()) / math.sqrt(len(d))
    gaps = oracle["per_example"].sum(1) + mix.log_prob(x)
    assert float(gaps.mean()) > -4 * float(gaps.std()) / math.sqrt(len(gaps))


@pytest.mark.parametrize("target", ["x0", "v", "flow"])
def test_every_target_gives_the_eps_vlb(target):
    mix, x = _gaussian(dim=4, n=200)

    def model(z, lam, y=None):
        return convert(mix.eps_hat(z, lam), z, lam, "eps", target)
    ref = vlb(eps_model(mix.eps_hat), "eps", x, n_lambda=4)
    out = vlb(model, target, x, n_lambda=4)
    torch.testing.assert_close(out["per_example"], ref["per_example"], rtol=1e-8, atol=1e-8)


def test_same_seed_same_result_and_training_mode_restored():
    torch.manual_seed(0)
    model = build_model("mlp", (8,), hidden=32, depth=1, emb_dim=16)
    model.train()
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    a = vlb(model, "v", x, n_lambda=4, batch_size=16, seed=7)
    b = vlb(model, "v", x, n_lambda=4, batch_size=16, seed=7)
    c = vlb(model, "v", x, n_lambda=4, batch_size=16, seed=8)
    assert model.training
    assert torch.equal(a["per_example"], b["per_example"]) and a["bpd"] == b["bpd"]
    assert not torch.equal(a["per_example"], c["per_example"])
    assert math.isfinite(a["bpd"]) and a["bpd_stderr"] > 0


def test_log_bin_mass_matches_scipy_in_both_tails():
    lo = torch.tensor([-1.0, -40.0, 30.0, -math.inf, 2.0, -0.5], dtype=F64)
    hi = torch.tensor([0.5, -39.0, 31.0, -3.0, math.inf, math.inf], dtype=F64)
    got = log_bin_mass(lo, hi)
    want = [math.log(stats.norm.cdf(0.5) - stats.norm.cdf(-1)), stats.norm.logcdf(-39) + math.log1p(-math.exp(
        stats.norm.logcdf(-40) - stats.norm.logcdf(-39))), stats.norm.logsf(30) + math.log1p(-math.exp(
            stats.norm.logsf(31) - stats.norm.logsf(30))), stats.norm.logcdf(-3), stats.norm.logsf(2),
        stats.norm.logsf(-0.5)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=1e-9, atol=0)


def _expected_discrete_nll(level: float, lam_max: float, decoder: str, bins: int = 256) -> float:
    """E_ε[−log p(x | z)] for x = `level`, z = α x + σ ε, by quadrature over ε (z/α = x + s ε, s = σ/α = e^{−λ₁/2}).

    bin: −log[Φ(hi/s − ε) − Φ(lo/s − ε)] with lo, hi = ∓δ (∓∞ at the edges);
    categorical: ½ε² + log Σ_b exp(−½(ε + (x − x_b)/s)²).
    """
    scale, half = math.exp(-lam_max / 2), 1 / (bins - 1)
    offsets = (level - torch.linspace(-1, 1, bins, dtype=F64)).numpy() / scale
    lo, hi = (-math.inf if level == -1 else -half), (math.inf if level == 1 else half)

    def nll(e: float) -> float:
        if decoder == "bin":
            a, b = lo / scale - e, hi / scale - e
            mass = stats.norm.cdf(b) - stats.norm.cdf(a) if a < 0 else stats.norm.sf(a) - stats.norm.sf(b)
            return -math.log(mass)
        return 0.5 * e * e + float(special.logsumexp(-0.5 * (e + offsets) ** 2))
    return integrate.quad(lambda e: stats.norm.pdf(e) * nll(e), -9, 9, limit=200, points=[-3, 0, 3])[0]


@pytest.mark.parametrize("decoder", ["categorical", "bin"])
@pytest.mark.parametrize("level", [-1.0, 1 / 255, 1.0])       # lower edge level, an interior one, upper edge level
def test_discrete_decoder_matches_quadrature_and_sharpens(level, decoder):
    n, expected = 4000, []
    for lam_max in (8.0, 10.0, 13.3):
        exact = _expected_discrete_nll(level, lam_max, decoder)
        x = torch.full((n, 2), level, dtype=F64)
        eps = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
        z = math.sqrt(_sigmoid(lam_max)) * x + math.sqrt(_sigmoid(-lam_max)) * eps
        got = reconstruction_nll(x, z, lam_max, discrete_bins=256, decoder=decoder) / 2
        assert abs(float(got.mean()) - exact) < 4 * float(got.std()) / math.sqrt(n) + 1e-9, (lam_max, exact)
        expected.append(exact)
    assert expected[0] > expected[1] > expected[2]                  # sharper decoder as λ₁ grows
    assert expected[0] > 0.3 and expected[2] < (0.04 if decoder == "bin" else 0.008)


def test_uniform_8bit_data_costs_8_bits_per_dim():
    levels = torch.linspace(-1, 1, 256, dtype=F64)
    x = levels[torch.randint(0, 256, (600, 8), generator=torch.Generator().manual_seed(0))]
    out = vlb(eps_model(_discrete_oracle()), "eps", x, discrete_bins=256, batch_size=300)
    # −log p(x) = 8 bits/dim; with the exact denoiser and the categorical decoder (= the exact posterior here) the
    # only gap is the prior, ~1e-5 bits/dim
    assert abs(out["bpd"] - 8) < 4 * out["bpd_stderr"] and out["bpd_stderr"] < 0.05, out
    assert 0 < out["bpd_reconstruction"] < 0.011 and 0 < out["bpd_prior"] < 1e-4
    # E[L_recon] per dim by quadrature: interior levels cost 0.0070 nats, the two edge levels half of that
    recon = out["per_example"][:, 2] / 8
    inner, edge = _expected_discrete_nll(1 / 255, HI, "categorical"), _expected_discrete_nll(1.0, HI, "categorical")
    expected = (254 * inner + 2 * edge) / 256
    assert abs(float(recon.mean()) - expected) < 4 * float(recon.std()) / math.sqrt(len(recon)), expected


def test_usage_errors():
    x = torch.zeros(4, 3)
    zero = eps_model(lambda z, lam: torch.zeros_like(z))
    with pytest.raises(UsageError, match="unknown target"):
        vlb(zero, "score", x)
    with pytest.raises(UsageError, match="logsnr_min < logsnr_max"):
        vlb(zero, "eps", x, logsnr_min=5, logsnr_max=5)
    with pytest.raises(UsageError, match=r"\[-1, 1\]"):
        vlb(zero, "eps", x + 2, discrete_bins=256)
    with pytest.raises(UsageError, match="n_lambda"):
        vlb(zero, "eps", x, n_lambda=0)
    with pytest.raises(UsageError, match="unknown decoder"):
        vlb(zero, "eps", x, discrete_bins=256, decoder="logistic")


def test_discrete_decoder_refuses_data_off_its_levels():
    levels17 = torch.linspace(-1, 1, 17).repeat(4, 1)                     # digits' 17 levels, (4, 17)
    model = eps_model(lambda x, lam: torch.zeros_like(x))
    assert math.isfinite(vlb(model, "eps", levels17, n_lambda=1, discrete_bins=17)["bpd"])
    assert math.isfinite(vlb(model, "eps", levels17, n_lambda=1, discrete_bins=33)["bpd"])   # a finer grid holds them
    with pytest.raises(UsageError, match="not on 256 levels"):
        vlb(model, "eps", levels17, n_lambda=1, discrete_bins=256)
    with pytest.raises(UsageError, match="not on 256 levels"):
        vlb(model, "eps", torch.full((2, 3), 0.5 / 255), n_lambda=1, discrete_bins=256)   # half a level out
    on_8_bits = (torch.arange(256.0) / 127.5 - 1).reshape(4, 64)
    assert math.isfinite(vlb(model, "eps", on_8_bits.half().float(), n_lambda=1, discrete_bins=256)["bpd"])  # float16
