"""Sampling from a trained denoiser: the λ-grid (a separate choice from the training schedule) and batching."""
from __future__ import annotations

import contextlib

import torch

from adaptive_sched import samplers, schedules
from adaptive_sched.conditioning import guided_prediction
from adaptive_sched.diffusion import to_x0_eps
from adaptive_sched.errors import UsageError
from adaptive_sched.models import num_classes_of


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


def full_precision(device: torch.device | str):
    """The model in float32 whatever the caller's context: autocast off. For held-out evaluations, where the
    conversion ε̂ = (x − αx̂0)/σ multiplies an x0 model's bf16 rounding (2⁻⁹) by α/σ = e^{λ/2}: 150 at λ = 10,
    770 at 13.3. (cuDNN's default TF32 convolutions stay on: they round inputs 8× finer than bf16 and keep the
    float32 sum, where the bf16 output is rounded once more; strict float32 would slow a GPU eval several-fold.)"""
    return torch.autocast(torch.device(device).type, enabled=False)


def x0_denoiser(model, target: str, y: torch.Tensor | None = None, guidance: float = 1.0, clip: bool = False):
    """Wrap a network predicting `target` as denoise(x, λ) -> x̂0 (in float32); with labels y (N,) and scale w,
    the classifier-free-guided prediction pred_u + w·(pred_c − pred_u) (adaptive_sched.conditioning).
    clip clamps x̂0 to the pixel range [-1, 1], so a sampler's ε̂ = (x − αx̂0)/σ follows the clamped x̂0
    (Ho et al. 2020's clip_denoised): an ε-prediction model's x̂0 = (x − σε̂)/α overshoots at low λ."""
    null_class = num_classes_of(model)
    if y is not None and null_class == 0:
        raise UsageError("class labels were given, but the model is unconditional (trained without [train] conditional)")

    def denoise(x: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        with autocast_for(x.device):
            pred = guided_prediction(model, x, logsnr, y, guidance, null_class)
        x0 = to_x0_eps(pred.float(), x, logsnr, target)[0]
        return x0.clamp(-1, 1) if clip else x0
    return denoise


@torch.no_grad()
def generate(model, target: str, shape: tuple[int, ...], n: int, grid: torch.Tensor, sampler: str = "ddim",
             seed: int = 0, device: torch.device | str = "cpu", batch_size: int = 1000,
             progress: bool = False, labels: torch.Tensor | None = None, guidance: float = 1.0,
             clip_x0: bool = False) -> torch.Tensor:
    """n samples of per-example `shape`, in batches, from noise seeded by `seed`; returns float32 on CPU.
    clip_x0 clamps the denoiser's x̂0 to [-1, 1] at every step (x0_denoiser's clip).

    labels (n,) int64 condition a class-conditional model (guidance scale w); None samples unconditionally.
    `grid` is one increasing λ grid, or a dict {class: grid} to sample each class on its own grid.
    """
    if n < 1:
        raise UsageError(f"number of samples must be >= 1, got {n}")
    if sampler not in samplers.names():
        raise UsageError(f"unknown sampler {sampler!r}; choose one of: {', '.join(samplers.names())}")
    if labels is not None and labels.shape != (n,):
        raise UsageError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if isinstance(grid, dict) and labels is None:
        raise UsageError("a per-class grid needs class labels")
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(seed)
    model.eval()
    out = torch.empty((n, *shape), dtype=torch.float32)     # (n, ...): filled batch by batch, never copied whole
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        x_init = torch.randn((count, *shape), generator=generator, device=device)
        y = None if labels is None else labels[start:start + count].to(device)
        if isinstance(grid, dict):                 # each class on its own grid: one sampler call per class present
            x = torch.empty_like(x_init)
            for k in torch.unique(y).tolist():
                rows = y == k
                denoise = x0_denoiser(model, target, y[rows], guidance, clip_x0)
                x[rows] = samplers.sample(sampler, denoise, x_init[rows],
                                          grid[k].to(device=device, dtype=torch.float32), progress=progress)
        else:
            denoise = x0_denoiser(model, target, y, guidance, clip_x0)
            x = samplers.sample(sampler, denoise, x_init, grid.to(device=device, dtype=torch.float32),
                                progress=progress)
        out[start:start + count] = x.cpu()
    return out
