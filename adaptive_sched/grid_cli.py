"""`adaptive-sched sampling-grid RUN_DIR --steps N --method M --out FILE.csv`: a sampling grid for a trained run.

Writes the increasing λ grid (N + 1 points, in the run's sampling window [eval] sample_logsnr_min..max) as
CSV with a JSON sidecar FILE.csv.json (method, steps, run, window, method settings, AYS's KLUB estimates).
Any sampler then takes it: `adaptive-sched sample RUN --grid FILE.csv`, or `grid = "FILE.csv"` in [eval].
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from adaptive_sched.errors import UsageError
from adaptive_sched.out_paths import portable_path, replaceable

if TYPE_CHECKING:
    import torch

METHODS = ("ays", "quantile", "karras", "cosine")     # grid_for_run's; torch loads only when a grid is built


def grid_for_run(run_dir: str | Path, steps: int | None, method: str, *, rho: float = 7.0, device: str = "auto",
                 seed: int = 0, ays_samples: int = 64, ays_sweeps: int = 3, ays_candidates: int = 12,
                 ays_coarse: int = 10, ays_data: int = 1000, ays_split: str = "train",
                 ays_memo: dict | None = None) -> tuple[torch.Tensor, dict]:
    """(grid, provenance) for a run: `method` in METHODS, in the run's sampling window; steps=None: the run's.

    `ays_memo`: a dict kept by the caller for this run (see grids.ays_grid), so AYS at 10 then 20 steps refines
    the 10-step stage once. AYS draws its KLUB rows from the first `ays_data` rows of split `ays_split`: "train"
    (default), or "test", the split FID and SWD score against (grid-eval folders scored before 2026-11-28 did so).
    """
    from adaptive_sched import checkpoint, config as cfg, grids
    if method not in METHODS:
        raise UsageError(f"unknown grid method {method!r}; choose one of: {', '.join(METHODS)}")
    snap = checkpoint.load_ema_snapshot(run_dir)
    config = cfg.from_dict(snap["config"])
    e = config.eval
    steps = e.sample_steps if steps is None else steps
    lo, hi = e.sample_logsnr_min, e.sample_logsnr_max
    meta = {"method": method, "steps": steps, "run_dir": portable_path(run_dir), "run_step": int(snap["step"]),
            "window": [lo, hi], "training_schedule": config.schedule.name}
    if method == "cosine":
        return grids.cosine_grid(steps, lo, hi), meta
    if method == "karras":
        return grids.karras_grid(steps, lo, hi, rho=rho), {**meta, "rho": rho}
    if method == "quantile":
        from adaptive_sched.export import load_run_schedule, trained_params
        _, schedule, snap = load_run_schedule(run_dir)
        meta.update(training_params=trained_params(config, int(snap["step"])),
                    training_window=[config.schedule.logsnr_min, config.schedule.logsnr_max],
                    **({"curriculum": config.schedule.curriculum} if config.schedule.curriculum else {}))
        from adaptive_sched.class_schedules import Marginal, num_classes
        if num_classes(schedule):                    # a conditional schedule: the quantiles of its marginal
            schedule = Marginal(schedule, snap.get("class_weights"))
            meta["training_density"] = "marginal over the schedule's conditions"
        return grids.quantile_grid(schedule, steps, lo, hi), meta
    from adaptive_sched.generate import x0_denoiser
    from adaptive_sched.models import num_classes_of
    from adaptive_sched.sample_run import load_snapshot
    from adaptive_sched.run_build import load_data, resolve_device
    dev = resolve_device(device)
    config, model, _ = load_snapshot(run_dir, dev)
    check_ays_settings({"ays_samples": ays_samples, "ays_sweeps": ays_sweeps, "ays_candidates": ays_candidates,
                        "ays_coarse": ays_coarse, "ays_data": ays_data, "ays_split": ays_split})
    data = load_data(config.data, ays_split)
    x0 = data.x[:ays_data].to(dev)                                                      # (n, ...)
    target, clip = config.train.target, config.eval.clip_x0
    conditional = {}
    if num_classes_of(model):       # a class-conditional run: each row's own label, at the guidance it samples with
        guidance = config.eval.guidance[0]
        denoise = lambda x, lam, y: x0_denoiser(model, target, y, guidance, clip)(x, lam)   # noqa: E731
        conditional = {"labels": data.y[:ays_data]}
    else:
        denoise = x0_denoiser(model, target, clip=clip)
    grid, info = grids.ays_grid(denoise, x0, steps, lo, hi, coarse_steps=ays_coarse, sweeps=ays_sweeps,
                                candidates=ays_candidates, samples=ays_samples, seed=seed, memo=ays_memo,
                                **conditional)
    if conditional:
        info.update(labels=f"each row's own ({ays_split} split)", guidance=guidance)
    return grid, {**meta, "ays": {**info, "data": config.data.name, "split": ays_split, "data_rows": len(x0),
                                  "clip_x0": clip}}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `sampling-grid` on the CLI's subparsers."""
    p = subparsers.add_parser("sampling-grid", help="write an optimised sampling λ-grid for a run "
                                                    "(ays, quantile, karras, cosine) as CSV + JSON sidecar")
    p.add_argument("run_dir")
    p.add_argument("--steps", type=int, help="sampler steps N; the grid has N + 1 points (default: the run's)")
    p.add_argument("--method", choices=list(METHODS), default="ays")
    p.add_argument("--out", required=True, help="FILE.csv (plus FILE.csv.json); an existing one only if it is a grid")
    p.add_argument("--rho", type=float, help="karras: ρ of the noise-level spacing (default 7)")
    p.add_argument("--seed", type=int, help="ays: seed of the Monte Carlo draws (default 0)")
    p.add_argument("--device", default="auto")
    add_ays_options(p)
    p.set_defaults(func=cmd_sampling_grid)
    return p


