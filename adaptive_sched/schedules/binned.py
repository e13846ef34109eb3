"""Per-λ-bin loss histograms and the binned adaptive schedule (Kingma & Gao 2023).

`LossHistogram` keeps an EMA of w·ℓ in K equal bins of λ, all on the device with no host sync; its
normalised values, mixed with the uniform density (the floor), are a piecewise-constant density q(λ).
`BinnedAdaptiveSchedule` samples from q itself; the `adaptive` objective fits a learned schedule to it
(adaptive_sched.adaptive).
"""
from __future__ import annotations

import torch

from adaptive_sched.errors import UsageError
from adaptive_sched.schedules.base import check_count, check_finite, check_logsnr_window, sample_by_inverse_transform
from adaptive_sched.schedules.table import interp


def summed_over_ranks(sums: torch.Tensor) -> torch.Tensor:
    """`sums` summed over the DDP ranks (one collective), or as it is outside torchrun."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    return sums


class LossHistogram(torch.nn.Module):
    """EMA of w(λ)·ℓ(λ) in `bins` equal bins over [logsnr_min, logsnr_max]."""

    def __init__(self, logsnr_min: float, logsnr_max: float, bins: int = 100, decay: float = 0.99,
                 floor: float = 0.02):
        super().__init__()
        self.logsnr_min, self.logsnr_max, self.decay, self.floor = logsnr_min, logsnr_max, decay, floor
        self.register_buffer("edges", torch.linspace(logsnr_min, logsnr_max, bins + 1, dtype=torch.float64))
        self.register_buffer("value", torch.ones(bins, dtype=torch.float64))     # EMA of w·ℓ per bin
        self.register_buffer("seen", torch.zeros(bins, dtype=torch.float64))     # examples seen per bin

    @torch.no_grad()
    def update(self, logsnr: torch.Tensor, weighted_loss: torch.Tensor) -> None:
        """Move each bin's EMA towards the mean of this batch's w·ℓ in it (bins without examples keep theirs).

        Non-finite values (a diverging step) are left out, so they never poison the EMA. Under DDP the bins' sums
        and counts are summed over the ranks first: every rank holds the histogram of the whole global batch.
        """
        self.apply_sums(summed_over_ranks(self.batch_sums(logsnr, weighted_loss)))

    @torch.no_grad()
    def batch_sums(self, logsnr: torch.Tensor, weighted_loss: torch.Tensor) -> torch.Tensor:
        """(2, K): this batch's finite w·ℓ summed per bin, and how many examples each bin got."""
        bins = len(self.value)
        width = (self.logsnr_max - self.logsnr_min) / bins
        ok = torch.isfinite(weighted_loss) & torch.isfinite(logsnr)
        idx = ((torch.where(ok, logsnr.double(), 0.0) - self.logsnr_min) / width).long().clamp(0, bins - 1)
        values = torch.where(ok, weighted_loss.double(), 0.0)
        total = torch.zeros_like(self.value).index_add_(0, idx, values)
        count = torch.zeros_like(self.value).index_add_(0, idx, ok.to(self.value.dtype))
        return torch.stack([total, count])

    @torch.no_grad()
    def apply_sums(self, sums: torch.Tensor) -> None:
        """The EMA step from batch_sums' (2, K) (summed over the ranks under DDP)."""
        total, count = sums[0], sums[1]
        batch_mean = total / count.clamp(min=1)
        first = (self.seen == 0) & (count > 0)
        rate = torch.where(count > 0, torch.full_like(self.value, 1 - self.decay), torch.zeros_like(self.value))
        rate = torch.where(first, torch.ones_like(rate), rate)
        self.value.lerp_(batch_mean, rate)
        self.seen += count

    def target_density(self) -> torch.Tensor:
        """q per bin (K,): (1 − floor)·value/Σ(value·Δ) + floor/(λ_max − λ_min); integrates to 1."""
        width = self.edges[1] - self.edges[0]
        shape = self.value.clamp(min=0)
        shape = shape + (shape.sum() <= 0).to(shape.dtype)        # all bins zero: the uniform shape, not q = floor
        shape = shape / (shape.sum() * width).clamp(min=1e-300)
        return (1 - self.floor) * shape + self.floor / (self.logsnr_max - self.logsnr_min)

    def target_logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """λ_q(t): the inverse of q's upper-tail CDF (piecewise linear), decreasing in t."""
        mass = self.target_density() * (self.edges[1] - self.edges[0])
        upper = torch.cat([mass.flip(0).cumsum(0).flip(0), mass.new_zeros(1)])   # (K+1,) mass above each edge
        upper = upper / upper[0]
        return interp(t.double(), upper.flip(0).contiguous(), self.edges.flip(0).contiguous()).to(t.dtype)


