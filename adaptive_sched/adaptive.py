"""Kingma & Gao (2023)'s adaptive objective: fit a learned schedule to where the weighted loss is.

The estimator f = w(λ)/p(λ)·ℓ of ∫ w ℓ dλ has the least variance when p(λ) ∝ w(λ)·E[ℓ | λ] (for a loss
that varies little within a bin). The per-bin EMA of w·ℓ lives in a `LossHistogram`
(adaptive_sched.schedules.binned); the `adaptive` objective fits λ_φ(t) to the inverse CDF of its
density by least squares on a t grid: no gradient flows through the denoiser.
"""
from __future__ import annotations

import torch

from adaptive_sched.schedules.binned import LossHistogram


def fit_loss(schedule, histogram: LossHistogram, points: int = 129) -> torch.Tensor:
    """Mean squared gap between λ_φ(t) and λ_q(t) on a t grid, scaled by the window width²: the `adaptive` loss."""
    device = histogram.value.device
    t = torch.linspace(0.0, 1.0, points, device=device, dtype=torch.float32)
    target = histogram.target_logsnr(t).detach()
    width = histogram.logsnr_max - histogram.logsnr_min
    return (schedule.logsnr(t) - target).square().mean() / width ** 2
