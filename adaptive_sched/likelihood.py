"""Variational lower bound in nats and bits/dim (VDM, Kingma et al. 2021, continuous time, written in λ).

For x ∈ R^D and z_λ = α x + σ ε (α² = sigmoid(λ), σ² = sigmoid(−λ)), every denoiser ε̂ gives (VDM eqs. 11, 17, γ = −λ)
    −log p(x) ≤ L_prior + L_diff + L_recon,
    L_prior = KL(N(α₀x, σ₀²I) ‖ N(0, I)) = ½ Σ_d [α₀² x_d² + σ₀² − 1 − log σ₀²]            at λ₀ = logsnr_min,
    L_diff  = ½ ∫_{λ₀}^{λ₁} E_ε ‖ε − ε̂(z_λ, λ)‖² dλ,
    L_recon = E_ε[−log p(x | z_λ₁)]                                                          at λ₁ = logsnr_max,
    bits/dim = (L_prior + L_diff + L_recon) / (D ln 2).
Decoders p(x | z) at λ₁ (m = z/α₁, s = σ₁/α₁):
    continuous (discrete_bins=None): N(x; m, s²I), −log p = ½ Σ_d [log 2π − λ₁ + ((α₁x_d − z_d)/σ₁)²]; a density of x
        in the units it is given in.
    discrete (B = discrete_bins levels x_b = −1 + 2b/(B−1) of [−1, 1]; 256 for 8-bit images scaled as x/127.5 − 1; x must
        lie on the levels, to float rounding: check_levels), independent per coordinate, `decoder` one of
      "categorical" (VDM's code, EncDec.decode): p(x_b | z_d) = softmax_b(−(z_d − α₁x_b)²/(2σ₁²)), the exact posterior
          of x_d given z_d under a uniform prior on the levels;
      "bin" (Ho et al. 2020 §3.3): mass of N(m_d, s²) on x_d's bin [x_d − δ, x_d + δ], δ = 1/(B−1), outer bins open.
    At λ₁ = 13.3, s = 1.3e-3 ≈ δ/3 for B = 256, and with z from the true x the expected cost per interior dim is
    0.036 nats (0.051 bits) for "bin" (a Gaussian of sd δ/3 centred up to a few sds from x_d leaks mass out of the bin)
    but 0.007 nats for "categorical" (levels are 2δ/s = 6.1 noise sds apart). For data uniform on the levels the
    categorical decoder is the true posterior, so the bound is tight there, while "bin" adds 0.042 bits/dim; hence
    "categorical" is the default.

Default window λ ∈ [−10, 13.3]. λ₁ = 13.3 is VDM's (γ_min = −13.3); for Gaussian data N(0, s²) the top-end gap is
½ log(1 + e^{−λ₁}/s²) ≈ 8e-7/s² nats/dim. λ₀ = −10 (not VDM's learned −5): L_prior ≈ ½ e^{λ₀} E x_d² = 2.3e-5·E x_d²
nats/dim and the bottom-end gap is ¼ e^{2λ₀}(s² − 1)², both invisible at 4 decimals of bits/dim; the wider window
costs only a longer λ range to sample.

L_diff is estimated by stratified Monte Carlo in λ, uniform over the window and independent of any training schedule:
    L̂_diff(x_i) = (Δ/K) Σ_k ½ [‖ε_ik − ε̂(z_ik, λ_ik)‖² − c_ik (‖ε_ik‖² − D)],   z_ik = α x_i + σ ε_ik,
    λ_ik = λ₀ + Δ (k + u_ik)/K,  u_ik ~ U(0, 1),  Δ = λ₁ − λ₀,  c_ik = α⁴(λ_ik)  (c = 0 with control_variate=False),
with one fresh ε per (i, k). It is unbiased for every K (E‖ε‖² = D and c depends on λ only), so the result stays an
unbiased estimate of an upper bound; a fixed quadrature grid would be biased by an amount that depends on how smooth
the network's ε-MSE curve is. Stratification removes most of the λ variance of plain Monte Carlo. The control variate
c(‖ε‖² − D) removes the χ²_D noise that dominates at high λ, where ε − ε̂ ≈ ε: c = α⁴ is the regression coefficient of
‖ε − ε̂‖² on ‖ε‖² for unit-variance Gaussian data and the exact denoiser (there ε − E[ε|z] = α²ε − ασx). It cuts the
per-example standard deviation ~3x on Gaussian data and ~2x on uniform 8-bit data (exact denoisers, K = 16).
K = n_lambda = 16 by default; the spread of the per-example estimates is reported as bpd_stderr.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from adaptive_sched.diffusion import add_noise, alpha_sigma, check_target, to_x0_eps
from adaptive_sched.errors import UsageError
from adaptive_sched.generate import full_precision

DECODERS = ("categorical", "bin")
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def eps_model(eps_fn: EpsFn) -> Callable[..., torch.Tensor]:
    """Wrap eps_fn(x_t, λ) -> ε̂ (e.g. GaussianMixture.eps_hat, exact E[ε|z_λ]) as model(x_t, λ, y), target "eps"."""
    def model(x_t: torch.Tensor, logsnr: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return eps_fn(x_t, logsnr).to(x_t.dtype)
    return model


def prior_kl(x0: torch.Tensor, logsnr_min: float) -> torch.Tensor:
    """KL(N(αx, σ²I) ‖ N(0, I)) per example = ½ Σ_d [α²(x_d² − 1) + softplus(λ)] (σ² − 1 = −α², −log σ² = softplus λ)"""
    a2, softplus = 1 / (1 + math.exp(-logsnr_min)), math.log1p(math.exp(logsnr_min))
    x2 = x0.double().reshape(x0.shape[0], -1).square()                        # (N, D)
    return 0.5 * (a2 * (x2 - 1) + softplus).sum(1)


def log_bin_mass(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Φ(hi) − Φ(lo)), lo < hi, stable in both tails: reflect to the lower tail, then log Φ(b) + log(1 − Φ(a)/Φ(b))."""
    flip = lo > 0
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    return log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))


