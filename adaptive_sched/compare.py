"""`adaptive-sched compare CONFIG.toml --out DIR`: a grid of schedules × seeds, same everything else.

The TOML file is a run config (see adaptive_sched.config) plus a [compare] section:
    [compare]
    seeds = [0, 1, 2]
    metric = "eval_excess_mse"         # the column tables and plots are about
    schedules = [{ name = "cosine" }, { name = "laplace", b = 0.5 }, { name = "learned", weight_like = "cosine" }]
    jobs = 1                           # runs at once, as separate processes (or `compare --jobs K`)
    reference = "cosine"               # steps-to-target: the first step each schedule reaches this one's final
                                       # metric (default: the first entry); a label
    samples = 64                       # per schedule, from seed 0's EMA weights, drawn into samples.png (images)
    targets = ["eps", "v"]             # optional: every schedule is run with each prediction target
An entry's keys are its schedule's parameters, plus `label`, `target`, `curriculum` and, for learned
schedules, any [learned] key (objective, lr, weight_like, ...).
Runs go to DIR/runs/<label>/seed<k>/ and are resumable: finished runs are skipped, interrupted
ones continue from their last checkpoint; a run that finished with a non-finite metric, or whose training stopped on
non-finite losses (its diverged.json), is diverged: shown as such in results.md, left out of the means, and not
retrained (delete the second kind's diverged.json to retry it). Outputs: DIR/summary.csv (tidy: one row per run × logged
step), DIR/aggregates.csv (mean and 95% CI over seeds), DIR/steps_to_target.csv, DIR/results.md, and PNG
plots (metric against step, p(λ), per-λ loss, sample grids).
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from adaptive_sched import config as cfg
from adaptive_sched.atomic import atomic_write_text
from adaptive_sched.compare_config import Plan, final_step, is_int, parse, run_config, run_dir_of, run_label
from adaptive_sched.compare_stats import (diverged_runs, mean_ci, paired_with_reference, per_seed_metrics,
                                          steps_to_target)
from adaptive_sched.errors import UsageError
from adaptive_sched.out_paths import output_dir
from adaptive_sched.run_artifacts import DIVERGED, diverged_step, final_schedule, is_finished
from adaptive_sched.runlog import METRIC_COLUMNS, PROFILE_COLUMNS, CsvLog, header_of


def status(config_file: str | Path, out: str | Path) -> tuple[int, int]:
    """(finished runs, planned runs) of a comparison, a run whose training diverged counting as finished (compare
    does not train it again); runs trained with other settings are refused, as compare refuses them."""
    plan = parse(config_file)
    if Path(out).is_dir():
        check_runs_match(plan, Path(out))
    runs = [run_dir_of(Path(out), e, s) for s in plan.seeds for e in plan.entries]
    return sum(is_finished(r, final_step(plan.base)) or diverged_step(r) is not None for r in runs), len(runs)


def compare(config_file: str | Path, out: str | Path, progress: bool = True, jobs: int | None = None,
            time_budget: float | None = None) -> Path:
    """Run (or resume) every schedule × seed, `jobs` at a time, then write the tables and plots.

    Runs go seed by seed (every schedule's seed 0 first), so a partial comparison is a complete one with fewer
    seeds. With `time_budget` (seconds), no run starts after that much time; runs already going finish, and the
    same command again starts the rest.
    """
    from adaptive_sched.jobs import deadline_after
    from adaptive_sched.run_build import resolve_device
    plan = parse(config_file)
    resolve_device(plan.base.train.device)           # (not in parse: --status reads a config on any machine)
    jobs = plan.jobs if jobs is None else jobs
    if not is_int(jobs) or jobs < 1:
        raise UsageError(f"--jobs must be an integer >= 1, got {jobs!r}")
    deadline = deadline_after(time_budget)
    out = output_dir(out)
    with held_lock(out):
        return run_plan(plan, config_file, out, progress, jobs, deadline)


@contextlib.contextmanager
def held_lock(out: Path):
    """An exclusive lock on DIR/.compare.lock for one compare call: a second call on the same DIR trained the same
    runs twice into one metrics.csv, whose repeated rows then read as extra seeds."""
    import fcntl
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".compare.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another `compare` is running on {out} (it holds {out / '.compare.lock'}); wait for "
                             f"it, or use another --out") from None
        yield


def run_plan(plan: Plan, config_file: str | Path, out: Path, progress: bool, jobs: int,
             deadline: float | None) -> Path:
    """compare()'s work once DIR is locked: the runs left, then the report."""
    from adaptive_sched.train import train
    check_runs_match(plan, out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.toml", Path(config_file).read_text())
    todo = []
    for seed in plan.seeds:
        for entry in plan.entries:
            run_dir = run_dir_of(out, entry, seed)
            if is_finished(run_dir, final_step(plan.base)):
                print(f"{run_label(entry)} seed {seed}: finished, skipped")
            elif diverged_step(run_dir) is not None:
                print(f"{run_label(entry)} seed {seed}: diverged at step {diverged_step(run_dir)}, skipped (delete "
                      f"{run_dir / DIVERGED} to train it again)")
            else:
                todo.append((entry, seed, run_dir))
    left, failed = [], []
    if jobs == 1:
        for i, (entry, seed, run_dir) in enumerate(todo, 1):
            if deadline is not None and time.monotonic() >= deadline:
                left = todo[i - 1:]
                break
            print(f"[{i}/{len(todo)}] {run_label(entry)} seed {seed}")
            try:
                train(run_config(plan.base, entry, seed), run_dir, resume=True, progress=progress)
            except UsageError as err:               # as with jobs > 1: report it, go on with the other runs
                how = "diverged" if diverged_step(run_dir) is not None else "failed"
                print(f"{run_label(entry)} seed {seed}: {how} ({err})", file=sys.stderr)
                if how == "failed":
                    failed.append(f"{run_label(entry)} seed {seed}: {err}")
        if failed:
            raise runs_failed(len(failed), len(todo), failed[0])
    elif todo:
        left = run_in_processes(plan, todo, jobs, progress, deadline)
    if left:
        print(f"time budget spent: {len(left)} of {len(todo)} runs not started (first: {run_label(left[0][0])} "
              f"seed {left[0][1]}); the same command starts them")
    if not any((run_dir_of(out, e, s) / "metrics.csv").exists() for e in plan.entries for s in plan.seeds):
        return out                                   # nothing has run yet: no report to write
    return report(out, plan)


def check_runs_match(plan: Plan, out: Path) -> None:
    """UsageError, before any run starts, when a run already in DIR with something trained to keep (a checkpoint or
    finished.json) has a config.toml other than the plan's for it (run_checks.check_resumable, as `train --resume`
    does): a finished run was skipped and the report rewritten under settings its numbers do not come from.

    Two changes `train --resume` takes are refused here as well, since a comparison reads its runs side by side:
    [train] steps below a step a run has recorded (its numbers would be about no single final step; raising it
    resumes), and [eval] every while any planned run has still to train (its evals would fall on other steps than
    the finished runs'). Once every run is finished nothing is evaluated again, so a changed `every` is harmless."""
    from adaptive_sched.checkpoint import STATE_NAME
    from adaptive_sched.run_artifacts import FINISHED
    from adaptive_sched.run_checks import check_resumable
    runs = [(entry, seed, run_dir_of(out, entry, seed)) for seed in plan.seeds for entry in plan.entries]
    all_finished = all(is_finished(run_dir, final_step(plan.base)) or diverged_step(run_dir) is not None
                       for _, _, run_dir in runs)                     # (a diverged run is not trained again)
    for entry, seed, run_dir in runs:
        saved = run_dir / "config.toml"
        if not saved.exists() or not ((run_dir / STATE_NAME).exists() or (run_dir / FINISHED).exists()):
            continue                              # nothing trained to keep: the run starts again as now given
        settings = cfg.read_toml(saved)
        if not all(isinstance(section, dict) for section in settings.values()):
            raise UsageError(f"{saved} is not a run's config (every top-level key is a [section]); restore it "
                             f"or use another --out")
        current = run_config(plan.base, entry, seed).to_dict()
        old, new = cfg.with_defaults(settings)["eval"]["every"], current["eval"]["every"]
        recorded = recorded_step(run_dir)
        try:
            check_resumable(settings, current)
            if recorded > final_step(plan.base):
                raise UsageError(f"[train] steps is now {final_step(plan.base)}, but the run has recorded step "
                                 f"{recorded}; keep steps >= {recorded}")
            if old != new and not all_finished:
                raise UsageError(f"[eval] every was {old!r} in the saved run, now {new!r}, and some runs have still "
                                 f"to train: their evals would fall on other steps than this run's")
        except UsageError as err:
            detail = str(err).removeprefix("cannot resume: ").split("; use ")[0]
            raise UsageError(f"{run_label(entry)} seed {seed} in {out} was trained with other settings "
                             f"({detail}); use another --out, or the settings it ran with") from None


def recorded_step(run_dir: Path) -> int:
    """The furthest step a run has recorded: finished.json's step or metrics.csv's last row (0 when neither)."""
    from adaptive_sched.run_artifacts import FINISHED
    steps = [0]
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        steps.append(int(json.loads((run_dir / FINISHED).read_text())["step"]))
    if (run_dir / "metrics.csv").exists():
        for row in CsvLog(run_dir / "metrics.csv", ["step"]).rows():
            with contextlib.suppress(ValueError, TypeError):
                steps.append(int(float(row["step"])))
    return max(steps)


def runs_failed(count: int, total: int, first: str) -> UsageError:
    """The error that ends a comparison some of whose runs failed (the others ran to the end)."""
    return UsageError(f"{count} of {total} runs failed (first: {first}); rerun the same command to retry them")


def run_in_processes(plan: Plan, todo: list[tuple[dict, int, Path]], jobs: int, progress: bool,
                     deadline: float | None = None) -> list[tuple[dict, int, Path]]:
    """Train the unfinished runs as `jobs` concurrent `adaptive-sched train --resume` processes; return the runs
    not started because the deadline (time.monotonic()) passed."""
    from adaptive_sched.jobs import Job, run_jobs
    work = []
    for entry, seed, run_dir in todo:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = run_dir / "run.toml"
        atomic_write_text(config_path, cfg.dumps_toml(run_config(plan.base, entry, seed).to_dict()))
        work.append(Job(f"{run_label(entry)} seed {seed}", ["train", "--config", str(config_path), "--out",
                                                             str(run_dir), "--resume", "--quiet"],
                        run_dir / "train.log"))
    failed, unstarted = run_jobs(work, jobs, progress, deadline=deadline)
    run_dirs = {id(job): run_dir for job, (_, _, run_dir) in zip(work, todo)}
    failed = [(job, code) for job, code in failed if diverged_step(run_dirs[id(job)]) is None]   # a result, not a fault
    if failed:
        raise runs_failed(len(failed), len(work), f"{failed[0][0].name}, see {failed[0][0].log}")
    return [item for item, job in zip(todo, work) if job in unstarted]


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
                columns = header_of(run_dir / name, columns)   # conditional runs add per-guidance columns
                rows = CsvLog(run_dir / name, columns).rows()
                try:
                    frame = pd.DataFrame(rows, columns=columns).replace("", float("nan")).astype(float)
                except ValueError as err:
                    raise UsageError(f"{run_dir / name} holds a value that is not a number ({err})") from None
                frame.insert(0, "seed", seed)
                frame.insert(0, "params", params)
                frame.insert(0, "schedule", entry["name"])
                frame.insert(0, "label", run_label(entry))
                sink.append(frame)
    if not frames:
        raise UsageError(f"no finished runs under {out / 'runs'}")
    return pd.concat(frames, ignore_index=True), pd.concat(profiles, ignore_index=True)


def report(out: Path, plan: Plan) -> Path:
    """Write summary.csv, aggregates.csv, steps_to_target.csv, results.md and the plots from the runs on disk."""
    from adaptive_sched import compare_plots, compare_report
    import numpy as np
    entries, seeds, metric, base, last = plan.entries, plan.seeds, plan.metric, plan.base, final_step(plan.base)
    summary, profiles = collect(out, entries, seeds)
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    summary = with_stopped_runs(summary, [(run_label(e), s) for s in seeds for e in entries
                                          if diverged_step(run_dir_of(out, e, s)) is not None], last)
    rows = []
    for name in [c for c in summary.columns if c.startswith("eval_") and summary[c].notna().any()]:
        finite = summary[np.isfinite(summary[name])]                          # a diverged run's NaN/inf: no value
        for (label, step), group in finite.groupby(["label", "step"], sort=False):
            mean, half, n = mean_ci(group.groupby("seed")[name].last())       # one value per seed, however logged
            rows.append({"label": label, "step": int(step), "metric": name, "mean": mean, "ci95": half, "seeds": n})
    import pandas as pd
    aggregates = pd.DataFrame(rows, columns=["label", "step", "metric", "mean", "ci95", "seeds"])
    diverged = diverged_runs(summary, metric, last)
    if metric not in set(aggregates["metric"]) and not len(diverged):
        raise UsageError(f"metric {metric!r} was never logged by these runs")
    atomic_write_text(out / "aggregates.csv", aggregates.to_csv(index=False))
    reached = steps_to_target(summary, metric, plan.reference, last)
    atomic_write_text(out / "steps_to_target.csv", reached.to_csv(index=False))
    compare_plots.metric_curves(aggregates[aggregates["metric"] == metric], metric, out / "metric_vs_step.png")
    compare_plots.densities(entries, base, out / "densities.png", out, seeds[0])
    compare_plots.loss_profiles(profiles, out / "loss_profile.png")
    from adaptive_sched.data import VECTOR_SETS
    if plan.samples > 0 and base.data.name not in VECTOR_SETS:
        compare_plots.sample_grids(entries, out, seeds[0], plan.samples, out / "samples.png")
    spread = class_spread(out, entries, seeds)
    if len(spread):
        atomic_write_text(out / "class_medians.csv", spread.to_csv(index=False))
        labels = set(spread["label"])
        trained = [(run_label(e), final_schedule(run_dir_of(out, e, seeds[0]))) for e in entries
                   if run_label(e) in labels]
        compare_plots.class_densities([(t, s) for t, s in trained if s is not None], out / "densities_by_class.png")
    compare_report.write_results_md(out, aggregates, metric, base, target_text(plan), data_floor(base), reached,
                                    spread, {m: paired_with_reference(summary, m, plan.reference, last)
                                             for m in per_seed_metrics(summary, metric)}, len(seeds), diverged)
    return out


def with_stopped_runs(summary, stopped: list[tuple[str, int]], final: int):
    """The summary plus a row of NaN metrics at step `final` for each (label, seed) whose training diverged: its
    final metrics are undefined, so the statistics count it as diverged, as a run whose samples scored NaN."""
    import pandas as pd
    if not stopped:
        return summary
    rows = pd.DataFrame([{"label": label, "seed": seed, "step": final} for label, seed in stopped])
    return pd.concat([summary, rows], ignore_index=True)


def target_text(plan: Plan) -> str:
    """The report header's prediction target: the one every run uses, or the per-run ones (a targets grid)."""
    targets = list(dict.fromkeys(e.get("target", plan.base.train.target) for e in plan.entries))
    return f"target={targets[0]}" if len(targets) == 1 else f"target per run ({', '.join(targets)}: see the labels)"


def class_spread(out: Path, entries: list[dict], seeds: list[int]):
    """Per conditional schedule and seed: each condition's median λ(0.5 | c) (a DataFrame, long form)."""
    import pandas as pd
    from adaptive_sched.class_schedules import class_medians, num_classes
    rows = []
    for entry in entries:
        for seed in seeds:
            run_dir = run_dir_of(out, entry, seed)
            trained = final_schedule(run_dir) if entry["name"] == "learned" else None
            if trained is None:
                continue
            schedule = trained[0]
            if num_classes(schedule):
                rows += [{"label": run_label(entry), "seed": seed, "condition": c, "median_logsnr": float(m)}
                         for c, m in enumerate(class_medians(schedule))]
    return pd.DataFrame(rows, columns=["label", "seed", "condition", "median_logsnr"])


def data_floor(base: cfg.RunConfig) -> float | None:
    """eval_swd between held-out data and as many training examples: what a perfect sampler would score."""
    if base.eval.sample_n <= 0:
        return None
    from adaptive_sched.evaluate import sliced_wasserstein
    from adaptive_sched.run_build import load_data
    held_out, train = load_data(base.data, "test"), load_data(base.data, "train")
    n = min(base.eval.sample_n, base.eval.n, len(held_out), len(train))
    return sliced_wasserstein(train.x[:n], held_out.x[:n])
