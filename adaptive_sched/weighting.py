"""Loss weightings over logSNR, in log space, so that sampling density and weighting are separate choices.

The loss has the importance-sampling form of Kingma & Gao (2023), with ℓ(λ) = ‖ε̂ − ε‖²:

    L = E_{λ~p}[ c(λ) · ℓ(λ) ],    c(λ) = w(λ) / p(λ),

where w(λ) is the weight per unit of λ (∫ w ℓ dλ is what is minimised). A weighting is either
  relative: it gives the per-example multiplier c(λ) = m(λ) directly (min-SNR, P2, EDM, the
            targets' own MSEs), so the total weight w = p·m still follows the schedule; or
  absolute: it gives w(λ) itself (sigmoid, elbo, `like` a fixed schedule), and c = w/p, so the
            objective does not depend on the sampling density p, only its variance does.
The default, `schedule`, is the paper's setting: the plain MSE of the prediction target with λ ~ p,
i.e. relative with m = m_target (eps: 1, x0: e^{−λ}, v: 1 + e^{−λ}, flow: (1 + e^{−λ/2})²).
"""
from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from adaptive_sched.config import suggest
from adaptive_sched.diffusion import log_target_weight
from adaptive_sched.errors import UsageError
from adaptive_sched.schedules.base import check_finite, check_positive


@dataclass
class Weighting:
    """A weighting: `log_weight(λ)` is log m(λ) when `relative`, else log w(λ)."""

    name: str
    log_weight: Callable[[torch.Tensor], torch.Tensor] | None
    relative: bool
    params: dict = field(default_factory=dict)

    @property
    def needs_density(self) -> bool:
        """Whether the factor divides by the schedule's density p(λ) (an absolute weighting: c = w/p)."""
        return self.log_weight is not None and not self.relative

    def log_multiplier(self, logsnr: torch.Tensor, log_density: Callable | None, target: str) -> torch.Tensor:
        """log c(λ) − log m_target(λ): the factor applied to the target-space MSE of each example."""
        if self.log_weight is None:          # `schedule`: the target's own MSE, factor 1
            return torch.zeros_like(logsnr)
        log_c = self.log_weight(logsnr)
        if not self.relative:
            if log_density is None:
                raise UsageError(f"weighting {self.name!r} needs the schedule's density")
            log_c = log_c - log_density(logsnr)
        return log_c - log_target_weight(logsnr, target)


def schedule_weighting() -> Weighting:
    """The schedule sets both sampling and weighting: L = E_{λ~p} ‖target̂ − target‖² (Hang & Gu 2024)."""
    return Weighting("schedule", None, relative=True)


def target_weighting(target: str) -> Callable[[], Weighting]:
    """The per-example weight of a target's plain MSE, on the ε-MSE: m = m_target(λ)."""
    def factory() -> Weighting:
        return Weighting(target, lambda lam: log_target_weight(lam, target), relative=True)
    factory.__doc__ = f"Plain {target}-MSE whatever the network predicts: m(λ) = m_{target}(λ) on the ε-MSE."
    return factory


def min_snr(gamma: float = 5.0) -> Weighting:
    """Min-SNR-γ (Hang et al. 2023) on the ε-MSE: m = min(e^λ, γ)/e^λ."""
    gamma = check_positive("gamma", gamma)
    log_g = math.log(gamma)
    return Weighting("min-snr", lambda lam: torch.clamp(lam, max=log_g) - lam, True, {"gamma": gamma})


def soft_min_snr(gamma: float = 5.0) -> Weighting:
    """Soft-min-SNR (Crowson et al. 2024) on the ε-MSE: m = γ/(e^λ + γ)."""
    gamma = check_positive("gamma", gamma)
    log_g = math.log(gamma)
    return Weighting("soft-min-snr", lambda lam: log_g - torch.logaddexp(lam, torch.full_like(lam, log_g)), True,
                     {"gamma": gamma})


def p2(k: float = 1.0, gamma: float = 1.0) -> Weighting:
    """P2 weighting (Choi et al. 2022) on the ε-MSE: m = (k + e^λ)^{−γ}."""
    k, gamma = check_positive("k", k), check_finite("gamma", gamma)
    log_k = math.log(k)
    return Weighting("p2", lambda lam: -gamma * torch.logaddexp(lam, torch.full_like(lam, log_k)), True,
                     {"k": k, "gamma": gamma})


def edm(sigma_data: float = 0.5) -> Weighting:
    """EDM's loss weight (Karras et al. 2022) on the ε-MSE: m = 1 + e^{−λ}/σ_data²."""
    sigma_data = check_positive("sigma_data", sigma_data)
    shift = 2 * math.log(sigma_data)
    return Weighting("edm", lambda lam: F.softplus(-lam - shift), True, {"sigma_data": sigma_data})


def sigmoid(b: float = 0.0) -> Weighting:
    """Sigmoid weighting (Kingma & Gao 2023), absolute: w(λ) = sigmoid(b − λ)."""
    b = check_finite("b", b)
    return Weighting("sigmoid", lambda lam: F.logsigmoid(b - lam), False, {"b": b})


def elbo() -> Weighting:
    """The continuous-time ELBO (Kingma et al. 2021), absolute: w(λ) = 1 (up to the factor ½)."""
    return Weighting("elbo", lambda lam: torch.zeros_like(lam), False)


def like(schedule: str = "laplace", target: str = "eps", **params) -> Weighting:
    """The effective weighting of a fixed schedule trained on `target`'s MSE, absolute: w = p_NAME(λ)·m_target(λ)."""
    from adaptive_sched import schedules
    reference = schedules.build(schedule, **params)
    return Weighting("like", lambda lam: reference.log_density(lam) + log_target_weight(lam, target), False,
                     {"schedule": schedule, "target": target, **params})


WEIGHTINGS: dict[str, Callable[..., Weighting]] = {
    "schedule": schedule_weighting,
    "eps": target_weighting("eps"), "x0": target_weighting("x0"), "v": target_weighting("v"),
    "flow": target_weighting("flow"),
    "min-snr": min_snr, "soft-min-snr": soft_min_snr, "p2": p2, "edm": edm,
    "sigmoid": sigmoid, "elbo": elbo, "like": like,
}


def names() -> list[str]:
    """Registered weighting names."""
    return list(WEIGHTINGS)


def build(name: str, **params) -> Weighting:
    """Build weighting `name`; unknown names or parameters raise UsageError listing the valid ones."""
    if name not in WEIGHTINGS:
        close = difflib.get_close_matches(str(name), list(WEIGHTINGS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown weighting {name!r}{hint}; choose one of: {', '.join(WEIGHTINGS)}")
    factory = WEIGHTINGS[name]
    sig = inspect.signature(factory)
    takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    unknown = [k for k in params if k not in sig.parameters]
    if unknown and not takes_any:
        valid = ", ".join(sig.parameters) or "none"
        raise UsageError(f"weighting {name!r} has no parameter {unknown[0]!r}"
                         f"{suggest(unknown[0], list(sig.parameters))}; its parameters are: {valid}")
    return factory(**params)
