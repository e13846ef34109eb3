"""Sweep workers: a crashed worker process stops the sweep with a one-line error (time budget or not), and workers
that decide at the same moment to start a trial do not run the study past --trials."""
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from adaptive_sched import config as cfg, sweep, sweep_trials
from adaptive_sched.sweep_storage import counted
from test_sweep import TINY, states

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A worker entry (sweep_trials.WORKER_ENTRY) whose training waits until both workers are in a trial; then worker 1
# dies (SIGKILL) and worker 0 trains on (30 s, then completes).
DYING_WORKER = r"""
import io, json, os, signal, sys, time
from pathlib import Path
raw = sys.stdin.read()
job = json.loads(raw)

def train(config, out_dir, resume=False, progress=True, on_eval=None):
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "started").write_text(str(os.getpid()))
    while len(list((Path(job["out"]) / "trials").glob("*/started"))) < 2:
        time.sleep(0.05)
    if job["worker"] == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)
    on_eval(20, {"step": 20, "eval_eps_mse": 1.0})
    return {"step": 60, "eval_eps_mse": 1.0}

import adaptive_sched.train
adaptive_sched.train.train = train
sys.stdin = io.StringIO(raw)
from adaptive_sched.sweep_trials import worker_main
worker_main()
"""


def test_a_crashed_worker_stops_the_sweep_with_one_line_even_with_a_time_budget(tmp_path, monkeypatch, capsys):
    """It printed a warning, then 'time budget spent', and exited 0; the other worker ran on to its end."""
    monkeypatch.setattr(sweep_trials, "WORKER_ENTRY", DYING_WORKER)
    (tmp_path / "base.toml").write_text(cfg.dumps_toml({**TINY, "schedule": {"name": "laplace"}}))
    out = tmp_path / "sweep"
    code = sweep.main(["--config", str(tmp_path / "base.toml"), "--trials", "2", "--workers", "2", "--out", str(out),
                       "--time-budget", "600"])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith(("error", "warning"))]
    assert code == 1 and "time budget spent" not in captured.out
    assert errors == ["error: sweep worker 1 exited with status -9 (killed by SIGKILL); the sweep stopped, its "
                      "running trials marked FAIL: run the same command to continue the study"]
    study = optuna.load_study(study_name="laplace", storage=sweep.open_storage(sweep.default_storage(out)))
    assert states(study) == ["FAIL", "FAIL"]
    by_pid = {t.user_attrs["pid"]: t for t in study.trials}
    started = {int((out / "trials" / str(t.number) / "started").read_text()) for t in study.trials}
    assert set(by_pid) == started
    messages = sorted(t.user_attrs["error"] for t in study.trials)
    dead = next(pid for pid, t in by_pid.items() if t.user_attrs["error"].startswith("stale:"))
    assert messages == ["interrupted", f"stale: its worker (pid {dead}) died"]      # worker 0 was stopped mid-trial
    assert counted(study) == []                              # both are redone by the same command
    frame = pd.read_csv(out / "trials.csv")                  # the report is written from the consistent study
    assert list(frame["state"]) == ["FAIL", "FAIL"] and sorted(frame["error"]) == messages


# Two workers (processes) on one SQLite study of --trials 1, each let through the start check (both count 0 trials)
# before either creates its trial: the race between machines, made certain.
RACING_WORKER = r"""
import sys, time
from pathlib import Path
import optuna
from adaptive_sched import config as cfg, sweep_space as spaces, sweep_trials
out, me = Path(sys.argv[1]), int(sys.argv[2])
tpe = optuna.samplers.TPESampler

def after_both_counted(*args, **kwargs):
    if kwargs.get("constant_liar"):         # work's own sampler, made after the count (load_study makes one before)
        (out / f"ready-{me}").write_text("")
        while len(list(out.glob("ready-*"))) < 2:
            time.sleep(0.05)
    return tpe(*args, **kwargs)

def train(config, out_dir, resume=False, progress=True, on_eval=None):
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    on_eval(20, {"step": 20, "eval_eps_mse": 1.0})
    return {"step": 60, "eval_eps_mse": 1.0}

optuna.samplers.TPESampler = after_both_counted
import adaptive_sched.train
adaptive_sched.train.train = train
base = cfg.from_dict({"schedule": {"name": "laplace"}, "data": {"name": "gmm"}, "train": {"steps": 60}})
sweep_trials.work(sweep_trials.Job(f"sqlite:///{out / 'study.db'}", "race", base, spaces.build_space("laplace"),
                                   "eval_eps_mse", "none", str(out), trials=1, quota=1, worker=me))
"""


def test_two_processes_starting_at_once_do_not_run_past_the_trials(tmp_path):
    """Both counted 0 of 1 and both ran a trial: the study held 2 of --trials 1."""
    optuna.create_study(study_name="race", storage=sweep.open_storage(f"sqlite:///{tmp_path / 'study.db'}"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", RACING_WORKER, str(tmp_path), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    study = optuna.load_study(study_name="race", storage=sweep.open_storage(f"sqlite:///{tmp_path / 'study.db'}"))
    assert states(study) == ["COMPLETE", "FAIL"]             # the later-numbered one is the surplus
    assert study.trials[0].value == 1.0 and study.trials[1].params == {}      # it drew nothing
    assert study.trials[1].user_attrs["error"] == ("surplus: the study already held --trials 1 when this trial "
                                                   "started")
    assert [t.number for t in counted(study)] == [0]
    printed = "".join(out for out, _ in outputs)
    assert "trial 1 FAIL" in printed and "surplus" in printed
