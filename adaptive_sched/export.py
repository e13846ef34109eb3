"""`adaptive-sched export RUN_DIR --out FILE`: a run's training schedule as a table other code can load.

CSV: columns t, logsnr, density, alpha, sigma at N points (endpoints included), reloadable with
schedules.build("table", path=FILE), plus a JSON sidecar FILE.json with the provenance. JSON: the same
columns as arrays with the provenance. Either can carry a diffusers-style `alphas_cumprod` for K
discrete steps: alphas_cumprod[i] = sigmoid(λ((i + 1)/K)), i = 0..K−1 (index 0 the least noisy).

A class-conditional run (its schedule has num_classes = C > 0) exports the marginal Σ_k w_k p(λ | k) as
FILE.csv (a plain table), each class as FILE.class<k>.csv (plain tables), and all of them as the long-format
multi-class table FILE.classes.csv (reloads with `table` as a C-class schedule); the JSON sidecar lists the
files and the class weights w. The JSON format carries the marginal's columns plus a `classes` list of
per-class columns.

An existing FILE is replaced only when it is an earlier export (anything else is refused), and the files of that
export this one does not rewrite (its sidecar, its class tables) are removed, so none is left disagreeing with it.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from adaptive_sched import checkpoint, config as cfg, curriculum, schedules
from adaptive_sched.atomic import atomic_write_json
from adaptive_sched.class_schedules import class_medians, class_weights, marginal_columns, median_spread, num_classes
from adaptive_sched.diffusion import alpha_sigma
from adaptive_sched.errors import UsageError
from adaptive_sched.out_paths import portable_path, read_json_dict, replaceable, sidecar_path
from adaptive_sched.schedules.table import Table, check_table_source, write_class_table, write_table


def load_run_schedule(run_dir: str | Path):
    """(config, schedule, snapshot) of a run, with a learned schedule's trained state restored.

    A snapshot with schedule_num_classes = C > 0 rebuilds a learned schedule with num_classes=C; the rebuilt
    schedule must have C classes (a table run's C comes from its file when the snapshot does not say). A table run
    whose snapshot records its file's sha256 (table_source) is refused once that file has changed or is gone.
    """
    snap = checkpoint.load_ema_snapshot(run_dir)
    config = cfg.from_dict(snap["config"])
    s = config.schedule
    params = trained_params(config, int(snap["step"]))
    classes = snap.get("schedule_num_classes", 0)
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 0:
        raise UsageError(f"{run_dir}: the snapshot's schedule_num_classes must be a whole number >= 0, got {classes!r}")
    if s.name == "learned":
        params["init"] = "none"           # the trained weights replace the init fit
        if classes:
            params["num_classes"] = classes
    recorded = snap.get("table_source")
    remedy = "restore the file the run trained on to use its schedule"
    if recorded and not Path(recorded["path"]).is_file():
        where = "" if Path(recorded["path"]).is_absolute() else " (the path is relative to where the run trained)"
        raise UsageError(f"{run_dir}: the run trained on table {recorded['path']} (sha256 "
                         f"{recorded['sha256'][:12]}...), which is gone{where}; {remedy}")
    schedule = schedules.build(s.name, logsnr_min=s.logsnr_min, logsnr_max=s.logsnr_max, **params)
    check_table_source(recorded, schedule, str(run_dir), remedy)
    if "schedule" in snap:
        schedule.load_state_dict(snap["schedule"])
    if classes and num_classes(schedule) != classes:
        raise UsageError(f"{run_dir}: the snapshot's schedule has {classes} classes but the rebuilt "
                         f"{s.name} schedule has {num_classes(schedule)}")
    return config, schedule, snap


def trained_params(config: cfg.RunConfig, step: int) -> dict:
    """The schedule's parameters at the last of `step` steps trained: with a curriculum, its ramped values there,
    as metrics.csv logs them (schedule_<param> at that step)."""
    ramps = curriculum.parse(config.schedule.curriculum)
    return {**config.schedule.params, **curriculum.values_at(ramps, max(step - 1, 0), config.train.steps)}


def run_class_weights(snap: dict, classes: int) -> np.ndarray:
    """The run's class weights w (C,), normalised: snap["class_weights"] when present, else uniform."""
    return class_weights(classes, snap.get("class_weights"))


def schedule_columns(schedule, points: int, y: int | None = None) -> dict[str, np.ndarray]:
    """t, λ(t), p(λ(t)) at `points` evenly spaced t in [0, 1] (of class y for a conditional schedule)."""
    if points < 2:
        raise UsageError(f"--points must be >= 2, got {points}")
    args = () if y is None else (y,)
    t = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    with torch.no_grad():
        lam = schedule.logsnr(t, *args)
        density = schedule.density(lam, *args)
    if not bool((lam[1:] < lam[:-1]).all()):      # a step function (polynomial with levels) has no (t, λ) table
        flat = float(t[1:][lam[1:] >= lam[:-1]][0])
        raise UsageError(f"the {getattr(schedule, 'name', 'run')} schedule's λ(t) is not strictly decreasing "
                         f"(flat at t = {flat:.6g} of {points} points), so it has no (t, logsnr) table: a discrete "
                         f"schedule (polynomial with levels) cannot be exported; use fewer --points if λ(t) only "
                         f"flattens in float64 rounding")
    return {"t": t.numpy(), "logsnr": lam.numpy(), "density": density.numpy()}


def alphas_cumprod(schedule, steps: int, y: int | None = None) -> np.ndarray:
    """ᾱ_i = sigmoid(λ((i + 1)/K)) for i = 0..K−1: DDPM's discrete cumulative products, least noisy first."""
    if steps < 1:
        raise UsageError(f"--alphas-cumprod must be >= 1, got {steps}")
    t = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    with torch.no_grad():
        return torch.sigmoid(schedule.logsnr(t, *(() if y is None else (y,)))).numpy()


def class_path(out: Path, k: int | None = None) -> Path:
    """FILE.class<k>.csv beside FILE.csv; k = None gives FILE.classes.csv, the long-format multi-class table."""
    return out.with_name(f"{out.stem}.{'classes' if k is None else f'class{k}'}{out.suffix}")


def export(run_dir: str | Path, out: str | Path, points: int = 1001, fmt: str | None = None,
           discrete_steps: int | None = None) -> Path:
    """Write the run's schedule to `out` (.csv + .json sidecar, or .json); return the path."""
    out = Path(out)
    fmt = fmt or ("json" if out.suffix == ".json" else "csv")
    if fmt not in ("csv", "json"):
        raise UsageError(f"unknown format {fmt!r}; use csv or json")
    replaceable(out, is_export, "an earlier export")
    owned = earlier_companions(out)
    config, schedule, snap = load_run_schedule(run_dir)
    classes = num_classes(schedule)
    meta = {"schedule": config.schedule.name, "params": trained_params(config, int(snap["step"])),
            **({"curriculum": config.schedule.curriculum} if config.schedule.curriculum else {}),
            "logsnr_min": config.schedule.logsnr_min, "logsnr_max": config.schedule.logsnr_max,
            "objective": config.learned.objective if config.schedule.name == "learned" else None,
            "step": int(snap["step"]), "data": config.data.name, "target": config.train.target,
            "source_run": portable_path(run_dir), "points": points}
    if not classes:
        columns = schedule_columns(schedule, points)
        if discrete_steps is not None:
            meta["alphas_cumprod"] = alphas_cumprod(schedule, discrete_steps).tolist()
    else:
        weights = run_class_weights(snap, classes)
        columns = marginal_columns(schedule, points, weights)
        per_class = [schedule_columns(schedule, points, k) for k in range(classes)]
        medians = class_medians(schedule)
        meta.update(num_classes=classes, class_weights=weights.tolist(), class_medians=medians.tolist(),
                    median_spread=median_spread(medians), marginal="sum_k w_k p(logsnr | k)")
        if discrete_steps is not None:
            meta["alphas_cumprod"] = alphas_cumprod(Table(t=columns["t"], logsnr=columns["logsnr"]),
                                                    discrete_steps).tolist()
            meta["alphas_cumprod_per_class"] = [alphas_cumprod(schedule, discrete_steps, k).tolist()
                                                for k in range(classes)]
    companions = [] if fmt == "json" else [sidecar_path(out)] + (
        [class_path(out, k) for k in range(classes)] + [class_path(out)] if classes else [])
    for path in companions:
        if path.exists() and path not in owned:
            raise UsageError(f"{path} already exists and is not part of an earlier export to {out}: remove it or "
                             f"choose another --out")
    if fmt == "csv":
        write_table(out, columns["t"], columns["logsnr"], density=columns["density"])
        if classes:
            for k, col in enumerate(per_class):
                write_table(class_path(out, k), col["t"], col["logsnr"], density=col["density"])
            tables = {k: (c["t"], c["logsnr"], c["density"]) for k, c in enumerate(per_class)}
            write_class_table(class_path(out), {**tables, "all": (columns["t"], columns["logsnr"],
                                                                        columns["density"])})
            meta["files"] = {"marginal": out.name, "classes": [class_path(out, k).name for k in range(classes)],
                             "class_table": class_path(out).name}
        atomic_write_json(sidecar_path(out), meta)
    else:
        data = {**meta, **_with_alpha_sigma(columns)}
        if classes:
            data["classes"] = [_with_alpha_sigma(col) for col in per_class]
        atomic_write_json(out, data)
    for path in owned - set(companions):           # an earlier export's files this one does not replace
        path.unlink(missing_ok=True)
    return out


def is_export(path: Path) -> bool:
    """Whether `path` holds an earlier export: a table whose sidecar names its source run, or an export's JSON (the
    columns with the provenance; a sidecar alone is not one)."""
    data = read_json_dict(path) or {}
    return "source_run" in (read_json_dict(sidecar_path(path)) or {}) or {"source_run", "logsnr"} <= set(data)


def earlier_companions(out: Path) -> set[Path]:
    """The files an earlier CSV export to `out` wrote beside it: its sidecar and the class tables the sidecar lists
    (a conditional run's FILE.class<k>.csv and FILE.classes.csv)."""
    meta = read_json_dict(sidecar_path(out))
    if meta is None or "source_run" not in meta:
        return set()
    files = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    listed = files.get("classes") if isinstance(files.get("classes"), list) else []
    ours = re.compile(re.escape(out.stem) + r"\.class(es|\d+)" + re.escape(out.suffix))   # (class_path's names only)
    return {sidecar_path(out)} | {out.with_name(name) for name in [*listed, files.get("class_table")]
                                  if isinstance(name, str) and ours.fullmatch(name)}


def _with_alpha_sigma(columns: dict[str, np.ndarray]) -> dict[str, list]:
    """The columns plus alpha, sigma of their logsnr, as lists for JSON."""
    alpha, sigma = alpha_sigma(torch.from_numpy(columns["logsnr"]))
    return {k: v.tolist() for k, v in {**columns, "alpha": alpha.numpy(), "sigma": sigma.numpy()}.items()}
