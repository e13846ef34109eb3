"""Sample from a finished (or checkpointed) run directory using its EMA snapshot; write .npz or .png."""
from __future__ import annotations

import dataclasses
import math
import zipfile
from pathlib import Path

import numpy as np
import torch

from adaptive_sched import checkpoint, config as cfg
from adaptive_sched.atomic import atomic_open
from adaptive_sched.conditioning import balanced_labels, check_guidance
from adaptive_sched.errors import UsageError
from adaptive_sched.generate import generate, sampling_grid
from adaptive_sched.models import build_model, params_for_weights
from adaptive_sched.out_paths import replaceable
from adaptive_sched.run_checks import check_image_options
from adaptive_sched.run_build import resolve_device


def load_snapshot(run_dir: str | Path, device: torch.device):
    """(config, EMA model, snapshot) from RUN_DIR/ema.pt, loaded without running code."""
    snap = checkpoint.load_ema_snapshot(run_dir)
    config = cfg.from_dict(cfg.with_defaults(snap["config"]))    # an older run: the keys it lacks as it ran
    if "model_params" in snap:                     # the constructor's arguments as they were, defaults included
        name, params = snap["model_name"], snap["model_params"]
    else:
        name, params = config.model.name, params_for_weights(config.model.name, config.model.params, snap["model"])
    model = build_model(name, tuple(snap["data_shape"]), snap.get("num_classes", 0), **params)
    model.load_state_dict(snap["model"])
    return config, model.to(device).eval(), snap


def sample_labels(label: str | None, n: int, num_classes: int) -> torch.Tensor | None:
    """--class: "all" (default; balanced over the classes), "none" (the unconditional branch), or one class K."""
    if num_classes == 0:
        if label not in (None, "none"):
            raise UsageError("--class needs a class-conditional run (trained with [train] conditional = true)")
        return None
    if label in (None, "all"):
        return balanced_labels(n, num_classes)
    if label == "none":
        return None
    if not label.isdigit() or not 0 <= int(label) < num_classes:
        raise UsageError(f"--class must be all, none or a class in 0..{num_classes - 1}, got {label!r}")
    return torch.full((n,), int(label), dtype=torch.long)


def per_class_grids(run_dir, labels: torch.Tensor | None, steps: int, lo: float, hi: float) -> dict:
    """{class: its own λ grid} from the run's class-conditional schedule (`--grid per-class`)."""
    from adaptive_sched.export import load_run_schedule
    from adaptive_sched.grids import class_grid
    config, schedule, _ = load_run_schedule(run_dir)
    if labels is None or getattr(schedule, "num_classes", 0) == 0 or config.learned.condition != "class":
        raise UsageError("--grid per-class needs a run whose schedule is conditioned on the class "
                         "([learned] condition = \"class\") and class labels to sample")
    return {k: class_grid(schedule, k, steps, lo, hi) for k in torch.unique(labels).tolist()}


def is_samples(path: Path) -> bool:
    """Whether `path` holds an earlier `sample` output: an .npz with x and sampler, or a PNG picture."""
    try:
        if path.suffix == ".png":
            with open(path, "rb") as handle:
                return handle.read(8) == b"\x89PNG\r\n\x1a\n"
        with np.load(path, allow_pickle=False) as f:
            return {"x", "sampler"} <= set(getattr(f, "files", ()))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False


