"""`adaptive-sched compare CONFIG.toml --out DIR`: a grid of schedules × seeds, same everything else.

The TOML file is a run config (see adaptive_sched.config) plus a [compare] section:
    [compare]
    seeds = [0, 1, 2]
    metric = "eval_excess_mse"         # the column tables and plots are about
    schedules = [{ name = "cosine" }, { name = "laplace", b = 0.5 }, { name = "learned", weight_like = "cosine" }]
An entry's keys are its schedule's parameters, plus `label` and, for learned schedules, any [learned] key
(objective, lr, weight_like, ...).
Runs go to DIR/runs/<label>/seed<k>/ and are resumable: finished runs are skipped, interrupted
ones continue from their last checkpoint. Outputs: DIR/summary.csv (tidy: one row per run × logged
step), DIR/aggregates.csv (mean and 95% CI over seeds), DIR/results.md, and PNG plots.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path

from adaptive_sched import config as cfg
from adaptive_sched.errors import UsageError
from adaptive_sched.runlog import METRIC_COLUMNS, PROFILE_COLUMNS, CsvLog

COMPARE_KEYS = {"seeds", "metric", "schedules"}


def run_label(entry: dict) -> str:
    """A readable, filesystem-safe label: name(k=v,...)."""
    params = {k: v for k, v in entry.items() if k not in ("name", "label")}
    if "label" in entry:
        return str(entry["label"])
    inner = ",".join(f"{k}={v}" for k, v in params.items())
    return f"{entry['name']}({inner})" if inner else entry["name"]


def run_dir_of(out: Path, entry: dict, seed: int) -> Path:
    """DIR/runs/<slug>/seed<k>, the slug being the label with shell-unfriendly characters replaced."""
    slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", run_label(entry)).strip("_")
    return out / "runs" / slug / f"seed{seed}"


def parse(path: str | Path) -> tuple[cfg.RunConfig, list[dict], list[int], str]:
    """(base config, schedule entries, seeds, metric) from a compare TOML; everything validated up front."""
    raw = cfg.read_toml(path)
    section = raw.pop("compare", None)
    if not isinstance(section, dict):
        raise UsageError(f"{path} has no [compare] section (with seeds and schedules)")
    unknown = set(section) - COMPARE_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise UsageError(f"unknown key {key!r} in [compare]{cfg.suggest(key, sorted(COMPARE_KEYS))}; "
                         f"valid keys: {', '.join(sorted(COMPARE_KEYS))}")
    base = cfg.from_dict(raw)
    seeds = section.get("seeds", [0])
    entries = section.get("schedules", [])
    metric = section.get("metric", "eval_eps_mse")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) and "name" in e for e in entries):
        raise UsageError("[compare] schedules must be a non-empty list of tables, each with a name")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise UsageError("[compare] seeds must be a non-empty list of integers")
    eval_metrics = [c for c in METRIC_COLUMNS if c.startswith("eval_")]
    if metric not in eval_metrics:
        raise UsageError(f"[compare] metric {metric!r} is not an eval metric; choose one of: "
                         f"{', '.join(eval_metrics)}")
    from adaptive_sched.train import build_schedule
    dirs = [run_dir_of(Path("."), e, 0) for e in entries]
    if len(set(dirs)) != len(dirs):
        raise UsageError("[compare] two schedules share a label (or its folder name); give one a distinct `label`")
    for entry in entries:
        build_schedule(run_config(base, entry, seeds[0]).schedule)     # refuse bad parameters before any run
    return base, entries, seeds, metric


def run_config(base: cfg.RunConfig, entry: dict, seed: int) -> cfg.RunConfig:
    """The config of one run: the base with this schedule and seed."""
    learned_keys = {f.name for f in dataclasses.fields(cfg.LearnedConfig)}
    schedule = {k: v for k, v in entry.items() if k != "label" and k not in learned_keys}
    learned = {k: v for k, v in entry.items() if k in learned_keys}
    config = copy.deepcopy(base)
    config.schedule.params = {}          # an entry names all of its schedule's parameters
    return cfg.from_dict({"schedule": schedule, "learned": learned, "train": {"seed": seed}}, config)


def is_finished(run_dir: Path, steps: int) -> bool:
    """True when the run's metrics reach its final step."""
    path = run_dir / "metrics.csv"
    if not path.exists() or not (run_dir / "ema.pt").exists():
        return False
    rows = CsvLog(path, METRIC_COLUMNS).rows()
    return bool(rows) and int(rows[-1]["step"]) >= steps


def compare(config_file: str | Path, out: str | Path, progress: bool = True) -> Path:
    """Run (or resume) every schedule × seed, then write summary.csv, aggregates.csv, results.md and plots."""
    from adaptive_sched.train import train
    base, entries, seeds, metric = parse(config_file)
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "compare.toml").write_text(Path(config_file).read_text())
    jobs = [(entry, seed) for entry in entries for seed in seeds]
    for i, (entry, seed) in enumerate(jobs, 1):
        run_dir = run_dir_of(out, entry, seed)
        if is_finished(run_dir, base.train.steps):
            print(f"[{i}/{len(jobs)}] {run_label(entry)} seed {seed}: finished, skipped")
            continue
        print(f"[{i}/{len(jobs)}] {run_label(entry)} seed {seed}")
        train(run_config(base, entry, seed), run_dir, resume=True, progress=progress)
    return report(out, entries, seeds, metric, base)