def reconstruction_nll(x0: torch.Tensor, z: torch.Tensor, logsnr_max: float, discrete_bins: int | None = None,
                       decoder: str = "categorical") -> torch.Tensor:
    """−log p(x | z_λ₁) per example (N,) float64: Gaussian N(x; z/α, σ²/α²·I), or a discrete decoder (module doc)."""
    alpha, sigma = alpha_sigma(torch.tensor(logsnr_max, dtype=torch.float64))
    x, z = x0.double().reshape(x0.shape[0], -1), z.double().reshape(z.shape[0], -1)  # (N, D)
    if discrete_bins is None:
        u = (alpha * x - z) / sigma                                           # (x − z/α)/(σ/α)
        return 0.5 * (math.log(2 * math.pi) - logsnr_max + u.square()).sum(1)
    half = 1.0 / (discrete_bins - 1)                                          # δ: half the spacing of the levels
    x = ((x + 1) / (2 * half)).round() * (2 * half) - 1                       # snap to the nearest level x_b
    if decoder == "bin":
        mean, scale = z / alpha, sigma / alpha
        lo = torch.where(x <= -1 + half / 2, -math.inf, (x - half - mean) / scale)
        hi = torch.where(x >= 1 - half / 2, math.inf, (x + half - mean) / scale)
        return -log_bin_mass(lo, hi).sum(1)
    levels = alpha * torch.linspace(-1, 1, discrete_bins, dtype=torch.float64, device=z.device)   # (B,) α x_b
    rows = max(1, 2**22 // discrete_bins)                                    # ≤ 32 MB of logits at a time
    log_norm = torch.cat([(-0.5 * ((part[:, None] - levels) / sigma).square()).logsumexp(-1)  # (rows, B) -> (rows,)
                          for part in z.reshape(-1).split(rows)]).reshape(z.shape)
    return (0.5 * ((z - alpha * x) / sigma).square() + log_norm).sum(1)


def _check_args(x0: torch.Tensor, logsnr_min: float, logsnr_max: float, n_lambda: int, batch_size: int,
                discrete_bins: int | None, decoder: str) -> None:
    """Raise UsageError on an empty batch, an empty window, n_lambda/batch_size < 1, or bad discrete settings."""
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise UsageError(f"x0 must be (N, ...) with N >= 1; got shape {tuple(x0.shape)}")
    if not logsnr_min < logsnr_max:
        raise UsageError(f"need logsnr_min < logsnr_max; got {logsnr_min} and {logsnr_max}")
    if n_lambda < 1 or batch_size < 1:
        raise UsageError(f"n_lambda and batch_size must be >= 1; got {n_lambda} and {batch_size}")
    if decoder not in DECODERS:
        raise UsageError(f"unknown decoder {decoder!r}; choose one of: {', '.join(DECODERS)}")
    if discrete_bins is not None:
        if discrete_bins < 2:
            raise UsageError(f"discrete_bins must be None or >= 2; got {discrete_bins}")
        check_levels(x0, discrete_bins)


def check_levels(x0: torch.Tensor, bins: int, name: str = "discrete_bins", off: str = "None") -> None:
    """UsageError unless every value of x0 is one of the `bins` levels −1 + 2b/(bins − 1), to 10% of their spacing
    (8-bit pixels stored as float16 sit up to 6% off): a discrete decoder would otherwise score data it has moved
    (17-level digits read as 8-bit images are up to half a spacing off). `name` = `off` is the continuous decoder."""
    if x0.min() < -1 or x0.max() > 1:
        raise UsageError(f"{name} needs data in [-1, 1]; got range [{x0.min():.3g}, {x0.max():.3g}]")
    steps = (x0.double() + 1) * (bins - 1) / 2                           # level index, fractional when off the grid
    gap = float((steps - steps.round()).abs().max())
    if gap > 0.1:
        raise UsageError(f"{name} = {bins}: the data are not on {bins} levels in [-1, 1] (a value lies "
                         f"{gap:.3g} level spacings from the nearest); set it to the data's number of levels (17 for "
                         f"digits, 256 for 8-bit images; resized images have none) or {off} for the continuous "
                         f"decoder")


@torch.no_grad()
def vlb(model, target: str, x0: torch.Tensor, y: torch.Tensor | None = None, logsnr_min: float = -10.0,
        logsnr_max: float = 13.3, n_lambda: int = 16, seed: int = 12345, batch_size: int = 256,
        discrete_bins: int | None = None, decoder: str = "categorical", control_variate: bool = True) -> dict:
    """Mean over examples of L_prior + L_diff + L_recon (module doc), in nats and bits/dim.

    model(x_t, λ, y) predicts `target` (for an ε-function use `eps_model(fn)` with target "eps"); x0 (N, ...) with
    y (N,) or None. Runs in x0's dtype with autocast off (generate.full_precision: at λ₁ the ε̂ of an x0 model is
    x̂0's error times α/σ ≈ 770).
    Noise comes from one torch.Generator seeded with `seed`: equal (seed, batch_size) give identical results.
    Returns floats prior, diffusion, reconstruction, total (nats per example), bpd_prior, bpd_diffusion,
    bpd_reconstruction, bpd, bpd_stderr (standard error of bpd over examples), and per_example (N, 3) float64 nats.
    """
    check_target(target)
    _check_args(x0, logsnr_min, logsnr_max, n_lambda, batch_size, discrete_bins, decoder)
    device, dim, width = x0.device, x0[0].numel(), logsnr_max - logsnr_min
    generator = torch.Generator(device).manual_seed(seed)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    terms = []
    try:
        for start in range(0, x0.shape[0], batch_size):
            batch = x0[start:start + batch_size]
            labels = None if y is None else y[start:start + batch_size]
            n, dtype = batch.shape[0], batch.dtype
            eps = torch.randn(batch.shape, generator=generator, device=device, dtype=dtype)
            z1 = add_noise(batch, eps, torch.full((n,), logsnr_max, device=device, dtype=dtype))
            diff = torch.zeros(n, dtype=torch.float64, device=device)
            for k in range(n_lambda):                                          # one λ per stratum per example
                u = torch.rand(n, generator=generator, device=device, dtype=dtype)
                lam = logsnr_min + width * (k + u) / n_lambda                    # (n,)
                eps = torch.randn(batch.shape, generator=generator, device=device, dtype=dtype)
                x_t = add_noise(batch, eps, lam)
                with full_precision(device):
                    pred = model(x_t, lam, labels)
                eps_hat = to_x0_eps(pred.to(dtype), x_t, lam, target)[1]
                sq_err = (eps_hat - eps).double().square().reshape(n, -1).sum(1)   # (n,)
                if control_variate:                                              # − α⁴ (‖ε‖² − D)
                    sq_err -= torch.sigmoid(lam.double()).square() * (eps.double().square().reshape(n, -1).sum(1) - dim)
                diff += sq_err
            terms.append(torch.stack([prior_kl(batch, logsnr_min).to(device), 0.5 * width / n_lambda * diff,
                                      reconstruction_nll(batch, z1, logsnr_max, discrete_bins, decoder)], 1).cpu())
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    per_example = torch.cat(terms)                                              # (N, 3) nats
    mean, to_bits = per_example.mean(0).tolist(), 1.0 / (dim * math.log(2))
    total = per_example.sum(1)
    stderr = float(total.std() / math.sqrt(len(total))) if len(total) > 1 else math.nan
    return {"prior": mean[0], "diffusion": mean[1], "reconstruction": mean[2], "total": sum(mean),
            "bpd_prior": mean[0] * to_bits, "bpd_diffusion": mean[1] * to_bits,
            "bpd_reconstruction": mean[2] * to_bits, "bpd": sum(mean) * to_bits,
            "bpd_stderr": stderr * to_bits, "per_example": per_example}
