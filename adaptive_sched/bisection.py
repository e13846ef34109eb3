"""Inverting a monotone function by bisection (a pure function, shared by the schedules that need λ(t) or t(λ))."""
from __future__ import annotations

from typing import Callable

import torch

BISECTION_STEPS = 64          # halvings: exact to float64's resolution on any window


def bisect_decreasing(f: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor, lo: torch.Tensor,
                      hi: torch.Tensor, steps: int = BISECTION_STEPS) -> torch.Tensor:
    """x in [lo, hi] with f(x) = target, elementwise, for a decreasing f: f(mid) > target puts x right of mid."""
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        above = f(mid) > target
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)
