"""Fixed schedules in closed form: each is a base distribution over λ, truncated by `Schedule`.

Every class gives F (cdf), S = 1 − F (sf), their inverses on the accurate side, and log f.
z denotes the standardised variable (λ − location)/scale.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from adaptive_sched.errors import UsageError
from adaptive_sched.schedules.base import (DEFAULT_LOGSNR_MAX, DEFAULT_LOGSNR_MIN, Schedule,
                                           check_finite, check_positive)

LOG_2PI = math.log(2 * math.pi)


class Laplace(Schedule):
    """Laplace(mu, b) over λ (Hang & Gu 2024): p(λ) ∝ exp(−|λ − mu|/b)."""

    name = "laplace"

    def __init__(self, mu: float = 0.0, b: float = 0.5,
                 logsnr_min: float = DEFAULT_LOGSNR_MIN, logsnr_max: float = DEFAULT_LOGSNR_MAX):
        self.mu, self.b = check_finite("mu", mu), check_positive("b", b)
        super().__init__(logsnr_min, logsnr_max)

    def params(self) -> dict:
        return {"mu": self.mu, "b": self.b}

    def _cdf(self, x):  # F = ½ e^{z} for z < 0, else 1 − ½ e^{−z}
        z = (x - self.mu) / self.b
        return torch.where(z < 0, 0.5 * torch.exp(z.clamp(max=0)), -0.5 * torch.expm1(-z.clamp(min=0)) + 0.5)

    def _sf(self, x):
        return self._cdf(2 * self.mu - x)

    def _icdf(self, u):  # u ≤ ½: mu + b·log(2u)
        return self.mu + self.b * torch.log(2 * u)

    def _isf(self, s):   # s ≤ ½: mu − b·log(2s)
        return self.mu - self.b * torch.log(2 * s)

    def _log_pdf(self, x):  # log f = −|z| − log(2b)
        return -(x - self.mu).abs() / self.b - math.log(2 * self.b)


class Cauchy(Schedule):
    """Cauchy(mu, gamma) over λ (Hang & Gu 2024): p(λ) ∝ 1/(1 + ((λ − mu)/gamma)²)."""

    name = "cauchy"

    def __init__(self, mu: float = 0.0, gamma: float = 1.0,
                 logsnr_min: float = DEFAULT_LOGSNR_MIN, logsnr_max: float = DEFAULT_LOGSNR_MAX):
        self.mu, self.gamma = check_finite("mu", mu), check_positive("gamma", gamma)
        super().__init__(logsnr_min, logsnr_max)

    def params(self) -> dict:
        return {"mu": self.mu, "gamma": self.gamma}

    def _cdf(self, x):  # F = atan2(1, −z)/π, accurate in the lower tail
        z = (x - self.mu) / self.gamma
        return torch.atan2(torch.ones_like(z), -z) / math.pi

    def _sf(self, x):   # S = atan2(1, z)/π
        z = (x - self.mu) / self.gamma
        return torch.atan2(torch.ones_like(z), z) / math.pi

    def _icdf(self, u):  # mu + gamma·tan(π(u − ½)) = mu − gamma/tan(πu)
        return self.mu - self.gamma / torch.tan(math.pi * u)

    def _isf(self, s):
        return self.mu + self.gamma / torch.tan(math.pi * s)

    def _log_pdf(self, x):  # −log(π gamma (1 + z²))
        z = (x - self.mu) / self.gamma
        return -torch.log1p(z * z) - math.log(math.pi * self.gamma)


class Normal(Schedule):
    """Normal(mean, std) over λ; `edm` and `logit_normal` are this in their native parameters."""

    name = "normal"

    def __init__(self, mean: float = 0.0, std: float = 2.0,
                 logsnr_min: float = DEFAULT_LOGSNR_MIN, logsnr_max: float = DEFAULT_LOGSNR_MAX):
        self.mean, self.std = check_finite("mean", mean), check_positive("std", std)
        super().__init__(logsnr_min, logsnr_max)

    def params(self) -> dict:
        return {"mean": self.mean, "std": self.std}

    def _cdf(self, x):  # Φ(z) = ½ erfc(−z/√2), accurate deep in the lower tail (ndtr underflows early)
        return 0.5 * torch.special.erfc((self.mean - x) / (self.std * math.sqrt(2)))

    def _sf(self, x):
        return 0.5 * torch.special.erfc((x - self.mean) / (self.std * math.sqrt(2)))

    def _icdf(self, u):
        return self.mean + self.std * torch.special.ndtri(u)

    def _isf(self, s):
        return self.mean - self.std * torch.special.ndtri(s)

    def _log_pdf(self, x):  # −z²/2 − log(std·√(2π))
        z = (x - self.mean) / self.std
        return -0.5 * z * z - math.log(self.std) - 0.5 * LOG_2PI


class EDM(Normal):
    """EDM's log-normal noise levels (Karras et al. 2022): ln σ ~ N(p_mean, p_std), so λ = −2 ln σ ~ N(−2 p_mean, 2 p_std)."""

    name = "edm"

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2,
                 logsnr_min: float = DEFAULT_LOGSNR_MIN, logsnr_max: float = DEFAULT_LOGSNR_MAX):
        self.p_mean, self.p_std = check_finite("p_mean", p_mean), check_positive("p_std", p_std)
        super().__init__(-2 * self.p_mean, 2 * self.p_std, logsnr_min, logsnr_max)

    def params(self) -> dict:
        return {"p_mean": self.p_mean, "p_std": self.p_std}


