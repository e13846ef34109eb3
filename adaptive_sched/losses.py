"""The diffusion training loss: λ ~ p, x_λ = αx0 + σε, loss = c(λ)·‖ε̂ − ε‖² (Kingma & Gao 2023, eq. 7).

Computed in the target's own space: ‖pred − target‖² · exp(log c(λ) − log m_target(λ)), which is
exactly c(λ)·ℓ_ε with no division by α or σ. With the default `schedule` weighting the factor is 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptive_sched.adaptive import class_histograms, fit_loss, update_histogram
from adaptive_sched.class_schedules import check_label
from adaptive_sched.diffusion import add_noise, check_target, log_target_weight, target_value
from adaptive_sched.errors import UsageError
from adaptive_sched.schedules import is_learned
from adaptive_sched.schedules.base import uniform_t
from adaptive_sched.weighting import Weighting, schedule_weighting


@dataclass
class LossTerms:
    """Per-example outputs of one loss evaluation, all (N,)."""

    loss: torch.Tensor        # c(λ)·ℓ_ε(λ): the training loss of each example
    logsnr: torch.Tensor      # λ drawn for each example
    eps_mse: torch.Tensor     # ℓ_ε(λ) = mean over dimensions of (ε̂ − ε)², unweighted
    extra: torch.Tensor | float = 0.0   # a scalar added to the batch mean: the schedule's own loss (adaptive's fit,
                                        # cvdm's smoothness penalty), not part of the logged training loss


def per_example_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over all but the first dimension of (pred − target)², in float32."""
    return (pred.float() - target.float()).square().flatten(1).mean(dim=1)


OBJECTIVES = ("variance", "adaptive", "cvdm")


def check_objective(objective: str) -> str:
    """The learned schedule's objective, or a UsageError naming the choices."""
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown schedule objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    return objective