class BinnedAdaptiveSchedule(torch.nn.Module):
    """The plain binned baseline of the adaptive schedule: p(λ) is the piecewise-constant q(λ) itself.

    λ(t) is q's inverse upper-tail CDF (piecewise linear in t), dλ/dt = −1/q(λ) on each bin. It has no
    trainable parameters: training updates its LossHistogram (objective `adaptive`), and it starts uniform.
    """

    name = "adaptive_binned"

    def __init__(self, bins: int = 100, decay: float = 0.99, floor: float = 0.02,
                 logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        super().__init__()
        lo, hi = check_logsnr_window(logsnr_min, logsnr_max)
        bins = check_count("bins", bins, 2, 100_000)
        decay, floor = check_finite("decay", decay), check_finite("floor", floor)
        if not 0 < decay < 1 or not 0 < floor < 1:
            raise UsageError("adaptive_binned needs 0 < decay < 1 and 0 < floor < 1")
        self.logsnr_min, self.logsnr_max, self.floor = lo, hi, floor
        self.histogram = LossHistogram(lo, hi, int(bins), decay, floor)

    def params(self) -> dict:
        return {"bins": len(self.histogram.value), "decay": self.histogram.decay, "floor": self.floor}

    def _bin_density(self, logsnr: torch.Tensor) -> torch.Tensor:
        h = self.histogram
        width = (self.logsnr_max - self.logsnr_min) / len(h.value)
        idx = ((logsnr.double() - self.logsnr_min) / width).long().clamp(0, len(h.value) - 1)
        return h.target_density()[idx]

    def logsnr_and_slope(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """λ(t) and dλ/dt = −1/q(λ(t))."""
        t = torch.as_tensor(t, device=self.histogram.value.device)
        lam = self.histogram.target_logsnr(t.clamp(0, 1))
        return lam, (-1.0 / self._bin_density(lam)).to(lam.dtype)

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        return self.logsnr_and_slope(t)[0]

    def t_of(self, logsnr: torch.Tensor) -> torch.Tensor:
        """t(λ) = mass of q above λ."""
        h = self.histogram
        mass = h.target_density() * (h.edges[1] - h.edges[0])
        upper = torch.cat([mass.flip(0).cumsum(0).flip(0), mass.new_zeros(1)])
        upper = upper / upper[0]
        lam = torch.as_tensor(logsnr, device=h.value.device)
        return interp(lam.double(), h.edges, upper).to(lam.dtype if lam.is_floating_point() else torch.float64)

    def log_density(self, logsnr: torch.Tensor) -> torch.Tensor:
        lam = torch.as_tensor(logsnr, device=self.histogram.value.device)
        inside = (lam >= self.logsnr_min) & (lam <= self.logsnr_max)
        log_q = torch.log(self._bin_density(lam)).to(lam.dtype)
        return torch.where(inside, log_q, torch.full_like(log_q, -float("inf")))

    def density(self, logsnr: torch.Tensor) -> torch.Tensor:
        return self.log_density(logsnr).exp()

    def sample(self, n: int, generator=None, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n draws λ ~ q(λ) by inverse transform."""
        return sample_by_inverse_transform(self, n, generator, device, dtype)