class LogitNormal(Normal):
    """SD3's logit-normal timesteps for rectified flow (Esser et al. 2024): logit(t) ~ N(m, s), λ = −2 logit(t) ~ N(−2m, 2s)."""

    name = "logit_normal"

    def __init__(self, m: float = 0.0, s: float = 1.0,
                 logsnr_min: float = DEFAULT_LOGSNR_MIN, logsnr_max: float = DEFAULT_LOGSNR_MAX):
        self.m, self.s = check_finite("m", m), check_positive("s", s)
        super().__init__(-2 * self.m, 2 * self.s, logsnr_min, logsnr_max)

    def params(self) -> dict:
        return {"m": self.m, "s": self.s}


class Logistic(Schedule):
    """Logistic(mu, scale) over λ: F = sigmoid((λ − mu)/scale)."""

    name = "logistic"

    def __init__(self, mu: float = 0.0, scale: float = 1.0,
                 logsnr_min: float = DEFAULT_LOGSNR_MIN, logsnr_max: float = DEFAULT_LOGSNR_MAX):
        self.mu, self.scale = check_finite("mu", mu), check_positive("scale", scale)
        super().__init__(logsnr_min, logsnr_max)

    def params(self) -> dict:
        return {"mu": self.mu, "scale": self.scale}

    def _cdf(self, x):
        return torch.sigmoid((x - self.mu) / self.scale)

    def _sf(self, x):
        return torch.sigmoid((self.mu - x) / self.scale)

    def _icdf(self, u):  # mu + scale·logit(u)
        return self.mu + self.scale * (torch.log(u) - torch.log1p(-u))

    def _isf(self, s):
        return self.mu - self.scale * (torch.log(s) - torch.log1p(-s))

    def _log_pdf(self, x):  # log f = −z − 2 softplus(−z) − log scale
        z = (x - self.mu) / self.scale
        return -z - 2 * F.softplus(-z) - math.log(self.scale)


class Flow(Logistic):
    """Rectified flow with uniform t (Liu et al. 2022): λ = 2 log((1 − t)/t), i.e. Logistic(0, 2)."""

    name = "flow"

    def __init__(self, logsnr_min: float = DEFAULT_LOGSNR_MIN, logsnr_max: float = DEFAULT_LOGSNR_MAX):
        super().__init__(0.0, 2.0, logsnr_min, logsnr_max)

    def params(self) -> dict:
        return {}


