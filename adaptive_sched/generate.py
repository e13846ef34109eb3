"""Sampling from a trained denoiser: the λ-grid (a separate choice from the training schedule) and batching."""
from __future__ import annotations

import contextlib

import torch

from adaptive_sched import samplers, schedules
from adaptive_sched.diffusion import to_x0_eps
from adaptive_sched.errors import UsageError


def sampling_grid(name: str, steps: int | None, logsnr_min: float, logsnr_max: float, **params) -> torch.Tensor:
    """Increasing λ grid of steps + 1 points, λ_i = schedule.logsnr(1 − i/steps) for schedule `name`.

    Hang & Gu (2024) sample every training schedule on the cosine grid; that is the default elsewhere.
    A name ending in .csv is a grid file (`adaptive-sched sampling-grid`, read by grids.read_grid): its points
    must lie in the window, and steps must be its point count − 1, or None to take the file's own count.
    """
    if str(name).lower().endswith(".csv"):
        from adaptive_sched.grids import read_grid   # deferred: grids builds its cosine grid through here
        if params:
            raise UsageError(f"a grid file takes no parameters, got {', '.join(params)}")
        return read_grid(name, steps, logsnr_min, logsnr_max)
    if steps is None or steps < 1:
        raise UsageError(f"sampling steps must be >= 1, got {steps}")
    grid_schedule = schedules.build(name, logsnr_min=logsnr_min, logsnr_max=logsnr_max, **params)
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return grid_schedule.logsnr(t)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def x0_denoiser(model, target: str, y: torch.Tensor | None = None):
    """Wrap a network predicting `target` as denoise(x, λ) -> x̂0 (in float32)."""
    def denoise(x: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        with autocast_for(x.device):
            pred = model(x, logsnr, y)
        return to_x0_eps(pred.float(), x, logsnr, target)[0]
    return denoise


@torch.no_grad()
def generate(model, target: str, shape: tuple[int, ...], n: int, grid: torch.Tensor, sampler: str = "ddim",
             seed: int = 0, device: torch.device | str = "cpu", batch_size: int = 1000,
             progress: bool = False) -> torch.Tensor:
    """n samples of per-example `shape`, in batches, from noise seeded by `seed`; returns float32 on CPU."""
    if n < 1:
        raise UsageError(f"number of samples must be >= 1, got {n}")
    if sampler not in samplers.names():
        raise UsageError(f"unknown sampler {sampler!r}; choose one of: {', '.join(samplers.names())}")
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(seed)
    model.eval()
    out = []
    denoise = x0_denoiser(model, target)
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        x_init = torch.randn((count, *shape), generator=generator, device=device)
        out.append(samplers.sample(sampler, denoise, x_init, grid.to(device=device, dtype=torch.float32),
                                   progress=progress).cpu())
    return torch.cat(out)
