"""`adaptive-sched grid-eval RUN [RUN ...] --steps 5,10,20 --methods cosine,karras,quantile,ays --out DIR`.

Sample quality of each sampling-grid method at each step count, with the same trained model(s): for every run,
method and N, the grid (grid_cli.grid_for_run, written to DIR/grids/) drives the run's sampler from the same
noise, and the samples are scored like an in-training eval (eval_swd, and eval_fid / eval_kid on images with the
run's feature network). Writes DIR/grid_eval.csv (one row per run × method × steps; a rerun skips the rows it
has), DIR/grid_eval.md (mean ± 95% CI over runs) and DIR/grid_eval.png (the metric against N per method).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path

from adaptive_sched.atomic import atomic_write_json, atomic_write_text
from adaptive_sched.errors import UsageError
from adaptive_sched.out_paths import output_dir

COLUMNS = ["run", "method", "steps", "eval_swd", "eval_fid", "eval_kid"]


def parse_list(text: str, what: str, cast=str) -> list:
    """'5,10,20' → [5, 10, 20]; UsageError naming `what` on an empty or malformed list."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    try:
        values = [cast(s) for s in items]
    except ValueError:
        raise UsageError(f"--{what} must be a comma-separated list, got {text!r}") from None
    if not values:
        raise UsageError(f"--{what} is empty")
    return values


