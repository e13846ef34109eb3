"""The schedule contract and exact truncation of a base distribution over logSNR.

A schedule is a density p(λ) on [logsnr_min, logsnr_max]. Training draws t ~ U(0, 1) and uses
λ(t) = the inverse of the upper-tail CDF, so λ decreases in t: λ(0) = logsnr_max (clean end),
λ(1) = logsnr_min (noisy end). Truncation renormalises the base CDF F to the window:

    Z = F(hi) − F(lo),   t(λ) = (F(hi) − F(λ)) / Z,   p(λ) = f(λ) / Z   on [lo, hi].

Each tail is evaluated with the function that is accurate there (survival S = 1 − F above the
median, F below), so λ(t) stays exact at both ends in float32 and float64 with no clamping of mass.
"""
from __future__ import annotations

import math

import torch

from adaptive_sched.errors import UsageError

DEFAULT_LOGSNR_MIN = -20.0
DEFAULT_LOGSNR_MAX = 20.0


def check_positive(name: str, value: float) -> float:
    """Return float(value) if it is finite and > 0, else raise UsageError naming the parameter."""
    value = check_finite(name, value)
    if value <= 0:
        raise UsageError(f"parameter {name} must be > 0, got {value}")
    return value


def check_finite(name: str, value: float) -> float:
    """Return float(value) if it is a finite number (not a bool), else raise UsageError naming the parameter."""
    if isinstance(value, bool):
        raise UsageError(f"parameter {name} must be a number, got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"parameter {name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise UsageError(f"parameter {name} must be finite, got {value}")
    return value


def check_count(name: str, value, low: int, high: int) -> int:
    """Return int(value) if it is a whole number in [low, high], else raise UsageError naming the parameter."""
    number = check_finite(name, value)
    if number != int(number) or not low <= number <= high:
        raise UsageError(f"parameter {name} must be a whole number in {low}..{high}, got {value!r}")
    return int(number)


def check_logsnr_window(logsnr_min: float, logsnr_max: float) -> tuple[float, float]:
    """(lo, hi) as floats if both are finite with lo < hi and a finite width hi − lo (every schedule divides by it),
    else UsageError."""
    lo, hi = check_finite("logsnr_min", logsnr_min), check_finite("logsnr_max", logsnr_max)
    if lo >= hi:
        raise UsageError(f"logsnr_min ({lo}) must be < logsnr_max ({hi})")
    if not math.isfinite(hi - lo):
        raise UsageError(f"the window [{lo}, {hi}] is wider than a float can hold; narrow it")
    return lo, hi


def as_float_tensor(x) -> torch.Tensor:
    """x as a tensor; integers become the default float dtype (floats keep theirs)."""
    x = torch.as_tensor(x)
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _wide(x) -> tuple[torch.Tensor, torch.dtype]:
    """(x in float64, the dtype to return): a fixed schedule computes in float64 whatever its input's dtype, since
    its constants (Z, F(lo), S(hi)) are float64 and a float32 scale parameter or window end can underflow or overflow
    (b = 1e-300 is 0 in float32, so z = x/b is NaN at x = mu; a window mass of 1e-5 loses all but two digits of t·Z next to S(hi) ≈ ½)."""
    x = as_float_tensor(x)
    return x.to(torch.float64), x.dtype


def uniform_t(n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """n draws t ~ U(0, 1) at the midpoints of 2^24 equal bins, in float64: never exactly 0 or 1.

    (torch.rand gives exactly 0 once in 2^24 draws, where λ(0) = logsnr_max and an absolute
    weighting's w/p can overflow.)
    """
    bins = 1 << 24
    k = torch.randint(bins, (n,), generator=generator, device=device, dtype=torch.int64)
    return (k.to(torch.float64) + 0.5) / bins


def sample_by_inverse_transform(schedule, n: int, generator: torch.Generator | None = None, device=None,
                                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n draws λ ~ p(λ) as λ(t), t from `uniform_t` (the `sample` of every schedule), on `device`.

    (A schedule that is a module computes on its own device; the draws still come back on the one asked for.)"""
    if device is None and generator is not None:
        device = generator.device
    return schedule.logsnr(uniform_t(n, generator, device)).to(device=device, dtype=dtype)


class Schedule:
    """A fixed noise schedule: a base distribution over λ, truncated exactly to [logsnr_min, logsnr_max].

    Subclasses give the untruncated base distribution through `_cdf`, `_sf` (= 1 − F), `_icdf`,
    `_isf` and `_log_pdf`, all elementwise on tensors, and optionally a `support` narrower than ℝ.
    `_icdf` and `_isf` are only called with arguments in [0, ~0.5], the accurate side of each tail.
    """

    name = "schedule"
    support: tuple[float, float] = (-math.inf, math.inf)

    def __init__(self, logsnr_min: float = DEFAULT_LOGSNR_MIN, logsnr_max: float = DEFAULT_LOGSNR_MAX):
        lo, hi = check_logsnr_window(logsnr_min, logsnr_max)
        self.logsnr_min_requested, self.logsnr_max_requested = lo, hi
        self._set_window(lo, hi)

    def _set_window(self, lo: float, hi: float) -> None:
        """Intersect [lo, hi] with the support and precompute the truncation constants in float64."""
        s_lo, s_hi = self.support
        lo, hi = max(lo, s_lo), min(hi, s_hi)
        if not lo < hi:
            raise UsageError(f"{self.name}: the window [{self.logsnr_min_requested}, {self.logsnr_max_requested}] "
                             f"does not overlap the schedule's support [{s_lo:.4g}, {s_hi:.4g}]")
        self.logsnr_min, self.logsnr_max = lo, hi
        ends = torch.tensor([lo, hi], dtype=torch.float64)
        cdf_lo, cdf_hi = self._cdf(ends).tolist()
        sf_lo, sf_hi = self._sf(ends).tolist()
        if cdf_lo >= 0.5:                       # window entirely in the upper tail
            mass = sf_lo - sf_hi
        elif sf_hi >= 0.5:                      # window entirely in the lower tail
            mass = cdf_hi - cdf_lo
        else:
            mass = 1.0 - cdf_lo - sf_hi
        if not mass >= torch.finfo(torch.float64).tiny:      # a subnormal Z has lost its precision
            raise UsageError(f"{self.name}: the window [{lo}, {hi}] holds no probability mass "
                             f"(it lies too far in a tail); widen it or move the schedule's location")
        self._cdf_lo, self._sf_hi, self._mass = cdf_lo, sf_hi, mass
        self._log_mass = math.log(mass)

    # --- public surface -------------------------------------------------------------------
    def params(self) -> dict:
        """The schedule's own parameters (without the window)."""
        return {}

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """λ(t): decreasing, λ(0) = logsnr_max, λ(1) = logsnr_min; exact inverse of the truncated CDF.

        Computed in float64 and returned in t's dtype (see `_wide`)."""
        t, dtype = _wide(t)
        t = t.clamp(0.0, 1.0)
        upper = self._sf_hi + t * self._mass            # mass above λ
        lower = self._cdf_lo + (1.0 - t) * self._mass   # mass below λ
        use_upper = upper <= lower
        safe_upper = torch.where(use_upper, upper, torch.full_like(upper, 0.25))
        safe_lower = torch.where(use_upper, torch.full_like(lower, 0.25), lower)
        lam = torch.where(use_upper, self._isf(safe_upper), self._icdf(safe_lower))
        lam = lam.nan_to_num(nan=0.0).clamp(self.logsnr_min, self.logsnr_max)
        lam = torch.where(t <= 0, torch.full_like(lam, self.logsnr_max), lam)
        return torch.where(t >= 1, torch.full_like(lam, self.logsnr_min), lam).to(dtype)

    def t_of(self, logsnr: torch.Tensor) -> torch.Tensor:
        """t(λ) = (F(hi) − F(λ))/Z, the inverse of `logsnr`; 0 above logsnr_max, 1 below logsnr_min (float64 inside)."""
        lam, dtype = _wide(logsnr)
        lam_in = lam.nan_to_num(nan=0.0).clamp(self.logsnr_min, self.logsnr_max)
        sf, cdf = self._sf(lam_in), self._cdf(lam_in)
        from_upper = (sf - self._sf_hi) / self._mass
        from_lower = (self._mass - (cdf - self._cdf_lo)) / self._mass
        return torch.where(sf <= cdf, from_upper, from_lower).clamp(0.0, 1.0).to(dtype)

    def log_density(self, logsnr: torch.Tensor) -> torch.Tensor:
        """log p(λ) = log f(λ) − log Z inside the window, −inf outside (float64 inside)."""
        lam, dtype = _wide(logsnr)
        narrow = as_float_tensor(logsnr)       # inside the window as rounded to λ's dtype (float32(lo) is inside)
        inside = (narrow >= self.logsnr_min) & (narrow <= self.logsnr_max)
        lam_in = torch.where(inside, lam.clamp(self.logsnr_min, self.logsnr_max),
                             torch.full_like(lam, 0.5 * (self.logsnr_min + self.logsnr_max)))
        log_p = self._log_pdf(lam_in) - self._log_mass
        return torch.where(inside, log_p, torch.full_like(log_p, -math.inf)).to(dtype)

    def density(self, logsnr: torch.Tensor) -> torch.Tensor:
        """p(λ), the truncated density; it integrates to 1 over [logsnr_min, logsnr_max]."""
        return self.log_density(logsnr).exp()

    def sample(self, n: int, generator: torch.Generator | None = None, device=None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n draws λ ~ p(λ) by inverse transform: λ(t), t ~ U(0, 1)."""
        return sample_by_inverse_transform(self, n, generator, device, dtype)

    def __repr__(self) -> str:
        args = {**self.params(), "logsnr_min": self.logsnr_min, "logsnr_max": self.logsnr_max}
        return f"{self.name}(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"

    # --- base distribution (subclasses) ---------------------------------------------------------
    def _cdf(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _sf(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _icdf(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _isf(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _log_pdf(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
