"""The trials of a sweep: the objective (one training run per trial, pruned at its evals), a worker that runs
its share of a study's trials, and K worker processes that share the rest (`--workers K`).

A trial trains the base config with its parameters into DIR/trials/<number>/; its user attributes hold
run_dir, the resolved schedule table, the full config, host and pid (a dead pid on this host = a stale trial),
and with a target (two objectives, never pruned) `evals`, the metric at every eval so far.
Failures are recorded as FAIL with a one-line `error` (a crash also leaves error.txt with its traceback).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from adaptive_sched import config as cfg
from adaptive_sched import sweep_space as spaces
from adaptive_sched.errors import UsageError
from adaptive_sched.sweep_storage import SURPLUS, counted, one_line, open_storage, quiet_optuna

PRUNERS = ("median", "hyperband", "none")


class MetricMissing(UsageError):
    """The objective's metric is not in the eval row (e.g. eval_fid on vectors): a config error, not bad luck."""


@dataclass
class Job:
    """What one worker needs: the study's address and settings, its share of the trials, its CPU threads."""

    storage: str
    study: str
    base: cfg.RunConfig
    space: dict
    metric: str
    pruner: object              # a name in PRUNERS or an optuna pruner
    out: str
    trials: int                 # the study's total
    quota: int = 0              # how many this worker may run
    worker: int = 0
    workers: int = 1
    threads: int = 0            # torch CPU threads (0: leave torch's default)
    target: float | None = None     # a second objective, steps to metric <= target (adaptive_sched.sweep_pareto)
    deadline: float | None = None   # time.time() after which no trial starts (a --time-budget)


def make_pruner(pruner, config: cfg.RunConfig):
    """MedianPruner (default), HyperbandPruner over [eval every, steps], NopPruner, or a given pruner object."""
    import optuna
    if not isinstance(pruner, str):
        return pruner
    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=config.eval.every, max_resource=config.train.steps,
                                              reduction_factor=3)
    if pruner == "none":
        return optuna.pruners.NopPruner()
    raise UsageError(f"unknown pruner {pruner!r}{cfg.suggest(pruner, list(PRUNERS))}; choose one of: "
                     f"{', '.join(PRUNERS)}")


def metric_value(row: dict, metric: str, step) -> float:
    """The objective from an eval row; missing → MetricMissing, non-finite → UsageError (the trial fails)."""
    import math
    value = row.get(metric)
    if value is None or value == "":
        logged = ", ".join(k for k in row if k.startswith("eval_"))
        raise MetricMissing(f"{metric} was not logged at step {step} (this run logs: {logged or 'no eval metric'})")
    if not math.isfinite(float(value)):
        raise UsageError(f"{metric} is {value} at step {step} (training diverged)")
    return float(value)


def objective(trial, job: Job) -> float | tuple[float, int]:
    """Train one trial into DIR/trials/<number>/; the metric at the last eval, reported at every eval. With a
    target: (that metric, steps to target), the evals kept in the `evals` user attribute instead of reported."""
    import optuna

    from adaptive_sched import checkpoint, train as trainer
    from adaptive_sched.sweep_pareto import steps_to_target
    if beyond_quota(trial, job.trials):         # another machine's worker started the last one at the same moment
        error = f"{SURPLUS} the study already held --trials {job.trials} when this trial started"
        trial.set_user_attr("error", error)
        raise Surplus(error)
    params = spaces.suggest(trial, job.space)
    config = spaces.trial_config(job.base, params)
    run_dir = Path(job.out) / "trials" / str(trial.number)
    for key, value in (("run_dir", str(run_dir)), ("schedule", spaces.schedule_table(config)),
                       ("config", config.to_dict()), ("host", socket.gethostname()), ("pid", os.getpid())):
        trial.set_user_attr(key, value)
    if run_dir.exists():
        shutil.rmtree(run_dir)         # left by a same-numbered trial of a study that was deleted

    evals: dict[int, float] = {}

    def on_eval(step: int, row: dict) -> None:
        value = metric_value(row, job.metric, step)
        if job.target is not None:              # multi-objective: Optuna can neither report nor prune
            evals[step] = value
            trial.set_user_attr("evals", {str(s): v for s, v in evals.items()})
            return
        trial.report(value, step)
        if step < config.train.steps and trial.should_prune():     # at the budget the trial is complete
            raise optuna.TrialPruned(f"pruned at step {step} ({job.metric}={value:.4g})")

    try:
        final = trainer.train(config, run_dir, progress=False, on_eval=on_eval)
        value = metric_value(final, job.metric, final.get("step"))
        if job.target is None:
            return value
        return value, steps_to_target(evals, job.target, config.train.steps, config.eval.every)
    except optuna.TrialPruned:
        raise
    except KeyboardInterrupt:
        trial.set_user_attr("error", "interrupted")
        raise
    except SystemExit as err:               # SIGTERM/SIGHUP (jobs.stop_signals_raise): Optuna marks FAIL only on these
        trial.set_user_attr("error", "interrupted")
        raise Stopped(err.code) from None
    except Exception as err:
        trial.set_user_attr("error", one_line(err))
        if isinstance(err, MetricMissing):
            trial.set_user_attr("error_kind", "metric")
        if not isinstance(err, UsageError):         # a crash (OOM, bug): keep the traceback with the run
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text(traceback.format_exc())
        raise
    finally:                # a trial is never resumed: keep its logs, config and EMA snapshot, drop the full states
        for name in (checkpoint.STATE_NAME, checkpoint.PREVIOUS_NAME):
            (run_dir / name).unlink(missing_ok=True)