def run_slug(run_dir: Path) -> str:
    """A file-name-safe name for a run directory: its last two path parts."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", "_".join(run_dir.resolve().parts[-2:])).strip("_")


def score_run(run_dir: Path, todo: list[tuple[str, int]], out: Path, n: int | None, device: str,
              progress: bool, ays: dict) -> Iterator[dict]:
    """Rows {run, method, steps, metrics} for the (method, steps) pairs of one run, each as soon as it is scored."""
    from adaptive_sched.conditioning import eval_labels
    from adaptive_sched.data import Dataset
    from adaptive_sched.eval_features import build_evaluator
    from adaptive_sched.evaluate import sliced_wasserstein
    from adaptive_sched.generate import generate
    from adaptive_sched.grid_cli import grid_for_run
    from adaptive_sched.grids import write_grid
    from adaptive_sched.sample_run import load_snapshot
    from adaptive_sched.run_build import load_data, resolve_device
    dev = resolve_device(device)
    config, model, snap = load_snapshot(run_dir, dev)
    train_data, held_out = load_data(config.data, "train"), load_data(config.data, "test")
    n = min(n or config.eval.sample_n or config.eval.n, len(held_out))
    held_out = Dataset(held_out.name, held_out.x[:n], None if held_out.y is None else held_out.y[:n],
                       held_out.num_classes, held_out.oracle)
    scoring = dataclasses.replace(config.eval, sample_n=n)    # FID/KID against all n rows, even if the run drew none
    scorer, _ = build_evaluator(scoring, config.data, train_data, held_out, dev) if n >= 2 else (None, {})
    classes = snap.get("num_classes", 0)
    labels = eval_labels(config.eval.sample_labels, held_out.y, n, classes) if classes else None
    ays_memo = {}                                    # AYS's shared stages (10 → 20) are refined once per run
    for method, steps in todo:
        grid, meta = grid_for_run(run_dir, steps, method, device=device, ays_memo=ays_memo, **ays)
        write_grid(grid_file(out, run_dir, method, steps), grid, meta)
        x = generate(model, config.train.target, tuple(snap["data_shape"]), n, grid, config.eval.sampler, seed=777,
                     device=dev, labels=labels, guidance=config.eval.guidance[0], clip_x0=config.eval.clip_x0)
        row = {"run": str(run_dir), "method": method, "steps": steps,
               "eval_swd": sliced_wasserstein(x, held_out.x.cpu())}
        if scorer is not None:
            row.update(scorer(x.clamp(-1, 1)))
        if progress:
            print(f"{run_dir} {method} {steps} steps: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                                    if k.startswith("eval_")), flush=True)
        yield row


def grid_eval(runs: list[str | Path], steps: list[int], methods: list[str], out: str | Path, n: int | None = None,
              device: str = "auto", progress: bool = True, ays: dict | None = None) -> Path:
    """Score every run × method × steps (skipping rows already in DIR/grid_eval.csv); write the table and plot.

    `ays`: grid_cli's ays_* settings (default grid_cli.AYS_DEFAULTS; refused without an "ays" method), kept in
    DIR/grid_eval.json: a folder's rows all come from one setting, so a call with other settings into the same
    folder is refused."""
    from adaptive_sched.grid_cli import AYS_DEFAULTS, METHODS, ays_flag, check_ays_settings, refuse_unused
    from adaptive_sched.runlog import CsvLog
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UsageError(f"unknown grid method {bad[0]!r}; choose from: {', '.join(METHODS)}")
    refuse_unused({ays_flag(key): value for key, value in (ays or {}).items()}, methods, "ays")
    ays = {**AYS_DEFAULTS, **(ays or {})}
    check_ays_settings(ays)
    out = output_dir(out)
    if any(s < 1 for s in steps):
        raise UsageError(f"--steps must be >= 1, got {steps}")
    if n is not None and n < 2:
        raise UsageError(f"--n must be >= 2 samples, got {n}")
    for what, values in (("run", [str(Path(r).resolve()) for r in runs]), ("--steps", steps), ("--methods", methods)):
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            raise UsageError(f"{what} {', '.join(twice)} is given twice")
    run_dirs = [Path(r) for r in runs]
    missing = [r for r in run_dirs if not r.is_dir()]
    if missing:                                      # (rows named by this path may be another folder's runs)
        raise UsageError(f"{missing[0]}: no such run directory")
    check_same_data(run_dirs)
    scored = CsvLog(out / "grid_eval.csv", COLUMNS).rows() if (out / "grid_eval.csv").exists() else []
    done = {(r["run"], r["method"], int(r["steps"])) for r in scored}
    todos = {run_dir: [(m, s) for m in methods for s in steps if (str(run_dir), m, s) not in done]
             for run_dir in run_dirs}
    for run_dir, todo in todos.items():             # a run scored before needs no checkpoint now
        if todo and not (run_dir / "ema.pt").exists():
            raise UsageError(f"{run_dir} holds no trained run (no ema.pt)")
    check_grid_names(todos, out)
    steps_now = claim_settings(out, ays, "ays" in methods, any(r["method"] == "ays" for r in scored), n, bool(scored),
                               {run_dir: {method for method, _ in todo} for run_dir, todo in todos.items()})
    (out / "grids").mkdir(parents=True, exist_ok=True)
    log = CsvLog(out / "grid_eval.csv", COLUMNS)
    for run_dir, todo in todos.items():
        if todo:
            for i, row in enumerate(score_run(run_dir, todo, out, n, device, progress, ays)):
                log.append(row)                      # row by row: an interrupted call keeps what it scored
                if i == 0:
                    record_scored(out, run_dir, steps_now[str(run_dir)])
    report(out, [str(r) for r in run_dirs], methods, steps)
    return out


def check_same_data(run_dirs: list[Path]) -> None:
    """UsageError when the runs were trained on different data ([data] of their config.toml): grid_eval.md
    averages every cell over the runs, which would mix scores of different data sets."""
    from adaptive_sched import config as cfg
    first, settings = None, None
    for run_dir in run_dirs:
        if (run_dir / "config.toml").exists():
            data = cfg.with_defaults({"data": cfg.read_toml(run_dir / "config.toml").get("data", {})})["data"]
            data.pop("data_dir", None)                 # where the files were, not which data
            if first is None:
                first, settings = run_dir, data
            elif settings != data:
                diff = ", ".join(f"{k} {settings.get(k)!r} / {data.get(k)!r}" for k in sorted(set(settings) | set(data))
                                 if settings.get(k) != data.get(k))
                raise UsageError(f"{first} and {run_dir} were trained on different data ({diff}): a cell's mean "
                                 f"would mix them; score them into separate --out folders")


def grid_file(out: Path, run_dir: Path, method: str, steps: int) -> Path:
    """Where the grid a row was scored with is kept: DIR/grids/<run slug>_<method>_<steps>.csv."""
    return out / "grids" / f"{run_slug(run_dir)}_{method}_{steps}.csv"


def check_grid_names(todos: dict[Path, list[tuple[str, int]]], out: Path) -> None:
    """UsageError when two runs would keep their grids under one name (the slug is the path's last two parts:
    a/runs/seed0 and b/runs/seed0): two runs of this call, or a grid to score whose file DIR/grids holds for
    another run."""
    from adaptive_sched.out_paths import portable_path, sidecar_path
    slugs = {}
    for run_dir, todo in todos.items():
        other = slugs.setdefault(run_slug(run_dir), run_dir)
        if other != run_dir:
            raise UsageError(f"{other} and {run_dir} would keep their grids under one name in {out / 'grids'}; "
                             f"score them into separate --out folders")
        for method, n in todo:
            path = grid_file(out, run_dir, method, n)
            sidecar = sidecar_path(path)                                           # (grids.write_grid's)
            try:
                kept = json.loads(sidecar.read_text()).get("run_dir") if sidecar.exists() else None
            except (ValueError, AttributeError):
                kept = None
            if kept is not None and kept != portable_path(run_dir):
                raise UsageError(f"{sidecar} holds the grid of run {kept} (as named from the folder grid-eval "
                                 f"ran in), not {portable_path(run_dir)}: use another --out, or run from there")


def claim_settings(out: Path, ays: dict, uses_ays: bool, has_ays_rows: bool, n: int | None, has_rows: bool,
                   runs: dict[Path, set[str]]) -> dict[str, int]:
    """Keep DIR's rows to one setting, recorded in DIR/grid_eval.json, and refuse a call that would mix them:
    AYS settings other than those recorded (when AYS rows are asked for; a folder whose AYS rows predate the file
    was scored with the defaults, and AYS settings recorded without a split drew from the test split); AYS rows of
    a class-conditional run fitted otherwise than the folder's (ays_labels: "own" label per KLUB row, or "null" for
    the unconditional denoiser, which folders whose AYS settings predate the split, or the file, were fitted with;
    a folder recorded with a split but no ays_labels counts as "own"); another --n (rows predating the key used the
    default); a run that has trained on since its rows were scored (the step of its ema.pt, recorded by
    record_scored). `runs`: run → the methods this call scores rows of for it. Returns {run: step} of the runs with
    weights."""
    from adaptive_sched.checkpoint import load_ema_snapshot
    from adaptive_sched.grid_cli import AYS_DEFAULTS, AYS_LABELS, LEGACY_AYS_LABELS, LEGACY_AYS_SPLIT, ays_flag
    path = out / "grid_eval.json"
    try:
        settings = json.loads(path.read_text()) if path.exists() else {}
        assert isinstance(settings, dict) and isinstance(settings.get("runs", {}), dict)
    except (ValueError, AssertionError):
        raise UsageError(f"{path} is not a grid-eval settings file") from None
    before = settings.get("ays")
    labels = settings.get("ays_labels")      # how class-conditional runs' AYS rows were fitted (None: no AYS yet)
    if labels is None and (before is not None or has_ays_rows):
        labels = AYS_LABELS if isinstance(before, dict) and "ays_split" in before else LEGACY_AYS_LABELS
    if isinstance(before, dict) and "ays_split" not in before:      # recorded before the split was a setting
        before = {**before, "ays_split": LEGACY_AYS_SPLIT}
    if uses_ays:
        if before is None and has_ays_rows:
            before = {**AYS_DEFAULTS, "ays_split": LEGACY_AYS_SPLIT}
        if before is not None and before != ays:
            changed = ", ".join(f"{ays_flag(k)} {before.get(k)} (now {v})" for k, v in ays.items()
                                if before.get(k) != v)
            raise UsageError(f"{out}'s ays rows were scored with {changed}: use those settings or another --out")
    if has_rows and "n" in settings and settings["n"] != n:    # (a folder from before the record: unknown)
        raise UsageError(f"{out}'s rows were scored with --n {settings.get('n') or 'unset (each run its sample_n)'}"
                         f", now {n or 'unset'}: use the same --n or another --out")
    recorded, steps = settings.get("runs", {}), {}
    for run_dir, scoring in runs.items():
        if (run_dir / "ema.pt").exists() and (scoring or str(run_dir) in recorded):
            snap = load_ema_snapshot(run_dir)
            steps[str(run_dir)] = int(snap["step"])
            if "ays" in scoring and labels not in (None, AYS_LABELS) and snap.get("num_classes", 0):
                raise UsageError(f"{out}'s ays rows of class-conditional runs were fitted with ays_labels {labels!r} "
                                 f"(null: the unconditional denoiser, before 2026-11-28), {run_dir}'s would be on "
                                 f"each row's own label: score it into another --out")
            was = recorded.get(str(run_dir))
            if was is not None and was != steps[str(run_dir)]:
                raise UsageError(f"{out}'s rows of {run_dir} were scored at its step {was}, and it is at step "
                                 f"{steps[str(run_dir)]} now: score it into another --out")
    update = {**({"ays": ays, "ays_labels": AYS_LABELS} if uses_ays and before is None else {}), "n": n,
              "runs": recorded}
    if {**settings, **update} != settings:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {**settings, **update}, indent=2)
    return steps


def record_scored(out: Path, run_dir: Path, step: int) -> None:
    """Add `run_dir` at `step` to DIR/grid_eval.json's runs, once rows of it are in grid_eval.csv."""
    path = out / "grid_eval.json"
    settings = json.loads(path.read_text())
    if settings.get("runs", {}).get(str(run_dir)) != step:
        atomic_write_json(path, {**settings, "runs": {**settings.get("runs", {}), str(run_dir): step}}, indent=2)