class DiffusionLoss:
    """λ-sampling (the schedule), prediction target and weighting, combined into one loss.

    With a learned schedule, λ = λ_φ(t) for t ~ U(0, 1) and log p(λ) = −log|dλ/dt| come from the schedule
    network with gradients, and `objective` says what φ minimises:
      variance: E[f²] with f = w(λ)/p_φ(λ)·ℓ(λ), the second moment (so the variance) of the per-example loss
                estimator, whose mean ∫ w ℓ dλ does not depend on φ (VDM; Kingma et al. 2021, App. I.2).
                One backward pass: hooks on λ and log p multiply the gradient reaching φ by 2f.
      adaptive: Kingma & Gao (2023): keep an EMA of w·ℓ per λ bin and fit λ_φ(t) to the inverse CDF of the
                density ∝ that EMA (adaptive_sched.adaptive); the denoiser's loss uses p_φ with no gradient.
      cvdm:     the training loss itself, E_t[c(λ_φ(t))·ℓ], with a relative weighting (CVDM-style), plus
                `smoothness`·E[(d²λ/dt²)²]/(λ_max − λ_min)²; the endpoints are pinned exactly by construction.
    A conditional schedule (num_classes = K > 0) draws λ ~ p(λ | cond) for each example's condition `cond`;
    variance and cvdm then apply per example as they are, and adaptive keeps one histogram per class and fits
    each class's λ_φ(t, k) to its own.
    """

    def __init__(self, schedule, target: str = "eps", weighting: Weighting | None = None,
                 objective: str = "variance", smoothness: float = 0.0):
        self.schedule = schedule
        self.target = check_target(target)
        self.weighting = weighting or schedule_weighting()
        self.learned = is_learned(schedule)
        check_objective(objective)
        self.objective, self.smoothness = objective, smoothness
        self.histogram = None
        self.core_fn = None            # `core` compiled whole (adaptive_sched.compiling), else None
        if self.learned and hasattr(schedule, "histogram"):          # adaptive_binned: the histogram is the schedule
            self.histogram, self.objective = schedule.histogram, "adaptive"
        elif self.learned and objective == "adaptive":
            self.histogram = class_histograms(schedule)      # one LossHistogram, or one per class (nn.ModuleList)
        if self.learned and self.objective in ("variance", "adaptive") and self.weighting.relative:
            raise UsageError(f"the {self.objective} objective needs an absolute weighting (like, sigmoid, elbo), not "
                             f"{self.weighting.name!r}: with a relative one the objective itself would move with "
                             f"the schedule")

    @property
    def uses_gradient_hooks(self) -> bool:
        """Whether `core` registers the variance objective's gradient hooks (a learned schedule, objective variance)."""
        return self.learned and self.objective == "variance"

    def terms(self, model, x0: torch.Tensor, y: torch.Tensor | None = None,
              generator: torch.Generator | None = None, logsnr: torch.Tensor | None = None,
              cond: torch.Tensor | None = None) -> LossTerms:
        """Draw λ (or t, for a learned schedule) and ε from `generator`, run the model once through `core`, return
        the per-example loss terms; the cvdm curvature and the adaptive histogram are added here, eagerly.

        `y` is the denoiser's label (possibly the null class, for CFG); `cond` (N,) int64 is the schedule's
        condition (the true class), required when the schedule has num_classes > 0 and ignored otherwise."""
        n = x0.shape[0]
        classes = getattr(self.schedule, "num_classes", 0)
        if classes and cond is None:
            raise UsageError(f"the schedule is conditioned on {classes} classes: pass cond, each example's class (N,)")
        on = {"y": check_label(cond, classes, (n,))} if classes else {}                # the schedule's condition
        t = log_p = None
        if logsnr is None and self.learned:
            t = uniform_t(n, generator, x0.device)
        elif logsnr is None:
            logsnr = self.schedule.sample(n, generator=generator, device=x0.device, **on)      # (N,)
        if t is None and self.weighting.needs_density:                          # a given λ's log p(λ), eagerly
            if not hasattr(self.schedule, "log_density"):
                raise UsageError(f"weighting {self.weighting.name!r} needs the schedule's density")
            log_p = self.schedule.log_density(logsnr, *on.values())
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        loss, logsnr, eps_mse, slope = (self.core_fn or self.core)(model, x0, eps, y, t, logsnr, log_p,
                                                                   cond if classes else None)
        extra = 0.0
        if slope is not None and logsnr.requires_grad and self.objective == "cvdm" and self.smoothness > 0:
            # the schedule's own term, beside (not inside) the denoiser's per-example loss, which is what gets logged
            curvature = self.schedule.curvature(t, **on) / (self.schedule.logsnr_max - self.schedule.logsnr_min)
            extra = self.smoothness * curvature.square().mean()
        if self.histogram is not None and slope is not None and torch.is_grad_enabled():
            update_histogram(self.histogram, logsnr, loss.detach() / (-slope), cond)   # w·ℓ = f·p, p = 1/|dλ/dt|
            if self.histogram is not getattr(self.schedule, "histogram", None):
                extra = fit_loss(self.schedule, self.histogram)
        return LossTerms(loss=loss, logsnr=logsnr, eps_mse=eps_mse, extra=extra)

    def core(self, model, x0: torch.Tensor, eps: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor | None,
             logsnr: torch.Tensor | None, log_p: torch.Tensor | None, cond: torch.Tensor | None, parts=None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(loss, λ, ℓ_ε, dλ/dt or None), each (N,), for drawn noise: no randomness and no state, so that
        `compile_run` compiles it whole (schedule network, weighting, denoiser and the variance hooks in one graph),
        or its two `parts` separately with the hooks between them, where torch cannot trace the hooks.

        Learned schedule (t given): λ, dλ/dt and log p(λ) from `schedule_part`; else λ and log p(λ) (None unless the
        weighting needs it) are given. Then `denoiser_part`, and for the variance objective the hooks that make
        φ's gradient ∇φ E[f²] = E[2f ∇φ f] in the same backward pass."""
        schedule_part, denoiser_part = parts or (self.schedule_part, self.denoiser_part)
        slope = None
        if t is not None:
            logsnr, slope, log_p = schedule_part(t, cond)
        loss, eps_mse = denoiser_part(model, x0, eps, y, logsnr, log_p)
        if slope is not None and logsnr.requires_grad and self.uses_gradient_hooks:
            factor = 2 * loss.detach()
            logsnr.register_hook(lambda grad: grad * factor)
            log_p.register_hook(lambda grad: grad * factor)
        return loss, logsnr, eps_mse, slope

    def schedule_part(self, t: torch.Tensor, cond: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A learned schedule at t (N,): λ = λ_φ(t | cond), dλ/dt and log p(λ) = −log(−dλ/dt), float32, with
        gradients to φ (none for the adaptive objective, which fits φ separately)."""
        logsnr, slope = self.schedule.logsnr_and_slope(t, **({} if cond is None else {"y": cond}))
        logsnr, slope = logsnr.float(), slope.float()
        if self.objective == "adaptive":
            logsnr, slope = logsnr.detach(), slope.detach()
        return logsnr, slope, -torch.log(-slope)

    def denoiser_part(self, model, x0: torch.Tensor, eps: torch.Tensor, y: torch.Tensor | None,
                      logsnr: torch.Tensor, log_p: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, ℓ_ε) per example: x_λ = αx0 + σε, one model call, loss = c(λ)·ℓ_ε computed in the target's space
        as ‖pred − target‖²·exp(log c − log m_target)."""
        x_t = add_noise(x0, eps, logsnr)
        pred = model(x_t, logsnr, y)
        mse = per_example_mse(pred, target_value(x0, eps, logsnr, self.target))           # (N,)
        log_factor = self.weighting.log_multiplier(logsnr, None if log_p is None else (lambda lam: log_p),
                                                   self.target)
        return mse * torch.exp(log_factor), mse * torch.exp(-log_target_weight(logsnr, self.target))

    def __call__(self, model, x0, y=None, generator=None, cond=None) -> torch.Tensor:
        """The batch's training objective: the mean loss plus the schedule's own term (`extra`)."""
        terms = self.terms(model, x0, y, generator, cond=cond)
        return terms.loss.mean() + terms.extra