class Surplus(Exception):
    """A trial beyond --trials (see beyond_quota): failed before it draws parameters, and not counted."""


def beyond_quota(trial, total: int) -> bool:
    """True when `total` counted trials have lower numbers than this new one. Each worker decides to start a trial
    (in `work`, and after each trial) from a count that workers on other machines may change before the trial is
    created, so K workers deciding at once could make the study K - 1 trials longer than --trials; this re-check
    after creation fails every trial numbered past the first `total`, so the study ends at exactly --trials.
    (Trial numbers follow creation order on SQLite and the journal; on PostgreSQL two creations within one
    transaction's time may still both pass, a bound of K - 1 again, but only for that narrower window.)"""
    return sum(t.number < trial.number for t in counted(trial.study)) >= total


def host_salt() -> int:
    """A number fixed per machine (CRC-32 of its host name): TPE seeds of workers on different machines that join a
    shared study at the same moment differ, so their random start-up points do too (one machine stays reproducible)."""
    import socket
    import zlib
    return zlib.crc32(socket.gethostname().encode()) * 104_729


def work(job: Job) -> None:
    """One worker: run up to job.quota trials of the study, fewer if it reaches job.trials first."""
    import optuna

    from adaptive_sched import sweep_report as report
    quiet_optuna()
    if job.threads:
        import torch
        torch.set_num_threads(job.threads)
    storage = open_storage(job.storage)
    have = len(counted(optuna.load_study(study_name=job.study, storage=storage)))
    # a resumed study draws anew; another machine on the same database draws other points than this one
    seed = (job.base.train.seed * 1_000_003 + have * 7919 + job.worker + host_salt()) % 2 ** 32
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    study = optuna.load_study(study_name=job.study, storage=storage, sampler=sampler,
                              pruner=make_pruner(job.pruner, job.base))
    prefix = f"[worker {job.worker}] " if job.workers > 1 else ""

    def after_trial(study, trial) -> None:
        trials = counted(study)
        finished = sum(t.state.is_finished() for t in trials)
        print(f"{prefix}[{finished}/{job.trials}] {report.trial_line(trial, job.metric)} | "
              f"{report.best_line(study, job.metric)}", flush=True)
        if trial.user_attrs.get("error_kind") == "metric":
            raise UsageError(trial.user_attrs["error"])
        if trial.state.name == "FAIL" and "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
            sys.modules["torch"].cuda.empty_cache()      # after an OOM, give the next trial the whole GPU
        if len(trials) >= job.trials:         # another machine may be running the same study
            study.stop()

    timeout = None if job.deadline is None else job.deadline - time.time()
    if have < job.trials and (timeout is None or timeout > 0):
        study.optimize(lambda trial: objective(trial, job), n_trials=job.quota, timeout=timeout, catch=(Exception,),
                       callbacks=[after_trial], gc_after_trial=True)


class Stopped(KeyboardInterrupt):
    """A trial stopped by SIGTERM or SIGHUP: Optuna marks a trial FAIL on KeyboardInterrupt, not on SystemExit;
    `code` is the exit status the signal asks for (128 + signal)."""

    def __init__(self, code) -> None:
        super().__init__(code)
        self.code = code