def available_memory() -> int | None:
    """Bytes of memory the host can still give (MemAvailable of /proc/meminfo), or None where that is unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(n: int, shape: tuple[int, ...], labelled: bool) -> None:
    """UsageError when n samples of `shape` (float32, plus int64 labels) would not fit in the memory available: they
    are held whole until written, so a too large --n would sample for hours and then die."""
    need, free = n * (4 * math.prod(shape) + 8 * labelled), available_memory()
    if free is not None and need > free:
        raise UsageError(f"--n {n}: the samples would take {need / 2 ** 30:.3g} GiB, more than the "
                         f"{free / 2 ** 30:.3g} GiB of memory available; sample fewer (several files, each its "
                         f"own --seed)")


def sample_run(run_dir: str | Path, n: int, out: str | Path, sampler: str | None = None, steps: int | None = None,
               grid: str | None = None, seed: int = 0, device: str = "auto", label: str | None = None,
               guidance: float | None = None, clip_x0: bool | None = None) -> Path:
    """Draw n samples and write them to `out` (.npz with x and the sampler settings, or a .png picture).
    clip_x0 (default: the run's [eval] clip_x0) clamps x̂0 to [-1, 1] at every sampler step.

    A class-conditional run samples balanced classes (label "all"), one class, or unconditionally ("none"), at
    guidance scale w (default: the run's first [eval] guidance); grid "per-class" samples each class on its own
    schedule's grid."""
    out = Path(out)
    if not 0 <= seed < 2 ** 63:
        raise UsageError(f"--seed must be in 0..2^63-1, got {seed}")
    if out.suffix not in (".npz", ".png"):
        raise UsageError(f"--out must end in .npz or .png, got {out.name}")
    replaceable(out, is_samples, "an earlier `sample` output (an .npz of samples, or a picture)")
    dev = resolve_device(device)
    config, model, snap = load_snapshot(run_dir, dev)
    check_fits(n, tuple(snap["data_shape"]), snap.get("num_classes", 0) > 0)
    sampler = sampler or config.eval.sampler
    grid_name = grid or config.eval.grid
    if steps is None and not grid_name.lower().endswith(".csv"):   # a grid file brings its own step count
        steps = config.eval.sample_steps
    classes = snap.get("num_classes", 0)
    labels = sample_labels(label, n, classes)
    if labels is None and classes:                  # --class none: the unconditional branch takes no guidance
        if config.train.p_uncond == 0:
            raise UsageError("--class none samples the unconditional branch, which this run never trained "
                             "([train] p_uncond = 0)")
        if guidance not in (None, 1.0):
            raise UsageError(f"--guidance {guidance:g} guides class-conditional samples, not --class none")
        guidance = 1.0
    w = config.eval.guidance[0] if guidance is None else guidance
    check_guidance([w], labels is not None, config.train.p_uncond)
    lo, hi = config.eval.sample_logsnr_min, config.eval.sample_logsnr_max
    if grid_name == "per-class":
        lam_grid = per_class_grids(run_dir, labels, steps, lo, hi)
        steps = len(next(iter(lam_grid.values()))) - 1
    else:
        lam_grid = sampling_grid(grid_name, steps, lo, hi)
        steps = len(lam_grid) - 1
    clip = config.eval.clip_x0 if clip_x0 is None else clip_x0
    check_image_options(dataclasses.replace(config, eval=dataclasses.replace(config.eval, clip_x0=clip)),
                        tuple(snap["data_shape"]))
    x = generate(model, config.train.target, tuple(snap["data_shape"]), n, lam_grid, sampler, seed, dev,
                 labels=labels, guidance=w, clip_x0=clip)
    if not torch.isfinite(x).all():          # e.g. a guidance scale so large that ε̂ overflows: write nothing
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise UsageError(f"{bad} of {n} samples hold NaN or infinite values (guidance {w:g}, {sampler} {steps} "
                         f"steps); nothing was written")
    if out.suffix == ".npz":
        grids = torch.stack([lam_grid[k] for k in sorted(lam_grid)]) if isinstance(lam_grid, dict) else lam_grid
        extra = {} if labels is None else {"y": labels.numpy()}
        with atomic_open(out, "wb") as handle:
            np.savez(handle, x=x.numpy(), logsnr_grid=grids.numpy(), sampler=sampler, grid=grid_name,
                     step=snap["step"], guidance=w, clip_x0=clip, **extra)
    else:
        from adaptive_sched.plots import save_samples_png
        guided = "" if labels is None else f", guidance {w:g}"
        save_samples_png(x, out, f"{config.schedule.name}, step {snap['step']}, {sampler} {steps} steps "
                                 f"on {grid_name} grid{guided}")
    return out
