"""A learned schedule: λ(t) from a monotone network with exactly pinned endpoints (VDM, CVDM style).

A one-hidden-layer monotone network on ℓ = logit(t) clamped to the fixed window [−L, L] (L = 15), with
positive slopes, convex output weights and every unit renormalised to that window:
    s̃_j(ℓ) = (σ(a_j) − σ(a0_j)) / (σ(a1_j) − σ(a0_j)),   a = u_j·ℓ + c_j,  a0 = −u_j·L + c_j,  a1 = u_j·L + c_j
    γ(t) = (1 − ε)·Σ_j π_j·s̃_j(ℓ(t)) + ε·t,    u_j = softplus(.) + 0.05 > 0,  π = softmax(.)
    λ(t) = logsnr_max − (logsnr_max − logsnr_min)·γ(t)
    p(λ) = 1/|dλ/dt| = 1/((logsnr_max − logsnr_min)·γ'(t(λ)))
Each s̃_j is exactly 0 at ℓ = −L and 1 at ℓ = L, so γ(0) = 0 and γ(1) = 1 exactly, and γ is continuous and
increasing, for any weights; where ℓ is clamped (t within sigmoid(−L) ≈ 3e-7 of an end, which float32 and
float64 both resolve) γ' = ε. Renormalising matters for units with a small slope or a far centre: unclamped,
such a unit is not yet 0 or 1 at the ends of t a float can reach, and λ(t) would jump at t = 0 or 1 (issue 7).
s̃ and its slope are computed in log space, σ(a) − σ(b) = σ(a)·σ(−b)·(−expm1(b − a)), so they stay exact for
units parked where every σ rounds to 0 or 1. Working in logit(t) lets a few units reach the steep ends that
fixed schedules have (cosine: λ ≈ −2·logit(t) + const). The floor ε mixes in the uniform-in-λ schedule:
γ' ≥ ε, so p(λ) ≤ 1/(ε·(logsnr_max − logsnr_min)) and the schedule can never collapse onto a point mass.
dλ/dt is computed in closed form from the same parameters (checked against autograd in the tests); t_of
inverts λ(t) by bisection.

Class-conditional (num_classes = K > 0): class y uses centres c + class_c[y] and mixture logits
raw_pi + class_pi[y] (both (K, H), zero-initialised); the slopes are shared and positive, so λ(t, y) is
monotone with exact endpoints for every class and any weights. y = None is the shared schedule.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn
import torch.nn.functional as F

from adaptive_sched.bisection import bisect_decreasing
from adaptive_sched.class_schedules import check_label
from adaptive_sched.errors import UsageError
from adaptive_sched.schedules.base import (DEFAULT_LOGSNR_MAX, DEFAULT_LOGSNR_MIN, check_count, check_finite,
                                           check_logsnr_window, sample_by_inverse_transform)

LOGIT_WINDOW = 15.0          # L: every unit is renormalised to ℓ = logit(t) ∈ [−L, L]
_INITIAL_FITS: dict[tuple, list[torch.Tensor]] = {}      # fit_initial: (hidden, floor, lo, hi, init, dtype) -> weights


def window_units(ell: torch.Tensor, u: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s̃(ℓ) = (σ(a) − σ(a0))/(σ(a1) − σ(a0)) and ds̃/dℓ = u·σ(a)σ(−a)/(σ(a1) − σ(a0)), in log space."""
    a, a0, a1 = ell * u + c, c - u * LOGIT_WINDOW, c + u * LOGIT_WINDOW
    tail = torch.expm1(a0 - a1)                                               # −(1 − e^(a0 − a1)) < 0
    s = torch.exp(F.logsigmoid(a) - F.logsigmoid(a1)) * torch.expm1(a0 - a) / tail
    log_norm = F.logsigmoid(a1) + F.logsigmoid(-a0) + torch.log(-tail)        # log(σ(a1) − σ(a0))
    return s, u * torch.exp(F.logsigmoid(a) + F.logsigmoid(-a) - log_norm)


