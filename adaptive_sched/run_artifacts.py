"""What a finished run leaves beside its checkpoints, so that its results outlive the .pt files.

Runs trained on a borrowed GPU come back without checkpoints (they are too big to bring back), yet compare
must still count them as finished, plot their learned schedule and show their samples:
- finished.json      the step the run finished at (written last, atomically): the run is done;
- schedule_final.csv the trained schedule exported as a table (learned or otherwise moving schedules; a
                     conditional one adds per-class tables and FILE.classes.csv), with its .json sidecar;
- sample_grid.npz    the sample panel compare's samples.png shows, cached when first drawn;
- diverged.json      instead of finished.json, when training stopped on a streak of non-finite losses.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from adaptive_sched.atomic import atomic_open, atomic_write_json
from adaptive_sched.runlog import METRIC_COLUMNS, CsvLog

FINISHED = "finished.json"
FINAL_TABLE = "schedule_final.csv"
SAMPLE_PANEL = "sample_grid.npz"
DIVERGED = "diverged.json"


def mark_finished(run_dir: str | Path, step: int, export_schedule: bool) -> None:
    """Export the trained schedule (when it moves) and then write finished.json: {step, finished_at}."""
    run_dir = Path(run_dir)
    if export_schedule:
        from adaptive_sched.export import export
        export(run_dir, run_dir / FINAL_TABLE)
    atomic_write_json(run_dir / FINISHED, {"step": int(step),
                                           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def mark_diverged(run_dir: str | Path, step: int, streak: int) -> None:
    """diverged.json: {step, streak, diverged_at}: training stopped at `step` on `streak` non-finite losses in a row
    (compare reports such a run diverged instead of retraining it; deleting the file lets it try again)."""
    atomic_write_json(Path(run_dir) / DIVERGED, {"step": int(step), "streak": int(streak),
                                                 "diverged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def diverged_step(run_dir: str | Path) -> int | None:
    """The step at which a run's training diverged (its diverged.json), or None."""
    try:
        return int(json.loads((Path(run_dir) / DIVERGED).read_text())["step"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return 0                                    # a damaged marker still says the run diverged


def is_finished(run_dir: str | Path, steps: int) -> bool:
    """True when finished.json says the run reached `steps`; for runs older than that marker, when metrics.csv
    and the EMA snapshot both reach `steps` (a run killed between its last metrics row and its last checkpoint has
    the row, but an ema.pt from its checkpoint before: it is resumed, not reported)."""
    from adaptive_sched import checkpoint
    from adaptive_sched.errors import UsageError
    run_dir = Path(run_dir)
    marker = run_dir / FINISHED
    if marker.exists():
        try:
            return int(json.loads(marker.read_text())["step"]) >= steps
        except (ValueError, KeyError, TypeError):
            return False
    path = run_dir / "metrics.csv"
    if not path.exists() or not (run_dir / checkpoint.EMA_NAME).exists():
        return False
    rows = CsvLog(path, METRIC_COLUMNS).rows()
    if not rows or int(rows[-1]["step"]) < steps:
        return False
    try:
        return int(checkpoint.load(run_dir / checkpoint.EMA_NAME)["step"]) >= steps
    except (UsageError, KeyError, TypeError, ValueError):
        return False


def final_schedule(run_dir: str | Path):
    """(schedule, class weights or None, step) of a run's trained schedule: from ema.pt when it is there, else
    from the exported schedule_final.csv (a table, per class for a conditional schedule); None when neither is."""
    from adaptive_sched.class_schedules import num_classes
    run_dir = Path(run_dir)
    if (run_dir / "ema.pt").exists():
        from adaptive_sched.export import load_run_schedule
        _, schedule, snap = load_run_schedule(run_dir)
        return schedule, (snap.get("class_weights") if num_classes(schedule) else None), int(snap["step"])
    table = run_dir / FINAL_TABLE
    if not table.exists():
        return None
    from adaptive_sched.export import class_path
    from adaptive_sched.schedules.table import Table
    meta = json.loads(table.with_name(table.name + ".json").read_text())
    if meta.get("num_classes"):
        return Table(path=str(class_path(table))), meta["class_weights"], int(meta["step"])
    return Table(path=str(table)), None, int(meta["step"])


def cached_panel(run_dir: str | Path, n: int, draw) -> tuple[np.ndarray, str] | None:
    """The run's sample panel of n images: draw() -> (image array, title) when ema.pt exists (and cache it in
    sample_grid.npz), else the cached panel when it holds n images; None when neither."""
    run_dir = Path(run_dir)
    path = run_dir / SAMPLE_PANEL
    if (run_dir / "ema.pt").exists():
        image, title = draw()
        with atomic_open(path, "wb") as handle:
            np.savez_compressed(handle, image=np.asarray(image), title=np.array(title), n=np.array(n))
        return np.asarray(image), title
    if path.exists():
        with np.load(path) as cached:
            if int(cached["n"]) == n:
                return cached["image"], str(cached["title"])
    return None
