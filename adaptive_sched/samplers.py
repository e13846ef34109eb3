"""Deterministic samplers of the VP probability-flow ODE over an increasing logSNR grid.

Every sampler has the signature `(denoise, x_init, logsnr_grid, progress=False) -> x̂0`:
  denoise(x, λ_vec) returns x̂0 = E[x0 | x_λ = x] with λ_vec (N,) filled with the current λ;
  logsnr_grid is 1-D, strictly increasing λ_0 < … < λ_n (noisiest first); x_init ~ N(0, I) at λ_0;
  the result is denoise(x_n, λ_n), the clean estimate at the grid's last (least noisy) point.
Samplers know nothing of how the grid was made (fixed schedule, learned schedule, hand-written).
With ε̂ = (x − αx̂0)/σ, y = x/α and s = σ/α = e^{−λ/2}, the probability-flow ODE is dy/ds = ε̂(y, s).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from adaptive_sched.diffusion import alpha_sigma
from adaptive_sched.errors import UsageError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_grid(logsnr_grid: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """Return the grid as a tensor (in `like`'s dtype/device); UsageError unless 1-D, ≥ 2 points, finite,
    strictly increasing."""
    grid = torch.as_tensor(logsnr_grid)
    if like is not None:
        grid = grid.to(device=like.device, dtype=like.dtype)
    elif not grid.is_floating_point():
        grid = grid.to(torch.get_default_dtype())
    if grid.ndim != 1 or grid.numel() < 2:
        raise UsageError(f"logsnr_grid must be 1-D with at least 2 points; got shape {tuple(grid.shape)}")
    if not torch.isfinite(grid).all():
        raise UsageError("logsnr_grid must be finite")
    if not (grid[1:] > grid[:-1]).all():
        raise UsageError("logsnr_grid must be strictly increasing (noisiest first, λ_0 < λ_1 < … < λ_n)"
                         + ("" if like is None else f" in {like.dtype}"))
    return grid


def _setup(x_init: torch.Tensor, logsnr_grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate inputs; return (x_init, grid) with the grid cast to x_init's dtype and device."""
    if not (isinstance(x_init, torch.Tensor) and x_init.is_floating_point() and x_init.ndim >= 1):
        raise UsageError("x_init must be a floating-point tensor of shape (N, ...)")
    return x_init, check_grid(logsnr_grid, like=x_init)


def _steps(n: int, progress: bool, desc: str) -> Iterable[int]:
    """range(n), wrapped in a tqdm bar when `progress`."""
    if not progress:
        return range(n)
    from tqdm.auto import tqdm  # deferred: only needed for the bar
    return tqdm(range(n), desc=desc, unit="step")


def _d(denoise: Denoiser, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """x̂0 = denoise(x, λ·1_N) for a 0-d λ tensor (no host sync)."""
    return denoise(x, lam.expand(x.shape[0]))


def ddim(denoise: Denoiser, x_init: torch.Tensor, logsnr_grid: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """DDIM, η = 0 (Song et al. 2021): x_{i+1} = α_{i+1} x̂0 + σ_{i+1} ε̂,  ε̂ = (x_i − α_i x̂0)/σ_i."""
    x, grid = _setup(x_init, logsnr_grid)
    alpha, sigma = alpha_sigma(grid)                                             # (n+1,)
    for i in _steps(len(grid) - 1, progress, "ddim"):
        x0 = _d(denoise, x, grid[i])
        eps = (x - alpha[i] * x0) / sigma[i]
        x = alpha[i + 1] * x0 + sigma[i + 1] * eps
    return _d(denoise, x, grid[-1])


def euler(denoise: Denoiser, x_init: torch.Tensor, logsnr_grid: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """Euler on dy/ds = ε̂ (Karras et al. 2022), y = x/α, s = e^{−λ/2}: y_{i+1} = y_i + (s_{i+1} − s_i) ε̂_i.

    Since ε̂_i = (y_i − x̂0)/s_i this is y_{i+1} = x̂0 + s_{i+1} ε̂_i, i.e. exactly DDIM (η = 0) in exact
    arithmetic; it differs from `ddim` only by rounding (y and s reach e^{−λ_0/2} at the noisy end).
    """
    x, grid = _setup(x_init, logsnr_grid)
    alpha, _ = alpha_sigma(grid)
    s = torch.exp(-grid / 2)                                                     # σ/α, (n+1,)
    y = x / alpha[0]
    for i in _steps(len(grid) - 1, progress, "euler"):
        x0 = _d(denoise, alpha[i] * y, grid[i])
        y = y + (s[i + 1] - s[i]) * (y - x0) / s[i]
    return _d(denoise, alpha[-1] * y, grid[-1])


def heun(denoise: Denoiser, x_init: torch.Tensor, logsnr_grid: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """EDM Heun, no churn (Karras et al. 2022, Alg. 1) in y = x/α, s = e^{−λ/2}, on every step:
    d_i = (y_i − x̂0(y_i, λ_i))/s_i;  ỹ = y_i + (s_{i+1} − s_i) d_i;  d̃ = (ỹ − x̂0(ỹ, λ_{i+1}))/s_{i+1};
    y_{i+1} = y_i + (s_{i+1} − s_i)(d_i + d̃)/2.  (λ_n is finite, so the last step is corrected too.)
    Like EDM's (σ_max = 80, λ ≥ −8.8) it wants a window that starts near there: the corrector weighs the change of
    x̂0 over a step by ~s_i/2, so from λ = −20 (s = 22,026) a first step of ×3,500 in s turns float32 rounding and
    the denoiser's small errors into O(10) errors; the default sample window starts at −10 (s = 148).
    """
    x, grid = _setup(x_init, logsnr_grid)
    alpha, _ = alpha_sigma(grid)
    s = torch.exp(-grid / 2)                                                     # σ/α, (n+1,)
    y = x / alpha[0]
    for i in _steps(len(grid) - 1, progress, "heun"):
        ds = s[i + 1] - s[i]
        d = (y - _d(denoise, alpha[i] * y, grid[i])) / s[i]
        y_pred = y + ds * d
        d_pred = (y_pred - _d(denoise, alpha[i + 1] * y_pred, grid[i + 1])) / s[i + 1]
        y = y + ds * (d + d_pred) / 2
    return _d(denoise, alpha[-1] * y, grid[-1])


def dpmpp_2m(denoise: Denoiser, x_init: torch.Tensor, logsnr_grid: torch.Tensor,
             progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), their λ = log(α/σ) = our λ/2, so h_i = (λ_{i+1} − λ_i)/2:
    x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1}(e^{−h_i} − 1) D_i,  D_0 = x̂0_0,
    D_i = (1 + 1/(2r_i)) x̂0_i − x̂0_{i−1}/(2r_i),  r_i = h_{i−1}/h_i  (i ≥ 1).
    """
    x, grid = _setup(x_init, logsnr_grid)
    alpha, sigma = alpha_sigma(grid)
    h = (grid[1:] - grid[:-1]) / 2                                               # (n,)
    x0_prev = None
    for i in _steps(len(grid) - 1, progress, "dpmpp-2m"):
        x0 = _d(denoise, x, grid[i])
        if x0_prev is None:
            d = x0
        else:
            c = h[i] / (2 * h[i - 1])                                            # 1/(2r)
            d = (1 + c) * x0 - c * x0_prev
        x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * torch.expm1(-h[i]) * d
        x0_prev = x0
    return _d(denoise, x, grid[-1])


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": ddim,
    "euler": euler,
    "heun": heun,
    "dpmpp-2m": dpmpp_2m,
}


def names() -> list[str]:
    """Registered sampler names (the CLI's choices)."""
    return list(SAMPLERS)


def sample(name: str, denoise: Denoiser, x_init: torch.Tensor, logsnr_grid: torch.Tensor,
           progress: bool = False) -> torch.Tensor:
    """Run sampler `name` from x_init ~ N(0, I) at λ_0 along logsnr_grid under no_grad; returns x̂0 at λ_n."""
    if name not in SAMPLERS:
        raise UsageError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    with torch.no_grad():
        return SAMPLERS[name](denoise, x_init, logsnr_grid, progress=progress)