AYS_OPTIONS = {"ays_samples": (64, "data rows per KLUB estimate"), "ays_sweeps": (3, "refinement sweeps per stage"),
               "ays_candidates": (12, "candidate positions per point and sweep"),
               "ays_coarse": (10, "steps of the first (coarse) stage"),
               "ays_data": (1000, "examples of --ays-split to draw the rows from"),
               "ays_split": ("train", "the split the rows come from: train, or test (the split FID and SWD score "
                                      "against)")}
AYS_SPLITS = ("train", "test")
LEGACY_AYS_SPLIT = "test"     # what AYS rows scored before --ays-split (2026-11-28) drew from
AYS_LABELS = "own"            # a class-conditional run's AYS: each KLUB row's own label at [eval] guidance[0]
LEGACY_AYS_LABELS = "null"    # what such AYS fitted on before 2026-11-28 (recorded without a split): the null class
AYS_DEFAULTS = {key: default for key, (default, _) in AYS_OPTIONS.items()}


def ays_flag(key: str) -> str:
    """The command-line flag of an ays_* setting: ays_samples -> --ays-samples."""
    return "--" + key.replace("_", "-")


def add_ays_options(p: argparse.ArgumentParser) -> None:
    """--ays-samples, --ays-sweeps, --ays-candidates, --ays-coarse, --ays-data, --ays-split (grid_for_run's ays_*
    settings)."""
    for key, (default, text) in AYS_OPTIONS.items():
        kind = {"choices": AYS_SPLITS} if key == "ays_split" else {"type": int}
        p.add_argument(ays_flag(key), **kind, help=f"ays: {text} (default {default})")


def check_ays_settings(settings: dict) -> None:
    """UsageError unless every ays_* setting is an integer >= 1 (sweeps >= 0), the split train or test."""
    for key, value in settings.items():
        if key == "ays_split":
            if value not in AYS_SPLITS:
                raise UsageError(f"--ays-split must be one of {', '.join(AYS_SPLITS)}, got {value!r}")
            continue
        low = 0 if key == "ays_sweeps" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{ays_flag(key)} must be an integer >= {low}, got {value!r}")


def ays_settings(args: argparse.Namespace) -> dict:
    """The ays_* keyword arguments of grid_for_run that the command line gave (add_ays_options)."""
    return {key: getattr(args, key) for key in AYS_DEFAULTS if getattr(args, key) is not None}


def refuse_unused(options: dict, methods: str | list[str], uses: str) -> None:
    """UsageError when options (flag -> value, None when not given) were given but `uses` is not among the
    method(s) asked for."""
    given = [flag for flag, value in options.items() if value is not None]
    methods = [methods] if isinstance(methods, str) else methods
    if given and uses not in methods:
        raise UsageError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to {uses} grids, "
                         f"not {', '.join(methods)}")


def cmd_sampling_grid(args) -> int:
    """Build the grid for args.run_dir and write it to args.out."""
    from adaptive_sched import grids
    out = Path(args.out)
    if out.suffix.lower() != ".csv":
        raise UsageError(f"--out must end in .csv, got {out.name}")
    ays = ays_settings(args)
    refuse_unused({"--rho": args.rho}, args.method, "karras")
    refuse_unused({"--seed": args.seed, **{ays_flag(k): v for k, v in ays.items()}}, args.method, "ays")
    replaceable(out, grids.is_grid_file, "a grid written by `adaptive-sched sampling-grid`")
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        raise UsageError(f"--seed must be in 0..2^63-1, got {args.seed}")
    given = {key: value for key, value in (("rho", args.rho), ("seed", args.seed)) if value is not None}
    grid, meta = grid_for_run(args.run_dir, args.steps, args.method, device=args.device, **given, **ays)
    path = grids.write_grid(out, grid, meta)
    shown = ", ".join(f"{v:.4g}" for v in grid.tolist())
    extra = f"; KLUB {meta['ays']['klub_final']:.4g} (cosine {meta['ays']['klub_cosine']:.4g})" if "ays" in meta else ""
    print(f"wrote {path}: {args.method} grid, {len(grid) - 1} steps: [{shown}]{extra}")
    return 0
