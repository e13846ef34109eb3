"""The polynomial noise distribution (Gokmen et al. 2024, "High Noise Scheduling is a Must") over logSNR.

Recipe: u ~ U(0, 1), s = u^c, σ = σ_karras(s) = (a + s(b − a))^ρ with a = σ_max^{1/ρ}, b = σ_min^{1/ρ},
and λ = −2 log σ (σ is the VE noise level σ/α, the mapping of the `edm` alias). So s ~ Beta(1/c, 1) and,
with e = exp(−λ/(2ρ)) = σ^{1/ρ},

    s(λ) = (a − e)/(a − b),   F(λ) = s(λ)^{1/c},   f(λ) = (1/c)·s^{1/c − 1}·e/(2ρ(a − b))

on the support [λ_lo, λ_hi] = [−2 log σ_max, −2 log σ_min]. Near λ_lo, a − e = −a·expm1((λ_lo − λ)/(2ρ));
near λ_hi, 1 − s = b·expm1((λ_hi − λ)/(2ρ))/(a − b): each tail is computed where it is accurate.
c > 1 moves mass to high noise (small s, σ near σ_max), the paper's direction; c = 1 is a uniform Karras
index, the law of EDM's ρ-spaced sampling grid, so λ(i/N) of the untruncated c = 1 law is that grid.

`levels = N ≥ 2` gives the discrete-grid variant: the continuous (truncated) draw is rounded to the
nearest of the N Karras levels σ_karras(j/(N − 1)) in index space s, among the levels inside the window.
A discrete law has no density, so this variant reports the histogram density (each level's mass spread
evenly over its rounding cell in λ, the cells between s-midpoints of adjacent levels, the outer levels
taking the cells' remainder) on [lowest level, highest level], and t_of is that histogram's CDF
(piecewise linear in λ, equal to the discrete CDF at cell edges). logsnr(t) and sample() are the exact
discrete law, so t_of(logsnr(t)) ≠ t; use density/t_of as the quadrature view (w/p is then a Riemann sum).
"""
from __future__ import annotations

import math

import torch

from adaptive_sched.errors import UsageError
from adaptive_sched.schedules.base import (DEFAULT_LOGSNR_MAX, DEFAULT_LOGSNR_MIN, Schedule, as_float_tensor,
                                           check_finite, check_positive)
from adaptive_sched.schedules.table import interp