def worker_main() -> None:
    """A worker process (`python -c ...`, its Job as JSON on stdin): exit 130 on Ctrl-C, SIGTERM or SIGHUP (its
    running trial marked FAIL), 2 on a usage error."""
    from adaptive_sched.jobs import stop_signals_raise
    try:
        raw = json.loads(sys.stdin.read())
        with stop_signals_raise():
            work(Job(**{**raw, "base": cfg.from_dict(raw["base"]), "space": spaces.space_from_dict(raw["space"])}))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


WORKER_ENTRY = "from adaptive_sched.sweep_trials import worker_main; worker_main()"    # each worker's `python -c`
QUIET_EXITS = (0, 2, 130, -2)       # done, a usage error (printed), interrupted: any other status is a crash


class WorkerCrashed(RuntimeError):
    """A worker process ended with a status not in QUIET_EXITS (killed, or an exception outside a trial); the other
    workers were stopped. `worker` is its number, `code` its exit status (negative: the signal that killed it)."""

    def __init__(self, worker: int, code: int) -> None:
        import signal
        how = f" (killed by {signal.Signals(-code).name})" if code < 0 and -code in signal.valid_signals() else ""
        super().__init__(f"sweep worker {worker} exited with status {code}{how}; the sweep stopped, its running "
                         f"trials marked FAIL: run the same command to continue the study")
        self.worker, self.code = worker, code


def run_workers(job: Job, remaining: int) -> None:
    """K worker processes share the remaining trials (exact quotas, so the study ends at --trials); when one crashes
    the others are stopped (their running trials marked FAIL) and WorkerCrashed is raised."""
    import subprocess

    from adaptive_sched.jobs import child_env, stop_signals_raise, threads_per_job
    from adaptive_sched.run_build import resolve_device
    if not isinstance(job.pruner, str):
        raise UsageError(f"--workers > 1 needs a pruner by name ({', '.join(PRUNERS)}), not an object")
    k = job.workers
    cpu = resolve_device(job.base.train.device).type == "cpu"
    threads = threads_per_job(k) if cpu else 0
    quotas = [remaining // k + (i < remaining % k) for i in range(k)]
    env = child_env()
    numbers, procs = [], []
    for i, quota in enumerate(quotas):
        if quota == 0:
            continue
        spec = {**dataclasses.asdict(dataclasses.replace(job, quota=quota, worker=i, threads=threads)),
                "base": job.base.to_dict(), "space": spaces.space_to_dict(job.space)}
        proc = subprocess.Popen([sys.executable, "-c", WORKER_ENTRY], stdin=subprocess.PIPE, env=env, text=True)
        proc.stdin.write(json.dumps(spec))
        proc.stdin.close()
        numbers.append(i)
        procs.append(proc)
    try:
        with stop_signals_raise():              # SIGTERM/SIGHUP stop the workers too, as Ctrl-C does
            crashed = wait_workers(procs)
            if crashed is not None:             # the others: interrupted now, their running trials marked FAIL
                stop_workers(procs, signalled=False)
                raise WorkerCrashed(numbers[crashed], procs[crashed].returncode)
            codes = [proc.returncode for proc in procs]
    except KeyboardInterrupt:                   # Ctrl-C: the terminal interrupted the workers too
        stop_workers(procs, signalled=True)
        raise
    except SystemExit:                          # a signal to this process only: interrupt them now
        stop_workers(procs, signalled=False)
        raise
    if any(c in (130, -2) for c in codes):
        raise KeyboardInterrupt
    if 2 in codes:
        raise UsageError("a sweep worker stopped on the error above")


def wait_workers(procs: list, poll: float = 0.2) -> int | None:
    """Wait until every worker has exited, or one has crashed (a status not in QUIET_EXITS): return its index then."""
    while True:
        codes = [proc.poll() for proc in procs]
        for index, code in enumerate(codes):
            if code is not None and code not in QUIET_EXITS:
                return index
        if all(code is not None for code in codes):
            return None
        time.sleep(poll)


def stop_workers(procs: list, signalled: bool = True, grace: float = 15.0) -> None:
    """Stop the workers, all at once: give them `grace` seconds to mark their trials FAIL (when `signalled`: Ctrl-C
    reached them as well), then interrupt them, then terminate, then kill; each stage waits at most `grace` in all."""
    import signal
    import subprocess
    stages = [None] if signalled else []
    stages += [lambda p: p.send_signal(signal.SIGINT), lambda p: p.terminate()]
    for action in stages:
        alive = [proc for proc in procs if proc.poll() is None]
        if not alive:
            return
        for proc in alive if action is not None else ():
            action(proc)
        deadline = time.monotonic() + grace
        for proc in alive:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
