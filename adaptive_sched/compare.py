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
ones continue from their last checkpoint. Outputs: DIR/summary.csv (tidy: one row per run × logged
step), DIR/aggregates.csv (mean and 95% CI over seeds), DIR/steps_to_target.csv, DIR/results.md, and PNG
plots (metric against step, p(λ), per-λ loss, sample grids).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

from adaptive_sched import config as cfg, schedules
from adaptive_sched.atomic import atomic_write_text
from adaptive_sched.compare_stats import mean_ci, paired_with_reference, per_seed_metrics, steps_to_target
from adaptive_sched.diffusion import TARGETS
from adaptive_sched.errors import UsageError
from adaptive_sched.out_paths import output_dir
from adaptive_sched.run_artifacts import final_schedule, is_finished
from adaptive_sched.runlog import METRIC_COLUMNS, PROFILE_COLUMNS, CsvLog, header_of

LEARNED_KEYS = {f.name for f in dataclasses.fields(cfg.LearnedConfig)}   # an entry's keys that go to [learned]
COMPARE_KEYS = {"seeds", "metric", "schedules", "targets", "jobs", "reference", "samples"}
RUN_KEYS = {"label", "target"}          # entry keys that are not schedule parameters


def run_label(entry: dict) -> str:
    """A readable label: name(k=v,...) or the entry's own `label`, then " [target]" when the entry sets one."""
    suffix = f" [{entry['target']}]" if "target" in entry else ""
    if "label" in entry:
        return str(entry["label"]) + suffix
    params = {k: v for k, v in entry.items() if k not in ("name", "label", "target")}
    inner = ",".join(f"{k}={v}" for k, v in params.items())
    return (f"{entry['name']}({inner})" if inner else entry["name"]) + suffix


def run_dir_of(out: Path, entry: dict, seed: int) -> Path:
    """DIR/runs/<slug>/seed<k>, the slug being the label with shell-unfriendly characters replaced."""
    slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", run_label(entry)).strip("_")
    if not slug.strip("."):                  # "", "." or "..": would name runs/ itself or its parent
        slug = "_" + slug
    return out / "runs" / slug / f"seed{seed}"


@dataclasses.dataclass
class Plan:
    """A parsed compare file: the base run config, schedule entries, seeds and the [compare] options."""

    base: cfg.RunConfig
    entries: list[dict]
    seeds: list[int]
    metric: str
    jobs: int = 1
    reference: str = ""
    samples: int = 64


