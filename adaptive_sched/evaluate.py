"""Held-out evaluation on a fixed λ grid, the same for every training schedule.

eval_eps_mse = mean over the grid λ_1..λ_K of E‖ε̂(x_λ, λ) − ε‖²/D on held-out data with fixed noise: a
schedule-independent measure of denoising quality (uniform weight in λ over the grid's range). The model runs
in float32 (generate.full_precision), as in the VLB: under bf16 an x0 model's rounding alone, times α/σ, would
read as error at high λ.
For gmm, the exact denoiser's ε-MSE on the same draws gives eval_excess_mse = model − exact ≥ 0 in expectation.
"""
from __future__ import annotations

import torch

from adaptive_sched.diffusion import add_noise, to_x0_eps
from adaptive_sched.generate import full_precision


def eval_grid(lo: float, hi: float, points: int) -> torch.Tensor:
    """The fixed λ grid of held-out evaluation: `points` values evenly spaced in [lo, hi]."""
    return torch.linspace(lo, hi, points, dtype=torch.float64)


@torch.no_grad()
def loss_profile(model, target: str, x0: torch.Tensor, y: torch.Tensor | None, grid: torch.Tensor,
                 oracle=None, seed: int = 12345, batch_size: int = 1000) -> dict[str, torch.Tensor]:
    """Per-λ held-out ε-MSE of `model` (and of the exact `oracle` denoiser when given), each (K,)."""
    model.eval()
    device = x0.device
    generator = torch.Generator(device).manual_seed(seed)
    model_mse = torch.zeros(len(grid), dtype=torch.float64)
    oracle_mse = torch.zeros(len(grid), dtype=torch.float64)
    for k, lam_value in enumerate(grid.tolist()):
        total, total_oracle = torch.zeros((), device=device), torch.zeros((), device=device)
        for start in range(0, x0.shape[0], batch_size):
            batch = x0[start:start + batch_size]
            labels = None if y is None else y[start:start + batch_size]
            lam = torch.full((batch.shape[0],), lam_value, device=device)
            eps = torch.randn(batch.shape, generator=generator, device=device)
            x_t = add_noise(batch, eps, lam)
            with full_precision(device):
                pred = model(x_t, lam, labels)
            eps_hat = to_x0_eps(pred.float(), x_t, lam, target)[1]
            total += (eps_hat - eps).square().sum()
            if oracle is not None:
                exact = oracle.eps_hat(x_t.double().cpu(), lam.double().cpu()).to(device)
                total_oracle += (exact - eps.double()).square().sum().float()
        model_mse[k] = total.item() / x0[0].numel() / x0.shape[0]
        oracle_mse[k] = total_oracle.item() / x0[0].numel() / x0.shape[0]
    out = {"logsnr": grid, "eps_mse": model_mse}
    if oracle is not None:
        out["oracle_eps_mse"] = oracle_mse
    return out


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1: mean over random unit directions θ of W1(θᵀa, θᵀb) (1-D W1 by sorted quantiles).

    a (N, ...) and b (M, ...) are flattened; the larger set is cut to the smaller size.
    """
    n = min(len(a), len(b))
    a, b = a[:n].reshape(n, -1).double().cpu(), b[:n].reshape(n, -1).double().cpu()
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], projections, generator=gen, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)                       # (D, P) unit directions
    pa, pb = (a @ theta).sort(dim=0).values, (b @ theta).sort(dim=0).values  # (n, P)
    return float((pa - pb).abs().mean())


def summarize(profile: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar metrics from a loss profile: eval_eps_mse, and eval_excess_mse when an oracle was used."""
    out = {"eval_eps_mse": float(profile["eps_mse"].mean())}
    if "oracle_eps_mse" in profile:
        out["eval_excess_mse"] = float((profile["eps_mse"] - profile["oracle_eps_mse"]).mean())
    return out