class Polynomial(Schedule):
    """Polynomial noise distribution (Gokmen et al. 2024): σ = σ_karras(u^c), u ~ U(0,1), λ = −2 log σ."""

    name = "polynomial"

    def __init__(self, c: float = 1.0, rho: float = 7.0, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 levels: int = 0, logsnr_min: float = DEFAULT_LOGSNR_MIN, logsnr_max: float = DEFAULT_LOGSNR_MAX):
        self.c, self.rho = check_positive("c", c), check_positive("rho", rho)
        self.sigma_min, self.sigma_max = check_positive("sigma_min", sigma_min), check_positive("sigma_max", sigma_max)
        if self.sigma_min >= self.sigma_max:
            raise UsageError(f"polynomial needs sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        if isinstance(levels, float) and levels.is_integer():
            levels = int(levels)
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 0 or levels == 1:
            raise UsageError(f"parameter levels must be 0 (continuous) or an integer >= 2, got {levels!r}")
        self.levels = levels
        log_a, log_b = math.log(self.sigma_max) / self.rho, math.log(self.sigma_min) / self.rho
        if not max(abs(log_a), abs(log_b), log_a - log_b) < 700:      # a, b and a/b must be finite, nonzero floats
            raise UsageError(f"polynomial: rho = {self.rho:g} is too small for sigma_min = {self.sigma_min:g}, "
                             f"sigma_max = {self.sigma_max:g}: (sigma_max/sigma_min)^(1/rho) and sigma^(1/rho) must "
                             f"stay within float64 (e^700); raise rho or narrow the sigma range")
        self._a, self._b = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        self._width = self._a - self._b                                   # a − b > 0
        self.support = (-2 * math.log(self.sigma_max), -2 * math.log(self.sigma_min))
        overlap = min(check_finite("logsnr_max", logsnr_max), self.support[1]) - max(
            check_finite("logsnr_min", logsnr_min), self.support[0])
        if 0 <= overlap < 1e-9:
            raise UsageError(f"polynomial: the window [{logsnr_min}, {logsnr_max}] meets the support "
                             f"[{self.support[0]:.6g}, {self.support[1]:.6g}] in a sliver of width {overlap:.3g}")
        super().__init__(logsnr_min, logsnr_max)
        if levels:
            self._set_levels()

    def params(self) -> dict:
        return {"c": self.c, "rho": self.rho, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "levels": self.levels}

    # --- continuous base law ---------------------------------------------------------------------
    def _s_and_rest(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, 1 − s) at λ = x, each from the end where it is small: s = −a·expm1((λ_lo − λ)/2ρ)/(a − b)."""
        lo, hi = self.support
        s = -self._a * torch.expm1((lo - x) / (2 * self.rho)) / self._width
        rest = self._b * torch.expm1((hi - x) / (2 * self.rho)) / self._width
        return s.clamp(0.0, 1.0), rest.clamp(0.0, 1.0)

    def _cdf(self, x):  # F = s^{1/c}
        return self._s_and_rest(x)[0].pow(1 / self.c)

    def _sf(self, x):   # S = 1 − (1 − r)^{1/c} = −expm1(log1p(−r)/c), r = 1 − s
        return -torch.expm1(torch.log1p(-self._s_and_rest(x)[1]) / self.c)

    def _icdf(self, u):  # s = u^c, λ = λ_lo − 2ρ·log1p(−s(a − b)/a)
        return self.support[0] - 2 * self.rho * torch.log1p(-u.pow(self.c) * (self._width / self._a))

    def _isf(self, q):   # 1 − s = −expm1(c·log1p(−q)), λ = λ_hi − 2ρ·log1p((1 − s)(a − b)/b)
        rest = -torch.expm1(self.c * torch.log1p(-q))
        return self.support[1] - 2 * self.rho * torch.log1p(rest * (self._width / self._b))

    def _log_pdf(self, x):  # log f = −log c + (1/c − 1)·log s − λ/(2ρ) − log(2ρ(a − b))
        s, rest = self._s_and_rest(x)
        log_f = -math.log(self.c) - x / (2 * self.rho) - math.log(2 * self.rho * self._width)
        if self.c == 1.0:
            return log_f
        # log s from the accurate end; at s = 0 (λ = λ_lo exactly) use the smallest positive s, so that for
        # c > 1 the density there is huge but finite (it diverges like (λ − λ_lo)^{1/c − 1}; a point has no mass)
        log_s = torch.where(s < 0.5, torch.log(s.clamp_min(torch.finfo(s.dtype).tiny)), torch.log1p(-rest))
        return log_f + (1 / self.c - 1) * log_s

    def sigma_of_index(self, s: torch.Tensor) -> torch.Tensor:
        """σ_karras(s) = (σ_max^{1/ρ} + s(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ (the recipe, for tests and grids)."""
        return (self._a - torch.as_tensor(s) * self._width).pow(self.rho)

    # --- discrete-grid variant -------------------------------------------------------------------
    def _set_levels(self) -> None:
        """Karras levels inside the window, their rounding cells in λ and masses; narrow the window to the levels."""
        n = self.levels
        s = torch.arange(n, dtype=torch.float64) / (n - 1)
        lam = self.support[0] - 2 * self.rho * torch.log1p(-s * (self._width / self._a))  # increasing in s
        lam[0], lam[-1] = self.support                                                   # exact ends
        keep = (lam >= self.logsnr_min) & (lam <= self.logsnr_max)
        if int(keep.sum()) < 2:
            raise UsageError(f"polynomial: fewer than 2 of its {n} Karras levels lie in the window "
                             f"[{self.logsnr_min:.4g}, {self.logsnr_max:.4g}]; widen it or raise levels")
        s_kept, lam_kept = s[keep], lam[keep]
        s_mid = 0.5 * (s_kept[1:] + s_kept[:-1])
        lam_mid = self.support[0] - 2 * self.rho * torch.log1p(-s_mid * (self._width / self._a))
        # mass above each cell edge under the truncated continuous law: t at the window ends and midpoints
        t_edges = torch.cat([torch.ones(1, dtype=torch.float64), self.t_of(lam_mid),
                             torch.zeros(1, dtype=torch.float64)])                     # (K+1,) decreasing
        self._level_logsnr = lam_kept                                                    # (K,) increasing
        self._cell_edges = torch.cat([lam_kept[:1], lam_mid, lam_kept[-1:]])             # (K+1,) increasing
        self._cell_t = t_edges
        self._cell_mass = t_edges[:-1] - t_edges[1:]                                     # (K,)
        self.logsnr_min, self.logsnr_max = float(lam_kept[0]), float(lam_kept[-1])

    def level_masses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(λ of each level inside the window, increasing; its probability) for the discrete variant."""
        if not self.levels:
            raise UsageError("polynomial: level_masses() needs levels >= 2 (the discrete-grid variant)")
        return self._level_logsnr.clone(), self._cell_mass.clone()

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """λ(t); with levels, the level whose cell holds the continuous draw (a step function of t)."""
        if not self.levels:
            return super().logsnr(t)
        t = as_float_tensor(t)
        rising = self._cell_t.flip(0)[1:-1].to(device=t.device, dtype=torch.float64)      # (K−1,) increasing
        k = torch.searchsorted(rising, t.to(torch.float64).clamp(0, 1).contiguous(), right=True)
        return self._level_logsnr.flip(0).to(t.device)[k].to(t.dtype)

    def t_of(self, logsnr: torch.Tensor) -> torch.Tensor:
        """t(λ); with levels, the histogram CDF (mass above λ), piecewise linear between cell edges."""
        if not self.levels or not hasattr(self, "_cell_t"):
            return super().t_of(logsnr)
        lam = as_float_tensor(logsnr)
        return interp(lam.nan_to_num(nan=0.0), self._cell_edges, self._cell_t).clamp(0.0, 1.0)

    def log_density(self, logsnr: torch.Tensor) -> torch.Tensor:
        """log p(λ); with levels, log(mass of the level / width of its cell) inside the cell, −inf outside."""
        if not self.levels:
            return super().log_density(logsnr)
        lam = as_float_tensor(logsnr)
        edges = self._cell_edges.to(device=lam.device, dtype=lam.dtype)
        inside = (lam >= edges[0]) & (lam <= edges[-1])
        k = torch.searchsorted(edges[1:-1].contiguous(), lam.contiguous(), right=True)
        log_p = (self._cell_mass / (self._cell_edges[1:] - self._cell_edges[:-1])).log().to(lam.device, lam.dtype)[k]
        return torch.where(inside, log_p, torch.full_like(log_p, -math.inf))
