"""The diffusion training loss: λ ~ p, x_λ = αx0 + σε, loss = c(λ)·‖ε̂ − ε‖² (Kingma & Gao 2023, eq. 7).

Computed in the target's own space: ‖pred − target‖² · exp(log c(λ) − log m_target(λ)), which is
exactly c(λ)·ℓ_ε with no division by α or σ. With the default `schedule` weighting the factor is 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptive_sched.diffusion import add_noise, check_target, log_target_weight, target_value
from adaptive_sched.weighting import Weighting, schedule_weighting


@dataclass
class LossTerms:
    """Per-example outputs of one loss evaluation, all (N,)."""

    loss: torch.Tensor        # c(λ)·ℓ_ε(λ): the training loss of each example
    logsnr: torch.Tensor      # λ drawn for each example
    eps_mse: torch.Tensor     # ℓ_ε(λ) = mean over dimensions of (ε̂ − ε)², unweighted


def per_example_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over all but the first dimension of (pred − target)², in float32."""
    return (pred.float() - target.float()).square().flatten(1).mean(dim=1)


class DiffusionLoss:
    """λ-sampling (the schedule), prediction target and weighting, combined into one loss."""

    def __init__(self, schedule, target: str = "eps", weighting: Weighting | None = None):
        self.schedule = schedule
        self.target = check_target(target)
        self.weighting = weighting or schedule_weighting()

    def terms(self, model, x0: torch.Tensor, y: torch.Tensor | None = None,
              generator: torch.Generator | None = None, logsnr: torch.Tensor | None = None) -> LossTerms:
        """Draw λ and ε (from `generator`), run the model once, return the per-example loss terms."""
        n = x0.shape[0]
        if logsnr is None:
            logsnr = self.schedule.sample(n, generator=generator, device=x0.device)      # (N,)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = add_noise(x0, eps, logsnr)
        pred = model(x_t, logsnr, y)
        mse = per_example_mse(pred, target_value(x0, eps, logsnr, self.target))           # (N,)
        log_factor = self.weighting.log_multiplier(logsnr, getattr(self.schedule, "log_density", None), self.target)
        eps_mse = mse * torch.exp(-log_target_weight(logsnr, self.target))
        return LossTerms(loss=mse * torch.exp(log_factor), logsnr=logsnr, eps_mse=eps_mse)

    def __call__(self, model, x0, y=None, generator=None) -> torch.Tensor:
        """The mean training loss over the batch."""
        return self.terms(model, x0, y, generator).loss.mean()
