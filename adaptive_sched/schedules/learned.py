"""A learned schedule: λ(t) from a monotone network with exactly pinned endpoints (VDM, CVDM style).

A one-hidden-layer monotone network on s = logit(t), with positive slopes and convex output weights:
    γ(t) = (1 − ε)·Σ_j π_j·sigmoid(u_j·logit(t) + c_j) + ε·t,    u_j = softplus(.) > 0, π = softmax(.)
    λ(t) = logsnr_max − (logsnr_max − logsnr_min)·γ(t)
    p(λ) = 1/|dλ/dt| = 1/((logsnr_max − logsnr_min)·γ'(t(λ)))
Each unit is a CDF on (0, 1) (0 at t = 0, 1 at t = 1), so γ(0) = 0 and γ(1) = 1 exactly for any weights,
and γ is increasing for any weights. Working in logit(t) lets a few units reach the steep ends that
fixed schedules have (cosine: λ ≈ −2·logit(t) + const). The floor ε mixes in the uniform-in-λ
schedule: γ' ≥ ε, so p(λ) ≤ 1/(ε·(logsnr_max − logsnr_min)) and the schedule can never collapse onto
a point mass. dλ/dt is computed in closed form from the same parameters (checked against autograd in
the tests); t_of inverts λ(t) by bisection.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from adaptive_sched.errors import UsageError
from adaptive_sched.schedules.base import (DEFAULT_LOGSNR_MAX, DEFAULT_LOGSNR_MIN, check_count, check_finite,
                                           sample_by_inverse_transform)

BISECTION_STEPS = 64


class LearnedSchedule(nn.Module):
    """Monotone-network schedule λ_φ(t) with the fixed-schedule surface: logsnr, t_of, density, sample."""

    name = "learned"

    def __init__(self, hidden: int = 64, floor: float = 0.02, init: str = "cosine",
                 logsnr_min: float = DEFAULT_LOGSNR_MIN, logsnr_max: float = DEFAULT_LOGSNR_MAX):
        super().__init__()
        lo, hi = check_finite("logsnr_min", logsnr_min), check_finite("logsnr_max", logsnr_max)
        if lo >= hi:
            raise UsageError(f"logsnr_min ({lo}) must be < logsnr_max ({hi})")
        hidden = check_count("hidden", hidden, 1, 4096)
        floor = check_finite("floor", floor)
        if not 0 < floor < 1:
            raise UsageError(f"parameter floor must be in (0, 1), got {floor}")
        self.logsnr_min, self.logsnr_max, self.floor, self.hidden, self.init_name = lo, hi, floor, hidden, init
        self.raw_u = nn.Parameter(torch.zeros(hidden))                      # slopes softplus(0)·… ≈ 0.69
        self.c = nn.Parameter(torch.linspace(-8.0, 8.0, hidden))             # centres spread over logit(t)
        self.raw_pi = nn.Parameter(torch.zeros(hidden))
        if init != "none":
            self.fit_to(init)

    def params(self) -> dict:
        return {"hidden": self.hidden, "floor": self.floor, "init": self.init_name}

    # --- the monotone map ---------------------------------------------------------------------
    def gamma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """γ(t) ∈ [0, 1] increasing with γ(0) = 0, γ(1) = 1, and γ'(t) ≥ ε; t (N,) in any float dtype."""
        dtype = t.dtype
        u = (F.softplus(self.raw_u) + 0.05).to(dtype)                       # slopes ≥ 0.05
        pi, c = torch.softmax(self.raw_pi, 0).to(dtype), self.c.to(dtype)
        tiny = torch.finfo(dtype).tiny ** 0.5
        t_in = t.clamp(tiny, 1 - torch.finfo(dtype).eps)
        logit = torch.log(t_in) - torch.log1p(-t_in)
        s = torch.sigmoid(logit[..., None] * u + c)                           # (..., H)
        gam = (1 - self.floor) * (s @ pi) + self.floor * t
        dgam = (1 - self.floor) * ((s * (1 - s) * u) @ pi) / (t_in * (1 - t_in)) + self.floor
        gam = torch.where(t <= 0, torch.zeros_like(gam), torch.where(t >= 1, torch.ones_like(gam), gam))
        return gam, dgam

    def logsnr_and_slope(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """λ(t) and dλ/dt (< 0), differentiable in the schedule's parameters."""
        t = self._as_float(t).clamp(0.0, 1.0)
        gam, dgam = self.gamma(t)
        width = self.logsnr_max - self.logsnr_min
        lam = (self.logsnr_max - width * gam.clamp(0.0, 1.0)).clamp(self.logsnr_min, self.logsnr_max)
        lam = torch.where(t <= 0, torch.full_like(lam, self.logsnr_max), lam)
        lam = torch.where(t >= 1, torch.full_like(lam, self.logsnr_min), lam)
        return lam, -width * dgam

    def curvature(self, t: torch.Tensor) -> torch.Tensor:
        """d²λ/dt² at t by central differences of the closed-form slope (for CVDM's smoothness term)."""
        h = 1e-3
        t = t.clamp(h, 1 - h)
        return (self.logsnr_and_slope(t + h)[1] - self.logsnr_and_slope(t - h)[1]) / (2 * h)

    # --- the schedule surface -----------------------------------------------------------------
    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """λ(t), decreasing, λ(0) = logsnr_max and λ(1) = logsnr_min exactly."""
        return self.logsnr_and_slope(t)[0]

    @torch.no_grad()
    def t_of(self, logsnr: torch.Tensor) -> torch.Tensor:
        """t(λ) by bisection on the monotone λ(t) (64 halvings: exact to the dtype's resolution)."""
        lam = self._as_float(logsnr)
        lo, hi = torch.zeros_like(lam), torch.ones_like(lam)
        for _ in range(BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            above = self.logsnr(mid) > lam          # λ(mid) still above the target: move right
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        t = 0.5 * (lo + hi)
        t = torch.where(lam >= self.logsnr_max, torch.zeros_like(t), t)
        return torch.where(lam <= self.logsnr_min, torch.ones_like(t), t)

    def log_density(self, logsnr: torch.Tensor) -> torch.Tensor:
        """log p(λ) = −log|dλ/dt| at t(λ); −inf outside the window."""
        lam = self._as_float(logsnr)
        _, slope = self.logsnr_and_slope(self.t_of(lam))
        inside = (lam >= self.logsnr_min) & (lam <= self.logsnr_max)
        return torch.where(inside, -torch.log(-slope), torch.full_like(slope, -math.inf))

    def density(self, logsnr: torch.Tensor) -> torch.Tensor:
        """p(λ), integrating to 1 over the window."""
        return self.log_density(logsnr).exp()

    def sample(self, n: int, generator: torch.Generator | None = None, device=None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n draws λ ~ p(λ) by inverse transform λ(t), t ~ U(0, 1)."""
        return sample_by_inverse_transform(self, n, generator, device, dtype)

    # --- initialisation -----------------------------------------------------------------------
    def fit_to(self, name: str, steps: int = 400, **params) -> float:
        """Fit λ_φ(t) to a fixed schedule's λ(t) on the same window (least squares on a t grid); returns the RMSE."""
        from adaptive_sched import schedules
        target_schedule = schedules.build(name, logsnr_min=self.logsnr_min, logsnr_max=self.logsnr_max, **params)
        t = torch.linspace(0.0, 1.0, 513, dtype=torch.float64)
        target = target_schedule.logsnr(t).float()
        t = t.float()
        opt = torch.optim.Adam(self.parameters(), lr=0.1)
        for _ in range(steps):
            opt.zero_grad()
            loss = (self.logsnr(t) - target).square().mean()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return float((self.logsnr(t) - target).square().mean().sqrt())

    def _as_float(self, x) -> torch.Tensor:
        x = torch.as_tensor(x, device=self.c.device)
        return x if x.is_floating_point() else x.to(torch.get_default_dtype())

    def __repr__(self) -> str:
        return (f"learned(hidden={self.hidden}, floor={self.floor}, init={self.init_name!r}, "
                f"logsnr_min={self.logsnr_min}, logsnr_max={self.logsnr_max})")
