"""Kingma & Gao (2023)'s adaptive objective: fit a learned schedule to where the weighted loss is.

The estimator f = w(λ)/p(λ)·ℓ of ∫ w ℓ dλ has the least variance when p(λ) ∝ w(λ)·E[ℓ | λ] (for a loss
that varies little within a bin). The per-bin EMA of w·ℓ lives in a `LossHistogram`
(adaptive_sched.schedules.binned); the `adaptive` objective fits λ_φ(t) to the inverse CDF of its
density by least squares on a t grid: no gradient flows through the denoiser. A class-conditional
schedule (num_classes = K > 0) has one histogram per class, p(λ | k) ∝ w(λ)·E[ℓ | λ, k], and each
class's λ_φ(t, k) is fitted to its own.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from adaptive_sched.schedules.binned import LossHistogram, summed_over_ranks


def class_histograms(schedule) -> LossHistogram | nn.ModuleList:
    """One LossHistogram over the schedule's window, or K of them (class k's at index k) for a conditional schedule."""
    def make():
        return LossHistogram(schedule.logsnr_min, schedule.logsnr_max, floor=schedule.floor)
    classes = getattr(schedule, "num_classes", 0)
    return nn.ModuleList(make() for _ in range(classes)) if classes else make()


@torch.no_grad()
def update_histogram(histogram: LossHistogram | nn.ModuleList, logsnr: torch.Tensor, weighted_loss: torch.Tensor,
                     cond: torch.Tensor | None = None) -> None:
    """Update the EMA of w·ℓ; per class, each histogram sees only its class's examples (cond (N,)). Under DDP the
    classes' bin sums go over the ranks in one collective."""
    if not isinstance(histogram, nn.ModuleList):
        return histogram.update(logsnr, weighted_loss)
    sums = summed_over_ranks(torch.stack([h.batch_sums(logsnr, torch.where(cond == k, weighted_loss, math.nan))
                                          for k, h in enumerate(histogram)]))  # (C, 2, K); NaN: another class's
    for h, class_sums in zip(histogram, sums):
        h.apply_sums(class_sums)


def fit_loss(schedule, histogram: LossHistogram | nn.ModuleList, points: int = 129) -> torch.Tensor:
    """Mean over classes and a t grid of (λ_φ(t, k) − λ_q,k(t))², scaled by the window width²: the `adaptive` loss."""
    hists = list(histogram) if isinstance(histogram, nn.ModuleList) else [histogram]
    device = hists[0].value.device
    t = torch.linspace(0.0, 1.0, points, device=device, dtype=torch.float32)
    target = torch.stack([h.target_logsnr(t) for h in hists]).detach()                 # (K, P)
    if isinstance(histogram, nn.ModuleList):
        y = torch.arange(len(hists), device=device)[:, None].expand_as(target)          # (K, P) class of each row
        lam = schedule.logsnr(t.expand_as(target), y)
    else:
        lam = schedule.logsnr(t)[None]
    width = hists[0].logsnr_max - hists[0].logsnr_min
    return (lam - target).square().mean() / width ** 2