def collect(out: Path, entries: list[dict], seeds: list[int]):
    """Tidy tables of every run's metrics.csv and eval_profile.csv (pandas DataFrames)."""
    import pandas as pd
    frames, profiles = [], []
    for entry in entries:
        for seed in seeds:
            run_dir = run_dir_of(out, entry, seed)
            if not (run_dir / "metrics.csv").exists():
                continue
            params = json.dumps({k: v for k, v in entry.items() if k not in ("name", "label")}, sort_keys=True)
            for name, columns, sink in (("metrics.csv", METRIC_COLUMNS, frames),
                                        ("eval_profile.csv", PROFILE_COLUMNS, profiles)):
                rows = CsvLog(run_dir / name, columns).rows()
                frame = pd.DataFrame(rows, columns=columns).replace("", float("nan")).astype(float)
                frame.insert(0, "seed", seed)
                frame.insert(0, "params", params)
                frame.insert(0, "schedule", entry["name"])
                frame.insert(0, "label", run_label(entry))
                sink.append(frame)
    if not frames:
        raise UsageError(f"no finished runs under {out / 'runs'}")
    return pd.concat(frames, ignore_index=True), pd.concat(profiles, ignore_index=True)


def mean_ci(values) -> tuple[float, float, int]:
    """Mean and the half-width of its 95% Student-t confidence interval over seeds (0 for one seed)."""
    import numpy as np
    from scipy import stats
    values = np.asarray([v for v in values if v == v], dtype=float)
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(values[0]), 0.0, 1
    half = stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return float(values.mean()), float(half), n


def report(out: Path, entries: list[dict], seeds: list[int], metric: str, base: cfg.RunConfig) -> Path:
    """Write summary.csv, aggregates.csv, results.md and the plots from the runs on disk."""
    from adaptive_sched import compare_plots
    summary, profiles = collect(out, entries, seeds)
    summary.to_csv(out / "summary.csv", index=False)
    rows = []
    for name in [c for c in METRIC_COLUMNS if c.startswith("eval_") and summary[c].notna().any()]:
        for (label, step), group in summary.dropna(subset=[name]).groupby(["label", "step"], sort=False):
            mean, half, n = mean_ci(group[name])
            rows.append({"label": label, "step": int(step), "metric": name, "mean": mean, "ci95": half, "seeds": n})
    import pandas as pd
    aggregates = pd.DataFrame(rows)
    if metric not in set(aggregates.get("metric", [])):
        raise UsageError(f"metric {metric!r} was never logged by these runs")
    aggregates.to_csv(out / "aggregates.csv", index=False)
    compare_plots.metric_curves(aggregates[aggregates["metric"] == metric], metric, out / "metric_vs_step.png")
    compare_plots.densities(entries, base, out / "densities.png", out, seeds[0])
    compare_plots.loss_profiles(profiles, out / "loss_profile.png")
    write_results_md(out, aggregates, metric, base, data_floor(base))
    return out


def data_floor(base: cfg.RunConfig) -> float | None:
    """eval_swd between held-out data and as many training examples: what a perfect sampler would score."""
    if base.eval.sample_n <= 0:
        return None
    from adaptive_sched.evaluate import sliced_wasserstein
    from adaptive_sched.train import load_data
    held_out, train = load_data(base.data, "test"), load_data(base.data, "train")
    n = min(base.eval.sample_n, base.eval.n, len(held_out), len(train))
    return sliced_wasserstein(train.x[:n], held_out.x[:n])


def write_results_md(out: Path, aggregates, metric: str, base: cfg.RunConfig, floor: float | None = None) -> None:
    """A markdown table of every eval metric at the final step (mean ± 95% CI over seeds), sorted by `metric`."""
    final_step = int(aggregates["step"].max())
    final = aggregates[aggregates["step"] == final_step]
    names = [metric] + [m for m in final["metric"].unique() if m != metric]
    table = final.pivot(index="label", columns="metric", values=["mean", "ci95", "seeds"])
    order = table[("mean", metric)].sort_values().index
    lines = [f"# Eval metrics at step {final_step} (mean ± 95% CI over seeds; lower is better; sorted by {metric})",
             "", f"data={base.data.name}, model={base.model.name} {base.model.params or ''}, "
             f"steps={base.train.steps}, batch={base.train.batch_size}, lr={base.train.lr}, "
             f"target={base.train.target}, weighting={base.weighting.name}, sampler={base.eval.sampler} "
             f"{base.eval.sample_steps} steps on the {base.eval.grid} grid", "",
             "| schedule | " + " | ".join(names) + " | seeds |", "|---" * (len(names) + 2) + "|"]
    for label in order:
        cells = [f"{table.loc[label, ('mean', m)]:.4g} ± {table.loc[label, ('ci95', m)]:.2g}" for m in names]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {int(table.loc[label, ('seeds', metric)])} |")
    if floor is not None:
        lines += ["", f"eval_swd floor (training data against held-out data, same n): {floor:.4g}"]
    lines += ["", "eval_excess_mse: held-out ε-MSE above the exact denoiser's (gmm only), mean over λ in "
              f"[{base.eval.logsnr_lo}, {base.eval.logsnr_hi}]; eval_eps_mse: the same without subtracting it; "
              "eval_swd: sliced Wasserstein-1 between samples and held-out data."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
