"""`adaptive-sched export RUN_DIR --out FILE`: a run's training schedule as a table other code can load.

CSV: columns t, logsnr, density, alpha, sigma at N points (endpoints included), reloadable with
schedules.build("table", path=FILE), plus a JSON sidecar FILE.json with the provenance. JSON: the same
columns as arrays with the provenance. Either can carry a diffusers-style `alphas_cumprod` for K
discrete steps: alphas_cumprod[i] = sigmoid(λ((i + 1)/K)), i = 0..K−1 (index 0 the least noisy).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from adaptive_sched import checkpoint, config as cfg, schedules
from adaptive_sched.diffusion import alpha_sigma
from adaptive_sched.errors import UsageError
from adaptive_sched.schedules.table import write_table


def load_run_schedule(run_dir: str | Path):
    """(config, schedule, snapshot) of a run, with a learned schedule's trained state restored."""
    snap = checkpoint.load_ema_snapshot(run_dir)
    config = cfg.from_dict(snap["config"])
    s = config.schedule
    params = dict(s.params)
    if s.name == "learned":
        params["init"] = "none"           # the trained weights replace the init fit
    schedule = schedules.build(s.name, logsnr_min=s.logsnr_min, logsnr_max=s.logsnr_max, **params)
    if "schedule" in snap:
        schedule.load_state_dict(snap["schedule"])
    return config, schedule, snap


def schedule_columns(schedule, points: int) -> dict[str, np.ndarray]:
    """t, λ(t), p(λ(t)) at `points` evenly spaced t in [0, 1]."""
    if points < 2:
        raise UsageError(f"--points must be >= 2, got {points}")
    t = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    with torch.no_grad():
        lam = schedule.logsnr(t)
        density = schedule.density(lam)
    return {"t": t.numpy(), "logsnr": lam.numpy(), "density": density.numpy()}


def alphas_cumprod(schedule, steps: int) -> np.ndarray:
    """ᾱ_i = sigmoid(λ((i + 1)/K)) for i = 0..K−1: DDPM's discrete cumulative products, least noisy first."""
    if steps < 1:
        raise UsageError(f"--alphas-cumprod must be >= 1, got {steps}")
    t = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    with torch.no_grad():
        return torch.sigmoid(schedule.logsnr(t)).numpy()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def export(run_dir: str | Path, out: str | Path, points: int = 1001, fmt: str | None = None,
           discrete_steps: int | None = None) -> Path:
    """Write the run's schedule to `out` (.csv + .json sidecar, or .json); return the path."""
    out = Path(out)
    fmt = fmt or ("json" if out.suffix == ".json" else "csv")
    if fmt not in ("csv", "json"):
        raise UsageError(f"unknown format {fmt!r}; use csv or json")
    if not out.parent.exists():
        raise UsageError(f"output folder does not exist: {out.parent}")
    config, schedule, snap = load_run_schedule(run_dir)
    columns = schedule_columns(schedule, points)
    meta = {"schedule": config.schedule.name, "params": config.schedule.params,
            "logsnr_min": config.schedule.logsnr_min, "logsnr_max": config.schedule.logsnr_max,
            "objective": config.learned.objective if config.schedule.name == "learned" else None,
            "step": int(snap["step"]), "data": config.data.name, "target": config.train.target,
            "source_run": str(Path(run_dir).resolve()), "points": points}
    if discrete_steps:
        meta["alphas_cumprod"] = alphas_cumprod(schedule, discrete_steps).tolist()
    if fmt == "csv":
        write_table(out, columns["t"], columns["logsnr"], density=columns["density"])
        _write_json(out.with_suffix(out.suffix + ".json"), meta)
    else:
        alpha, sigma = alpha_sigma(torch.from_numpy(columns["logsnr"]))
        columns.update(alpha=alpha.numpy(), sigma=sigma.numpy())
        _write_json(out, {**meta, **{k: v.tolist() for k, v in columns.items()}})
    return out
