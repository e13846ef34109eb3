"""2-D toy distributions (checkerboard, swiss roll), each coordinate normalised to std ~ 1."""
from __future__ import annotations

import math

import torch

# Per-coordinate std of the uniform 4x4 checkerboard on [-2, 2]^2 (alternate squares): the
# marginal of each coordinate is uniform on [-2, 2], so std = 4 / sqrt(12).
_CHECKER_STD = 4.0 / math.sqrt(12.0)


def checkerboard(n: int, generator: torch.Generator) -> torch.Tensor:
    """n points uniform on the 8 "black" squares of a 4x4 checkerboard on [-2, 2]^2, divided by
    the exact per-coordinate std 4/sqrt(12) so each coordinate has std 1.  # (n, 2) float32"""
    cell = torch.randint(0, 8, (n,), generator=generator)  # which of the 8 black squares
    row = cell // 2  # 0..3
    col = 2 * (cell % 2) + (row % 2)  # alternate columns per row -> checkerboard pattern
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    pts = torch.stack([col + u[:, 0], row + u[:, 1]], dim=1) - 2.0  # in [-2, 2]^2
    return (pts / _CHECKER_STD).float()


def swissroll(n: int, generator: torch.Generator) -> torch.Tensor:
    """n points on the 2-D swiss roll (t cos t, t sin t), t ~ U[1.5pi, 4.5pi], plus N(0, 0.5^2)
    noise; centred and scaled by the population moments so each coordinate has std ~ 1."""
    t = 1.5 * math.pi * (1.0 + 2.0 * torch.rand(n, generator=generator, dtype=torch.float64))
    pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
    pts = pts + 0.5 * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    # Fixed (not data-dependent) scale and centre so train/test share one transform:
    # population mean/std of the curve above, computed once by quadrature.
    return ((pts - _ROLL_MEAN) / _ROLL_STD).float()


def _roll_moments() -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and per-coordinate std of the swiss-roll density above (fine quadrature)."""
    t = torch.linspace(1.5 * math.pi, 4.5 * math.pi, 200001, dtype=torch.float64)
    pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
    mean = pts.mean(0)
    var = ((pts - mean) ** 2).mean(0) + 0.5**2  # plus the added noise variance
    return mean, var.sqrt()


_ROLL_MEAN, _ROLL_STD = _roll_moments()
