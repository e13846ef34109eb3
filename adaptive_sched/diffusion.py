"""Variance-preserving forward process in logSNR, and exact conversions between prediction targets.

Conventions (Kingma et al. 2021; Kingma & Gao 2023):
    λ = log(α²/σ²),  α² = sigmoid(λ),  σ² = sigmoid(−λ),  x_λ = α·x0 + σ·ε.
Targets a network may predict:
    eps : ε
    x0  : x0
    v   : α·ε − σ·x0                       (Salimans & Ho 2022)
    flow: ε − x0                           (rectified flow velocity; x_flow = x_λ/(α+σ), s = σ/(α+σ))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptive_sched.errors import UsageError

TARGETS = ("eps", "x0", "v", "flow")


def check_target(name: str) -> str:
    """Return `name` if it is a known prediction target, else raise UsageError listing them."""
    if name not in TARGETS:
        raise UsageError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}")
    return name


def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α = sqrt(sigmoid(λ)), σ = sqrt(sigmoid(−λ)); finite and in [0, 1] for every λ."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def broadcast_to(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-example vector (N,) to (N, 1, ..., 1) so it broadcasts against x (N, ...)."""
    return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    """Forward process x_λ = α·x0 + σ·ε, with λ given per example (N,)."""
    alpha, sigma = alpha_sigma(broadcast_to(logsnr, x0))
    return alpha * x0 + sigma * eps


def target_value(x0: torch.Tensor, eps: torch.Tensor, logsnr: torch.Tensor, target: str) -> torch.Tensor:
    """The regression target for `target` given the clean data and the noise."""
    alpha, sigma = alpha_sigma(broadcast_to(logsnr, x0))
    if target == "eps":
        return eps
    if target == "x0":
        return x0
    if target == "v":
        return alpha * eps - sigma * x0
    if target == "flow":
        return eps - x0
    raise UsageError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")


def to_x0_eps(pred: torch.Tensor, x_t: torch.Tensor, logsnr: torch.Tensor,
              target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (x̂0, ε̂) from a prediction of `target` at x_λ.

    eps : x̂0 = (x − σε̂)/α          x0: ε̂ = (x − αx̂0)/σ
    v   : x̂0 = αx − σv̂, ε̂ = σx + αv̂ (no division: exact at both ends)
    flow: x̂0 = (x − σû)/(α+σ), ε̂ = û + x̂0
    """
    alpha, sigma = alpha_sigma(broadcast_to(logsnr, x_t))
    if target == "eps":
        return (x_t - sigma * pred) / alpha, pred
    if target == "x0":
        return pred, (x_t - alpha * pred) / sigma
    if target == "v":
        return alpha * x_t - sigma * pred, sigma * x_t + alpha * pred
    if target == "flow":
        x0 = (x_t - sigma * pred) / (alpha + sigma)
        return x0, pred + x0
    raise UsageError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")


def convert(pred: torch.Tensor, x_t: torch.Tensor, logsnr: torch.Tensor, source: str, dest: str) -> torch.Tensor:
    """Convert a prediction of target `source` into the equivalent prediction of target `dest`."""
    if source == dest:
        return pred
    x0, eps = to_x0_eps(pred, x_t, logsnr, source)
    return target_value(x0, eps, logsnr, dest)


def log_target_weight(logsnr: torch.Tensor, target: str) -> torch.Tensor:
    """log m(λ), where ‖target̂ − target‖² = m(λ)·‖ε̂ − ε‖² at x_λ.

    eps: m = 1;  x0: m = e^{−λ};  v: m = 1/α² = 1 + e^{−λ};  flow: m = (1 + σ/α)² = (1 + e^{−λ/2})².
    """
    if target == "eps":
        return torch.zeros_like(logsnr)
    if target == "x0":
        return -logsnr
    if target == "v":
        return F.softplus(-logsnr)
    if target == "flow":
        return 2 * F.softplus(-logsnr / 2)
    raise UsageError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
