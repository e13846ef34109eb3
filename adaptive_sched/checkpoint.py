"""Atomic checkpoint files that load without running code (torch.load(weights_only=True))."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from adaptive_sched.atomic import atomic_open
from adaptive_sched.errors import UsageError

STATE_NAME = "checkpoint.pt"          # full training state, for resume
DAMAGED_NAME = "checkpoint.damaged.pt"  # an unreadable latest, set aside when a run resumes from the previous one
PREVIOUS_NAME = "checkpoint.prev.pt"  # the one before it, the fallback if the latest is damaged
EMA_NAME = "ema.pt"                   # small EMA snapshot + config, for sampling and export


def atomic_save(obj: dict, path: str | Path) -> None:
    """torch.save, written atomically (atomic.atomic_open: temp file, fsync, os.replace)."""
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)


def load(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint written by adaptive_sched; anything else raises UsageError and runs no code."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"PK\x03\x04":              # torch.save writes a zip archive; anything else is not a checkpoint
        what = "it is empty" if not magic else "it is not the zip archive torch.save writes"
        raise UsageError(f"{path} is not a readable adaptive_sched checkpoint ({what}); pass a run directory "
                         f"or its ema.pt / checkpoint.pt")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to parse an untrusted file is the same user error
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{path} is not a readable adaptive_sched checkpoint ({first[:160]})") from None
    if not isinstance(obj, dict) or "kind" not in obj:
        raise UsageError(f"{path} is not an adaptive_sched checkpoint (no 'kind' entry)")
    return obj


def save_training_state(run_dir: str | Path, state: dict) -> None:
    """Write the full training state, keeping the previous one as the fallback."""
    run_dir = Path(run_dir)
    latest = run_dir / STATE_NAME
    if latest.exists():
        os.replace(latest, run_dir / PREVIOUS_NAME)
    atomic_save({"kind": "training_state", **state}, latest)


def load_training_state(run_dir: str | Path, map_location="cpu") -> dict | None:
    """The latest readable training state in `run_dir` (falling back to the previous one), or None; its
    "loaded_from" entry names the file it came from."""
    run_dir = Path(run_dir)
    for name in (STATE_NAME, PREVIOUS_NAME):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            return {**load(path, map_location), "loaded_from": name}
        except UsageError as err:
            warnings.warn(f"skipping damaged checkpoint: {err}", stacklevel=2)
    return None


def load_ema_snapshot(run_dir: str | Path) -> dict:
    """The EMA snapshot of a run (RUN_DIR/ema.pt, or that file itself); UsageError if missing or another kind."""
    run_dir = Path(run_dir)
    path = run_dir / EMA_NAME if run_dir.is_dir() else run_dir
    if not path.exists():
        raise UsageError(f"no EMA snapshot at {path}: train a run first (adaptive-sched train --out {run_dir})")
    snap = load(path)
    if snap.get("kind") != "ema":
        raise UsageError(f"{path} is a {snap.get('kind')!r} checkpoint, not an EMA snapshot (ema.pt)")
    missing = [k for k in ("step", "config", "model", "data_shape") if k not in snap]
    if missing or not isinstance(snap["config"], dict) or not isinstance(snap["model"], dict):
        raise UsageError(f"{path} is not a complete EMA snapshot (missing or malformed: "
                         f"{', '.join(missing) or 'config/model'})")
    return snap
