"""Sample from a finished (or checkpointed) run directory using its EMA snapshot; write .npz or .png."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from adaptive_sched import checkpoint, config as cfg
from adaptive_sched.errors import UsageError
from adaptive_sched.generate import generate, sampling_grid
from adaptive_sched.models import build_model
from adaptive_sched.train import resolve_device


def load_snapshot(run_dir: str | Path, device: torch.device):
    """(config, EMA model, snapshot) from RUN_DIR/ema.pt, loaded without running code."""
    snap = checkpoint.load_ema_snapshot(run_dir)
    config = cfg.from_dict(snap["config"])
    model = build_model(config.model.name, tuple(snap["data_shape"]), **config.model.params)
    model.load_state_dict(snap["model"])
    return config, model.to(device).eval(), snap


def sample_run(run_dir: str | Path, n: int, out: str | Path, sampler: str | None = None, steps: int | None = None,
               grid: str | None = None, seed: int = 0, device: str = "auto") -> Path:
    """Draw n samples and write them to `out` (.npz with x and the sampler settings, or a .png picture)."""
    out = Path(out)
    if not 0 <= seed < 2 ** 63:
        raise UsageError(f"--seed must be in 0..2^63-1, got {seed}")
    if out.suffix not in (".npz", ".png"):
        raise UsageError(f"--out must end in .npz or .png, got {out.name}")
    if not out.parent.exists():
        raise UsageError(f"output folder does not exist: {out.parent}")
    dev = resolve_device(device)
    config, model, snap = load_snapshot(run_dir, dev)
    sampler = sampler or config.eval.sampler
    grid_name = grid or config.eval.grid
    if steps is None and not grid_name.lower().endswith(".csv"):   # a grid file brings its own step count
        steps = config.eval.sample_steps
    lam_grid = sampling_grid(grid_name, steps, config.eval.sample_logsnr_min, config.eval.sample_logsnr_max)
    steps = len(lam_grid) - 1
    x = generate(model, config.train.target, tuple(snap["data_shape"]), n, lam_grid, sampler, seed, dev)
    if out.suffix == ".npz":
        tmp = out.with_name(out.stem + ".tmp.npz")
        np.savez(tmp, x=x.numpy(), logsnr_grid=lam_grid.numpy(), sampler=sampler, grid=grid_name, step=snap["step"])
        tmp.replace(out)
    else:
        from adaptive_sched.plots import save_samples_png
        save_samples_png(x, out, f"{config.schedule.name}, step {snap['step']}, {sampler} {steps} steps "
                                 f"on {grid_name} grid")
    return out