def report(out: Path, runs: list[str], methods: list[str], steps: list[int]) -> None:
    """grid_eval.md (metric mean ± 95% CI over runs, rows = method, columns = steps) and grid_eval.png."""
    import pandas as pd
    from adaptive_sched.compare_stats import mean_ci
    from adaptive_sched.plots import _pyplot, finish_line_plot
    steps = sorted(steps)                                                  # columns and the line left to right
    table = pd.read_csv(out / "grid_eval.csv")
    table = table[table["run"].isin(runs) & table["method"].isin(methods) & table["steps"].isin(steps)]
    metric = "eval_fid" if table["eval_fid"].notna().any() else "eval_swd"
    lines = [f"# {metric} by sampling grid and number of steps (mean ± 95% CI over {len(runs)} run(s))", "",
             "Runs: " + ", ".join(f"`{r}`" for r in runs), "",
             "| grid | " + " | ".join(f"{s} steps" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        cells, means = [], []
        for s in steps:
            mean, half, k = mean_ci(table[(table["method"] == method) & (table["steps"] == s)][metric])
            partial = f" ({k} of {len(runs)} runs)" if k != len(runs) else ""     # a run without this metric
            spread = f" ± {half:.2g}" if half == half else ""                    # one run: no interval
            cells.append(f"{mean:.4g}{spread}{partial}" if k else "")
            means.append(mean)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
        ax.plot(steps, means, marker="o", label=method)
    atomic_write_text(out / "grid_eval.md", "\n".join(lines) + "\n")
    ax.set_xscale("log")
    finish_line_plot(fig, ax, out / "grid_eval.png", "sampler steps", metric, logy=True)
    print("\n".join(lines))


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `grid-eval` on the CLI's subparsers."""
    from adaptive_sched.grid_cli import add_ays_options, ays_settings
    p = subparsers.add_parser("grid-eval", help="sample quality of each sampling-grid method at several step counts, "
                                                "same model(s)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN")
    p.add_argument("--steps", default="5,10,20", help="comma-separated sampler step counts (default 5,10,20)")
    p.add_argument("--methods", default="cosine,karras,quantile,ays",
                   help="comma-separated grid methods (default: %(default)s)")
    p.add_argument("--n", type=int, help="samples per (run, method, steps) (default: the run's [eval] sample_n)")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    add_ays_options(p)
    p.set_defaults(func=lambda args: grid_eval(args.run_dirs, parse_list(args.steps, "steps", int),
                                               parse_list(args.methods, "methods"), args.out, args.n, args.device,
                                               not args.quiet, ays_settings(args)) and 0)
    return p