class LearnedSchedule(nn.Module):
    """Monotone-network schedule λ_φ(t) or λ_φ(t, y) with the fixed-schedule surface: logsnr, t_of, density, sample."""

    name = "learned"

    def __init__(self, hidden: int = 64, floor: float = 0.02, init: str = "cosine",
                 logsnr_min: float = DEFAULT_LOGSNR_MIN, logsnr_max: float = DEFAULT_LOGSNR_MAX, num_classes: int = 0):
        super().__init__()
        lo, hi = check_logsnr_window(logsnr_min, logsnr_max)
        hidden = check_count("hidden", hidden, 1, 4096)
        self.num_classes = check_count("num_classes", num_classes, 0, 1_000_000)
        floor = check_finite("floor", floor)
        if not 0 < floor < 1:
            raise UsageError(f"parameter floor must be in (0, 1), got {floor}")
        self.logsnr_min, self.logsnr_max, self.floor, self.hidden, self.init_name = lo, hi, floor, hidden, init
        self.raw_u = nn.Parameter(torch.zeros(hidden))                      # slopes softplus(0) + 0.05 ≈ 0.74
        self.c = nn.Parameter(torch.linspace(-8.0, 8.0, hidden))             # centres spread over logit(t)
        self.raw_pi = nn.Parameter(torch.zeros(hidden))
        self.class_c = self.class_pi = None
        if self.num_classes:                                                 # per-class offsets (K, H): the bias path
            self.class_c = nn.Parameter(torch.zeros(self.num_classes, hidden))
            self.class_pi = nn.Parameter(torch.zeros(self.num_classes, hidden))
        if init != "none":
            self.fit_initial(init)

    def params(self) -> dict:
        extra = {"num_classes": self.num_classes} if self.num_classes else {}
        return {"hidden": self.hidden, "floor": self.floor, "init": self.init_name, **extra}

    # --- the monotone map ---------------------------------------------------------------------
    def _weights(self, y, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Centres and mixture logits of y: c, raw_pi (H,) for y = None, else c + class_c[y], raw_pi + class_pi[y]."""
        y = check_label(y, self.num_classes, t.shape)                  # None, an int, or an integer tensor like t
        if y is None:
            return self.c, self.raw_pi
        if isinstance(y, torch.Tensor):
            y = y.to(self.c.device, torch.int64)
        return self.c + self.class_c[y], self.raw_pi + self.class_pi[y]         # (H,) or (…, H) gathered per example

    def _gamma(self, t: torch.Tensor, c: torch.Tensor, raw_pi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """γ(t) = (1 − ε)·Σ_j π_j·s̃_j(ℓ) + ε·t, γ'(t) = (1 − ε)·Σ_j π_j·s̃_j'(ℓ)·dℓ/dt + ε; ℓ = clamp(logit t, ±L)."""
        dtype, finfo = t.dtype, torch.finfo(t.dtype)
        u = (F.softplus(self.raw_u) + 0.05).to(dtype)                       # (H,) slopes ≥ 0.05, shared by all classes
        c, pi = c.to(dtype), torch.softmax(raw_pi.to(dtype), -1)             # (H,) or (…, H)
        t_in = t.clamp(finfo.tiny ** 0.5, 1 - finfo.eps)                      # keeps logit finite; the window is on ℓ
        logit = torch.log(t_in) - torch.log1p(-t_in)
        inside = logit.abs() < LOGIT_WINDOW                                   # dℓ/dt = 0 where ℓ is clamped
        s, ds = window_units(logit.clamp(-LOGIT_WINDOW, LOGIT_WINDOW)[..., None], u, c)    # (…, H)
        dlogit = torch.where(inside, 1 / (t_in * (1 - t_in)), torch.zeros_like(t_in))
        gam = (1 - self.floor) * (s * pi).sum(-1) + self.floor * t
        dgam = (1 - self.floor) * (ds * pi).sum(-1) * dlogit + self.floor
        gam = torch.where(t <= 0, torch.zeros_like(gam), torch.where(t >= 1, torch.ones_like(gam), gam))
        return gam, dgam

    def _logsnr_and_slope(self, t: torch.Tensor, weights) -> tuple[torch.Tensor, torch.Tensor]:
        """λ(t) = λ_max − (λ_max − λ_min)·γ(t) and dλ/dt = −(λ_max − λ_min)·γ'(t) for resolved class weights."""
        gam, dgam = self._gamma(t, *weights)
        width = self.logsnr_max - self.logsnr_min
        lam = (self.logsnr_max - width * gam.clamp(0.0, 1.0)).clamp(self.logsnr_min, self.logsnr_max)
        lam = torch.where(t <= 0, torch.full_like(lam, self.logsnr_max), lam)
        lam = torch.where(t >= 1, torch.full_like(lam, self.logsnr_min), lam)
        return lam, -width * dgam

    def logsnr_and_slope(self, t: torch.Tensor, y=None) -> tuple[torch.Tensor, torch.Tensor]:
        """λ(t, y) and dλ/dt (< 0), differentiable in the schedule's parameters."""
        t = self._as_float(t).clamp(0.0, 1.0)
        return self._logsnr_and_slope(t, self._weights(y, t))

    def curvature(self, t: torch.Tensor, y=None) -> torch.Tensor:
        """d²λ/dt² at t by central differences of the closed-form slope (for CVDM's smoothness term)."""
        h = 1e-3
        t = self._as_float(t).clamp(h, 1 - h)
        weights = self._weights(y, t)
        return (self._logsnr_and_slope(t + h, weights)[1] - self._logsnr_and_slope(t - h, weights)[1]) / (2 * h)

    # --- the schedule surface -----------------------------------------------------------------
    def logsnr(self, t: torch.Tensor, y=None) -> torch.Tensor:
        """λ(t, y), decreasing, λ(0) = logsnr_max and λ(1) = logsnr_min exactly."""
        return self.logsnr_and_slope(t, y)[0]

    @torch.no_grad()
    def t_of(self, logsnr: torch.Tensor, y=None) -> torch.Tensor:
        """t(λ, y) by bisection on the monotone λ(t, y) (64 halvings: exact to the dtype's resolution)."""
        lam = self._as_float(logsnr)
        weights = self._weights(y, lam)
        t = bisect_decreasing(lambda mid: self._logsnr_and_slope(mid, weights)[0], lam, torch.zeros_like(lam),
                              torch.ones_like(lam))
        t = torch.where(lam >= self.logsnr_max, torch.zeros_like(t), t)
        return torch.where(lam <= self.logsnr_min, torch.ones_like(t), t)

    def log_density(self, logsnr: torch.Tensor, y=None) -> torch.Tensor:
        """log p(λ | y) = −log|dλ/dt| at t(λ, y); −inf outside the window."""
        lam = self._as_float(logsnr)
        weights = self._weights(y, lam)
        _, slope = self._logsnr_and_slope(self.t_of(lam, y), weights)
        inside = (lam >= self.logsnr_min) & (lam <= self.logsnr_max)
        return torch.where(inside, -torch.log(-slope), torch.full_like(slope, -math.inf))

    def density(self, logsnr: torch.Tensor, y=None) -> torch.Tensor:
        """p(λ | y), integrating to 1 over the window for every y."""
        return self.log_density(logsnr, y).exp()

    def sample(self, n: int, generator: torch.Generator | None = None, device=None,
               dtype: torch.dtype = torch.float32, y=None) -> torch.Tensor:
        """n draws λ ~ p(λ | y) by inverse transform λ(t, y), t ~ U(0, 1); y None, an int or (n,) labels."""
        return sample_by_inverse_transform(SimpleNamespace(logsnr=lambda t: self.logsnr(t, y)), n, generator,
                                           device, dtype)

    # --- initialisation -----------------------------------------------------------------------
    def fit_initial(self, name: str) -> None:
        """Set the shared weights to `fit_to(name)` from the fresh initialisation, fitted once per process.

        The fit is deterministic given (hidden, floor, window, target, dtype), so later schedules of the same shape copy
        the first one's result (a few seconds of Adam saved per schedule built: sweeps, comparisons, tests)."""
        key = (self.hidden, self.floor, self.logsnr_min, self.logsnr_max, name, self.c.dtype)
        if key not in _INITIAL_FITS:
            self.fit_to(name)
            _INITIAL_FITS[key] = [p.detach().clone() for p in self._shared_parameters()]
        with torch.no_grad():
            for p, fitted in zip(self._shared_parameters(), _INITIAL_FITS[key]):
                p.copy_(fitted)

    def _shared_parameters(self) -> tuple[nn.Parameter, ...]:
        """The weights every class shares (what fit_to fits): slopes, centres, mixture logits."""
        return self.raw_u, self.c, self.raw_pi

    def fit_to(self, name: str, steps: int = 400, **params) -> float:
        """Fit the shared λ_φ(t) to a fixed schedule's λ(t) on the window (least squares on a t grid); returns the RMSE.

        Adam with the learning rate cosine-decayed from 0.1 to 0.001: at a constant 0.1 the loss spikes now and
        then, and the final RMSE depended on where the run stopped. Class offsets are left as they are."""
        from adaptive_sched import schedules
        target_schedule = schedules.build(name, logsnr_min=self.logsnr_min, logsnr_max=self.logsnr_max, **params)
        t = torch.linspace(0.0, 1.0, 513, dtype=torch.float64)
        target = target_schedule.logsnr(t).float()
        t = t.float()
        opt = torch.optim.Adam(self._shared_parameters(), lr=0.1)
        for step in range(steps):
            opt.param_groups[0]["lr"] = 0.1 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / steps)))
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
        classes = f", num_classes={self.num_classes}" if self.num_classes else ""
        return (f"learned(hidden={self.hidden}, floor={self.floor}, init={self.init_name!r}, "
                f"logsnr_min={self.logsnr_min}, logsnr_max={self.logsnr_max}{classes})")
