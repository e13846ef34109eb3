"""`adaptive-sched sweep`: an Optuna study of one fixed schedule's hyperparameters (TPE, pruning), resumable,
parallel, on SQLite (default), a journal file or PostgreSQL.

    sweep --schedule laplace --trials 30 --out DIR [--storage URL] [--study NAME] [--workers K]
          [--config FILE.toml] [--metric eval_eps_mse] [--pruner median|hyperband|none] [--target-value V]
          [run options]
Each trial trains the base config with the trial's parameters into DIR/trials/<number>/. The objective is the
eval metric at the last step (lower is better), reported at every eval for pruning. With --target-value V the
study has a second objective, steps to target: the first eval step with metric <= V (steps + eval every when not
reached within the budget); it is not pruned, and best.json holds its Pareto front (adaptive_sched.sweep_pareto).
Running the same command again continues the study until it holds --trials trials (complete, pruned or failed);
a failed trial (NaN, out of memory, crash) is recorded as FAIL and the study goes on; Ctrl-C (or SIGTERM/SIGHUP)
marks the running trials FAIL, and they do not count towards --trials (the same command runs others instead); so
does a worker process that dies (killed, or a crash outside a trial): the others are stopped, and the command exits 1
naming it.
Storage URLs: sqlite:///PATH (default DIR/study.db), journal:PATH, postgresql://USER[:PW]@HOST:PORT/DB.
The search spaces and the [sweep] TOML section are described in adaptive_sched.sweep_space.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from adaptive_sched import config as cfg
from adaptive_sched import sweep_space as spaces
from adaptive_sched.errors import UsageError
from adaptive_sched.jobs import deadline_after
from adaptive_sched.out_paths import output_dir
from adaptive_sched.runlog import METRIC_COLUMNS
from adaptive_sched.sweep_pareto import not_reached
from adaptive_sched.sweep_storage import (absolute_storage, check_out_dir, check_settings, claim_out_dir, counted,
                                          default_storage, fail_dead_trials, mask, open_storage, quiet_optuna,
                                          recorded_storage, settings_of, stopped_from_outside)
from adaptive_sched.sweep_trials import PRUNERS, Job, WorkerCrashed, make_pruner, run_workers, work

__all__ = ["run_sweep", "report_only", "cmd_sweep", "add_parser", "main", "open_storage", "default_storage"]


def run_sweep(base: cfg.RunConfig, out: str | Path, trials: int, storage: str | None = None,
              study: str | None = None, metric: str = "eval_eps_mse", pruner=None, workers: int = 1,
              tune: list[str] | tuple = (), space: dict | None = None, report: bool = True,
              target: float | None = None, time_budget: float | None = None):
    """Create or continue the study of base.schedule's parameters until it holds `trials` trials; return it.

    pruner None is median, or none with a `target` (two objectives: the metric, and steps to metric <= target).
    With `time_budget` (seconds) no trial starts after that much time; the same call again continues.
    """
    import optuna
    from adaptive_sched.run_build import resolve_device
    from adaptive_sched.run_checks import check_metric_logged, validate
    out, schedule = output_dir(out), base.schedule.name
    validate(base)                                      # settings every trial shares: refused once, before any trial
    resolve_device(base.train.device)
    eval_metrics = [c for c in METRIC_COLUMNS if c.startswith("eval_")]
    if metric not in eval_metrics:
        raise UsageError(f"unknown metric {metric!r}{cfg.suggest(metric, eval_metrics)}; choose one of: "
                         f"{', '.join(eval_metrics)}")
    check_metric_logged(base, metric)
    if not isinstance(trials, int) or trials < 1 or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"--trials and --workers must be >= 1, got {trials} and {workers}")
    if target is not None:
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
            raise UsageError(f"--target-value must be a finite number, got {target!r}")
        target = float(target)
        if pruner not in (None, "none"):
            name = pruner if isinstance(pruner, str) else type(pruner).__name__
            raise UsageError(f"pruner {name} cannot be used with a target value: Optuna cannot prune a "
                             f"multi-objective study; leave the pruner out or set it to none")
    deadline = deadline_after(time_budget, time.time)     # wall clock: the worker processes share it
    pruner = pruner or ("median" if target is None else "none")
    make_pruner(pruner, base)
    job = Job(absolute_storage(storage) if storage else default_storage(out), study or schedule, base,
              spaces.build_space(schedule, tune, space, fixed=base.schedule.params,
                                 curriculum=base.schedule.curriculum), metric, pruner, str(out), trials,
              target=target, deadline=deadline)
    quiet_optuna()
    check_out_dir(out, job.study, job.storage)      # before opening: a refused storage is not created
    if storage is None:
        out.mkdir(parents=True, exist_ok=True)
    store = open_storage(job.storage)
    objectives = 1 if target is None else 2
    found = optuna.create_study(study_name=job.study, storage=store, directions=["minimize"] * objectives,
                                load_if_exists=True)
    settings = settings_of(base, job.space, metric, target, pruner if isinstance(pruner, str) else None)
    if "sweep" in found.user_attrs:
        check_settings(found.user_attrs["sweep"], settings, job.study)
    elif found.trials:                              # someone else's study of that name (e.g. on a shared database)
        raise UsageError(f"study {job.study!r} in {mask(job.storage)} holds {len(found.trials)} trial(s) that "
                         f"`adaptive-sched sweep` did not make; use another --study")
    if len(found.directions) != objectives:         # a study made outside `sweep` (no stored settings)
        raise UsageError(f"study {job.study!r} has {len(found.directions)} objective(s), this sweep {objectives}; "
                         f"use another --study")
    if "sweep" not in found.user_attrs:
        found.set_user_attr("sweep", settings)
    # sweep.json is written after the checks, so a refused run leaves it as it was
    claim_out_dir(out, job.study, job.storage, schedule, metric, target)
    dead = fail_dead_trials(found, store)
    have = len(counted(found))
    fixed = ", ".join(f"{k}={v}" for k, v in base.schedule.params.items()) or "nothing"
    pruner_name = pruner if isinstance(pruner, str) else type(pruner).__name__
    if target is None:
        print(f"sweep {schedule}: tuning {spaces.describe(job.space)}; fixed {fixed}; objective {metric} at step "
              f"{base.train.steps} (lower is better), pruner {pruner_name}")
    else:
        print(f"sweep {schedule}: tuning {spaces.describe(job.space)}; fixed {fixed}; objectives {metric} at step "
              f"{base.train.steps} and steps to {metric} <= {target:g} (both lower is better; not reached within "
              f"the budget = {not_reached(base.train.steps, base.eval.every)}), no pruning")
    print(f"study {job.study!r} in {mask(job.storage)}: {have} of {trials} trials there"
          + (f" ({dead} stale marked FAIL)" if dead else "")
          + (f"; running {trials - have} on {min(workers, trials - have)} worker(s)" if have < trials else ""),
          flush=True)
    crash = None
    if have < trials:
        if workers == 1:
            from adaptive_sched.jobs import stop_signals_raise
            with stop_signals_raise():              # SIGTERM/SIGHUP mark the running trial FAIL, as Ctrl-C does
                work(dataclasses.replace(job, quota=trials - have))
        else:
            try:
                run_workers(dataclasses.replace(job, workers=workers), trials - have)
            except WorkerCrashed as err:            # its running trial: FAIL, redone by the same command
                fail_dead_trials(found, store)
                crash = err
    if report:
        from adaptive_sched.sweep_report import write_report
        write_report(found, out)
    if crash is not None:
        raise crash
    return found


def report_only(out: str | Path, storage: str | None = None, study: str | None = None) -> None:
    """Re-render trials.csv, best.json, best.toml and the plots from storage, without training."""
    import optuna
    out = Path(out)
    meta = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").exists() else {}
    if storage is None and "***" in meta.get("storage", ""):
        raise UsageError(f"{out}/sweep.json names a storage with a password; pass --storage URL")
    storage, study = storage or recorded_storage(out, meta), study or meta.get("study")
    if not study:
        raise UsageError(f"{out} has no sweep.json; pass --study NAME (and --storage URL)")
    quiet_optuna()
    store = open_storage(storage)
    names = optuna.get_all_study_names(store)
    if study not in names:
        raise UsageError(f"no study {study!r} in {mask(storage)}{cfg.suggest(study, names)}; studies there: "
                         f"{', '.join(names) or 'none'}")
    from adaptive_sched.sweep_report import write_report
    found = optuna.load_study(study_name=study, storage=store)
    if "sweep" not in found.user_attrs:
        raise UsageError(f"study {study!r} in {mask(storage)} was not made by `adaptive-sched sweep`: nothing to "
                         f"render")
    write_report(found, out)


def cmd_sweep(args: argparse.Namespace) -> int:
    """The `sweep` subcommand; returns 0, 1 when trials are missing or a worker crashed, 2 when every trial failed,
    130 on Ctrl-C."""
    from optuna.trial import TrialState
    out = args.report or args.out
    if not out:
        raise UsageError("sweep needs --out DIR")
    if args.storage is not None and not args.storage.strip():
        raise UsageError("--storage is empty: give a URL (sqlite:///PATH, journal:PATH, postgresql://...) or leave "
                         "it out for DIR/study.db")
    if args.report is not None:
        given = [flag for flag, value in (("--trials", args.trials), ("--schedule", args.schedule),
                                          ("--config", args.config), ("--metric", args.metric),
                                          ("--pruner", args.pruner), ("--target-value", args.target_value),
                                          ("--time-budget", args.time_budget), ("--tune-lr", args.tune_lr or None),
                                          ("--tune-weighting", args.tune_weighting or None),
                                          ("--workers", None if args.workers == 1 else args.workers),
                                          ("--data", args.data), ("--steps", args.steps)) if value is not None]
        given += [flag for flag, dest, default in args.run_option_defaults if getattr(args, dest) != default
                  and flag not in given]
        if given:
            raise UsageError(f"sweep --report re-renders a study from its storage; {', '.join(given)} would not be "
                             f"used (run the sweep without --report to train)")
        report_only(out, args.storage, args.study)
        return 0
    run_raw, section = spaces.split_config(cfg.read_toml(args.config) if args.config else {})
    cfg.from_dict(run_raw)                                  # a malformed file fails here, with the config's message
    if not (args.schedule or run_raw.get("schedule", {}).get("name")):
        raise UsageError(f"sweep needs --schedule NAME (one of: {', '.join(spaces.sweepable())})")
    trials = args.trials if args.trials is not None else section.get("trials")
    if trials is None:
        raise UsageError("sweep needs --trials N (or [sweep] trials in --config)")
    if args.study is not None and not args.study.strip():
        raise UsageError("--study is empty: give a name, or leave it out for the schedule's name")
    tune = list(section.get("tune", [])) + ["lr"] * args.tune_lr + ["weighting"] * args.tune_weighting
    for name, given in (("lr", args.lr), ("weighting", args.weighting)):
        if name in tune and given is not None:
            raise UsageError(f"--{name} {given} is never used: the sweep tunes {name} (--tune-{name} or [sweep] "
                             f"tune); drop one")
    from adaptive_sched.cli import refuse_ignored_options
    base = base_config(args, run_raw)
    refuse_ignored_options(args, base, [base.schedule.name])
    try:
        study = run_sweep(base, out, trials, storage=args.storage, study=args.study,
                          metric=args.metric or section.get("metric", "eval_eps_mse"),
                          pruner=args.pruner or section.get("pruner"), workers=args.workers,
                          tune=list(dict.fromkeys(tune)), space=section.get("space"),
                          target=section.get("target") if args.target_value is None else args.target_value,
                          time_budget=args.time_budget)
    except KeyboardInterrupt as err:            # Ctrl-C, or SIGTERM/SIGHUP (sweep_trials.Stopped: 128 + signal)
        print("interrupted: the running trials are marked FAIL; run the same command to continue the study, or "
              "`sweep --report` to render it", file=sys.stderr)
        return getattr(err, "code", None) or 130
    except WorkerCrashed as err:                # not bad input (2): the study is consistent, only cut short
        print(f"error: {err}", file=sys.stderr)
        return 1
    missing = trials - len(counted(study))
    finished = [t for t in study.get_trials(deepcopy=False,
                                            states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
                if not stopped_from_outside(t)]
    if finished and all(t.state == TrialState.FAIL for t in finished):      # nothing to tune from: say why
        error = next((t.user_attrs["error"] for t in finished if t.user_attrs.get("error")), "")
        first = (error.strip().splitlines() or ["no message"])[0]
        raise UsageError(f"all {len(finished)} trials failed; the first: {first}")
    if missing > 0 and args.time_budget is not None:
        print(f"time budget spent: {trials - missing} of {trials} trials; run the same command to continue")
        return 0
    if missing > 0:
        print(f"warning: {missing} trials short of {trials}; run the same command again", file=sys.stderr)
    return 1 if missing > 0 else 0


def base_config(args: argparse.Namespace, run_raw: dict) -> cfg.RunConfig:
    """Defaults, then the TOML file without its [sweep] section, then the run options given on the command line."""
    import tempfile

    from adaptive_sched.cli import resolve_config
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "base.toml"
        path.write_text(cfg.dumps_toml(run_raw))
        return resolve_config(argparse.Namespace(**{**vars(args), "config": str(path) if run_raw else None}))


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `sweep` to the CLI's subparsers (run options as in train: they set the base config of every trial)."""
    from adaptive_sched.cli import add_run_options
    p = subparsers.add_parser("sweep", help="tune a fixed schedule's parameters with Optuna (resumable, parallel)",
                              description=__doc__.split("\n\n")[0])
    add_run_options(p)
    p.set_defaults(run_option_defaults=[(a.option_strings[0], a.dest, a.default) for a in p._actions
                                        if a.option_strings and a.dest != "help"])    # what --report refuses
    for flag, text in (("--config", "TOML file: a run config (the base of every trial) plus an optional [sweep] "
                                    "section: trials, metric, pruner, target, tune, space (see "
                                    "adaptive_sched.sweep_space)"),
                       ("--schedule", f"the schedule to tune: {', '.join(spaces.sweepable())}"),
                       ("--seed", "training seed of every trial (the same for all), and TPE's seed")):
        p._option_string_actions[flag].help = text      # the run options, read as a sweep's
    p.add_argument("--trials", type=int, help="total trials in the study (the same command again adds up to it)")
    p.add_argument("--out", help="sweep directory: trials/<n>/, trials.csv, best.json, best.toml, plots")
    p.add_argument("--storage", help="sqlite:///PATH (default DIR/study.db), journal:PATH or postgresql://...")
    p.add_argument("--study", help="study name (default: the schedule's name)")
    p.add_argument("--workers", type=int, default=1, help="trial processes at once (CPU threads are split)")
    p.add_argument("--metric", help="objective, lower is better (default eval_eps_mse)")
    p.add_argument("--pruner", choices=PRUNERS, help="default median (none with --target-value, which refuses others)")
    p.add_argument("--target-value", type=float, metavar="V",
                   help="multi-objective: also minimise the steps until the metric first is <= V (steps + eval "
                        "every when not reached within the budget); no pruning; best.json holds the Pareto front")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="start no trial after this many seconds (trials going finish; the same command continues)")
    p.add_argument("--tune-lr", action="store_true", help="also tune the learning rate (log-uniform)")
    p.add_argument("--tune-weighting", action="store_true", help="also tune the loss weighting (categorical)")
    p.add_argument("--report", nargs="?", const="", metavar="DIR",
                   help="only re-render tables and plots from storage (DIR or --out)")
    p.set_defaults(func=cmd_sweep)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m adaptive_sched.sweep ARGS` = `adaptive-sched sweep ARGS`."""
    from adaptive_sched.cli import main as cli_main
    return cli_main(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