class Cosine(Schedule):
    """Shifted/scaled cosine (Nichol & Dhariwal 2021; Hang & Gu 2024): λ = shift + scale·(−2 log tan(πt/2)).

    Before truncation p(λ) = sech((λ − shift)/(2·scale)) / (2π·scale), the hyperbolic-secant law.
    """

    name = "cosine"

    def __init__(self, shift: float = 0.0, scale: float = 1.0,
                 logsnr_min: float = DEFAULT_LOGSNR_MIN, logsnr_max: float = DEFAULT_LOGSNR_MAX):
        self.shift, self.scale = check_finite("shift", shift), check_positive("scale", scale)
        super().__init__(logsnr_min, logsnr_max)

    def params(self) -> dict:
        return {"shift": self.shift, "scale": self.scale}

    def _cdf(self, x):  # F = (2/π)·atan(e^{z/2}), z = (λ − shift)/scale
        z = (x - self.shift) / self.scale
        return (2 / math.pi) * torch.atan(torch.exp(0.5 * z))

    def _sf(self, x):
        z = (x - self.shift) / self.scale
        return (2 / math.pi) * torch.atan(torch.exp(-0.5 * z))

    def _icdf(self, u):  # shift + 2·scale·log tan(πu/2)
        return self.shift + 2 * self.scale * torch.log(torch.tan(0.5 * math.pi * u))

    def _isf(self, s):
        return self.shift - 2 * self.scale * torch.log(torch.tan(0.5 * math.pi * s))

    def _log_pdf(self, x):  # log sech(y) = log 2 − |y| − log1p(e^{−2|y|}), y = z/2
        y = ((x - self.shift) / (2 * self.scale)).abs()
        return math.log(2) - y - torch.log1p(torch.exp(-2 * y)) - math.log(2 * math.pi * self.scale)


class Uniform(Schedule):
    """Uniform in λ over [logsnr_min, logsnr_max]: λ(t) = logsnr_max − t·(logsnr_max − logsnr_min)."""

    name = "uniform"

    def __init__(self, logsnr_min: float = DEFAULT_LOGSNR_MIN, logsnr_max: float = DEFAULT_LOGSNR_MAX):
        lo, hi = check_finite("logsnr_min", logsnr_min), check_finite("logsnr_max", logsnr_max)
        self._lo, self._width = lo, hi - lo
        super().__init__(logsnr_min, logsnr_max)

    def _cdf(self, x):
        return ((x - self._lo) / self._width).clamp(0, 1)

    def _sf(self, x):
        return ((self._lo + self._width - x) / self._width).clamp(0, 1)

    def _icdf(self, u):
        return self._lo + u * self._width

    def _isf(self, s):
        return self._lo + self._width - s * self._width

    def _log_pdf(self, x):
        return torch.full_like(x, -math.log(self._width))


class Linear(Schedule):
    """DDPM's linear β (1e-4 → 0.02 over 1000 steps) in continuous time (Song et al. 2021, VP-SDE).

    β(t) = β0 + (β1 − β0)t with β0 = 0.1, β1 = 20; −log ᾱ(t) = g(t) = β0 t + ½(β1 − β0)t²;
    λ(t) = −log(e^{g} − 1). Its support ends at λ(1) ≈ −10.05, so logsnr_min is raised to that
    when set lower: the schedule never reaches noisier levels than DDPM's last step.
    """

    name = "linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0,
                 logsnr_min: float = DEFAULT_LOGSNR_MIN, logsnr_max: float = DEFAULT_LOGSNR_MAX):
        self.beta_min, self.beta_max = check_positive("beta_min", beta_min), check_positive("beta_max", beta_max)
        if self.beta_max < self.beta_min:
            raise UsageError(f"beta_max ({beta_max}) must be >= beta_min ({beta_min})")
        g1 = self.beta_min + 0.5 * (self.beta_max - self.beta_min)
        end = -math.log(math.expm1(g1)) if g1 < 1 else -g1 - math.log1p(-math.exp(-g1))   # expm1 overflows past 709
        self.support = (end, math.inf)
        super().__init__(logsnr_min, logsnr_max)

    def params(self) -> dict:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max}

    def _natural_t(self, x):  # solve ½Δβ t² + β0 t = g, g = softplus(−λ): t = 2g/(β0 + √(β0² + 2Δβ g))
        g = F.softplus(-x)
        return 2 * g / (self.beta_min + torch.sqrt(self.beta_min ** 2 + 2 * (self.beta_max - self.beta_min) * g))

    def _natural_logsnr(self, t):  # λ = −log expm1(g(t))
        g = self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t
        return -torch.log(torch.expm1(g))

    def _sf(self, x):
        return self._natural_t(x)

    def _cdf(self, x):
        return 1 - self._natural_t(x)

    def _isf(self, s):
        return self._natural_logsnr(s)

    def _icdf(self, u):
        return self._natural_logsnr(1 - u)

    def _log_pdf(self, x):  # log|dt/dλ| = log sigmoid(−λ) − ½ log(β0² + 2Δβ g)
        g = F.softplus(-x)
        return F.logsigmoid(-x) - 0.5 * torch.log(self.beta_min ** 2 + 2 * (self.beta_max - self.beta_min) * g)