def parse(path: str | Path) -> Plan:
    """The compare plan from a TOML file; everything validated up front."""
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
    targets = section.get("targets", [])
    if not isinstance(targets, list) or not all(t in TARGETS for t in targets):
        raise UsageError(f"[compare] targets must be a list drawn from: {', '.join(TARGETS)}")
    if isinstance(entries, list):
        entries = [tuned_entry(e, Path(path)) if isinstance(e, dict) and "best" in e else e for e in entries]
    if targets and isinstance(entries, list):
        entries = [{**e, "target": t} for e in entries if isinstance(e, dict) for t in targets]
    metric = section.get("metric", "eval_eps_mse")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) and "name" in e for e in entries):
        raise UsageError("[compare] schedules must be a non-empty list of tables, each with a name")
    bad = [e["name"] for e in entries if not isinstance(e["name"], str)]
    if bad:
        raise UsageError(f"[compare] a schedule's name must be a string, got {bad[0]!r}")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise UsageError("[compare] seeds must be a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"[compare] seeds lists a seed twice: {seeds}")
    from adaptive_sched.run_build import build_loss, build_schedule, check_table_condition, metric_columns
    from adaptive_sched.run_checks import check_metric_logged, validate
    eval_metrics = [c for c in metric_columns(base) if c.startswith("eval_")]
    if metric not in eval_metrics:
        raise UsageError(f"[compare] metric {metric!r} is not an eval metric; choose one of: "
                         f"{', '.join(eval_metrics)}")
    check_metric_logged(base, metric)
    blank = [e for e in entries if "label" in e and not str(e["label"]).strip()]
    if blank:
        raise UsageError(f"[compare] a schedule's label must not be blank, got {blank[0]['label']!r}")
    dirs = [run_dir_of(Path("."), e, 0) for e in entries]
    if len(set(dirs)) != len(dirs):
        raise UsageError("[compare] two schedules share a label (or its folder name); give one a distinct `label`")
    for entry in entries:             # refuse bad settings, parameters, objectives and weightings before any run
        ignored = sorted((LEARNED_KEYS - {"condition"}) & set(entry))                 # (a table takes a condition)
        if ignored and not schedules.is_learned(schedules.lookup(str(entry["name"]))):
            raise UsageError(f"[compare] entry {run_label(entry)!r} sets {', '.join(ignored)}, which only a learned "
                             f"schedule uses; drop it or use name = \"learned\"")
        if "objective" in entry and entry["name"] not in schedules.OBJECTIVE_SCHEDULES:      # adaptive_binned's is fixed
            raise UsageError(f"[compare] entry {run_label(entry)!r} sets objective, which only name = \"learned\" "
                             f"takes")
        configs = [run_config(base, entry, seed) for seed in seeds]
        for config in configs:
            validate(config)
        schedule = build_schedule(configs[0].schedule)
        check_table_condition(schedule, configs[0].learned.condition)
        build_loss(configs[0], schedule)
    jobs, samples = section.get("jobs", 1), section.get("samples", 64)
    if not isinstance(jobs, int) or jobs < 1 or not isinstance(samples, int) or samples < 0:
        raise UsageError("[compare] jobs must be an integer >= 1 and samples an integer >= 0")
    labels = [run_label(e) for e in entries]
    reference = section.get("reference", labels[0])
    if reference not in labels:
        raise UsageError(f"[compare] reference {reference!r} is not one of the labels: {', '.join(labels)}")
    return Plan(base, entries, seeds, metric, jobs, reference, samples)


def tuned_entry(entry: dict, config_file: Path) -> dict:
    """An entry `{ best = "DIR/best.json", label = ... }`: the schedule a sweep found (its best.json's compare_entry),
    the entry's own keys on top. The path is taken from the working folder, else from the TOML file's folder."""
    given = Path(str(entry["best"]))
    path = given if given.exists() or given.is_absolute() else config_file.parent / given
    if not path.exists():
        raise UsageError(f"[compare] best = {str(given)!r}: no such file (run the sweep first; its --out folder "
                         f"holds best.json)")
    try:
        found = json.loads(path.read_text()).get("compare_entry")
    except ValueError:
        raise UsageError(f"[compare] best = {str(given)!r} is not a JSON file (a sweep's best.json)") from None
    except AttributeError:
        found = None
    if not isinstance(found, dict) or "name" not in found:
        raise UsageError(f"[compare] best = {str(given)!r} holds no single best schedule (a multi-objective study's "
                         f"best.json is a Pareto front: copy the trial you want into the entry instead)")
    return {**found, **{k: v for k, v in entry.items() if k != "best"}}


def run_config(base: cfg.RunConfig, entry: dict, seed: int) -> cfg.RunConfig:
    """The config of one run: the base with this schedule and seed."""
    schedule = {k: v for k, v in entry.items() if k not in RUN_KEYS and k not in LEARNED_KEYS}
    learned = {k: v for k, v in entry.items() if k in LEARNED_KEYS}
    config = copy.deepcopy(base)
    config.schedule = dataclasses.replace(config.schedule, params={}, curriculum={})  # an entry names them all
    train = {"seed": seed, **({"target": entry["target"]} if "target" in entry else {})}
    return cfg.from_dict({"schedule": schedule, "learned": learned, "train": train}, config)


def status(config_file: str | Path, out: str | Path) -> tuple[int, int]:
    """(finished runs, planned runs) of a comparison; runs trained with other settings are refused, as compare
    refuses them."""
    plan = parse(config_file)
    if Path(out).is_dir():
        check_runs_match(plan, Path(out))
    runs = [run_dir_of(Path(out), e, s) for s in plan.seeds for e in plan.entries]
    return sum(is_finished(r, plan.base.train.steps) for r in runs), len(runs)


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
    if jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}")
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
            if is_finished(run_dir, plan.base.train.steps):
                print(f"{run_label(entry)} seed {seed}: finished, skipped")
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
                print(f"{run_label(entry)} seed {seed}: failed ({err})", file=sys.stderr)
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
    does): a finished run was skipped and the report rewritten under settings its numbers do not come from."""
    from adaptive_sched.checkpoint import STATE_NAME
    from adaptive_sched.run_artifacts import FINISHED
    from adaptive_sched.run_checks import check_resumable
    for seed in plan.seeds:
        for entry in plan.entries:
            run_dir = run_dir_of(out, entry, seed)
            saved = run_dir / "config.toml"
            if not saved.exists() or not ((run_dir / STATE_NAME).exists() or (run_dir / FINISHED).exists()):
                continue                              # nothing trained to keep: the run starts again as now given
            settings = cfg.read_toml(saved)
            if not all(isinstance(section, dict) for section in settings.values()):
                raise UsageError(f"{saved} is not a run's config (every top-level key is a [section]); restore it "
                                 f"or use another --out")
            try:
                check_resumable(settings, run_config(plan.base, entry, seed).to_dict())
            except UsageError as err:
                detail = str(err).removeprefix("cannot resume: ").split("; use ")[0]
                raise UsageError(f"{run_label(entry)} seed {seed} in {out} was trained with other settings "
                                 f"({detail}); use another --out, or the settings it ran with") from None


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
    entries, seeds, metric, base = plan.entries, plan.seeds, plan.metric, plan.base
    summary, profiles = collect(out, entries, seeds)
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    rows = []
    for name in [c for c in summary.columns if c.startswith("eval_") and summary[c].notna().any()]:
        for (label, step), group in summary.dropna(subset=[name]).groupby(["label", "step"], sort=False):
            mean, half, n = mean_ci(group.groupby("seed")[name].last())       # one value per seed, however logged
            rows.append({"label": label, "step": int(step), "metric": name, "mean": mean, "ci95": half, "seeds": n})
    import pandas as pd
    aggregates = pd.DataFrame(rows)
    if metric not in set(aggregates.get("metric", [])):
        raise UsageError(f"metric {metric!r} was never logged by these runs")
    atomic_write_text(out / "aggregates.csv", aggregates.to_csv(index=False))
    reached = steps_to_target(summary, metric, plan.reference, base.train.steps)
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
                                    spread, {m: paired_with_reference(summary, m, plan.reference)
                                             for m in per_seed_metrics(summary, metric)}, len(seeds))
    return out


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
