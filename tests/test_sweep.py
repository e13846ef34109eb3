"""`adaptive-sched sweep`: search spaces, resumable studies on SQLite / journal / PostgreSQL, failures, pruning,
Ctrl-C, parallel workers, and the outputs (trials.csv, best.json, best.toml that `train --config` accepts)."""
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import optuna
import pandas as pd
import pytest

from adaptive_sched import cli, config as cfg, sweep, sweep_space as spaces
from adaptive_sched.errors import UsageError

TINY = {"data": {"name": "gmm", "n": 2000, "dim": 4},
        "model": {"name": "mlp", "hidden": 64, "depth": 2},
        "train": {"steps": 60, "batch_size": 64, "warmup": 10, "log_every": 20, "checkpoint_every": 60,
                  "device": "cpu"},
        "eval": {"every": 20, "n": 300, "sample_n": 0, "logsnr_points": 5}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(schedule="laplace", **sections) -> cfg.RunConfig:
    return cfg.from_dict({**TINY, "schedule": {"name": schedule}, **sections})


def states(study) -> list[str]:
    return [t.state.name for t in sorted(study.trials, key=lambda t: t.number)]


class AlwaysPrune(optuna.pruners.BasePruner):
    """A pruner that prunes at the first report."""

    def prune(self, study, trial) -> bool:
        return True


def fake_train(fail: dict | None = None):
    """A stand-in trainer: one eval at step 20 and a value from the params; trial k raises fail[k] if given."""
    def train(config, out_dir, resume=False, progress=True, on_eval=None):
        number = int(Path(out_dir).name)
        if fail and number in fail:
            raise fail[number]
        value = (config.schedule.params["mu"] - 1) ** 2 + config.schedule.params["b"]
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        on_eval(20, {"step": 20, "eval_eps_mse": value})
        return {"step": 60, "eval_eps_mse": float("nan") if number == 3 else value}
    return train


# --- search spaces --------------------------------------------------------------------------------------------

def test_default_spaces_are_valid_at_their_ends():
    for name in spaces.sweepable():
        space = spaces.build_space(name)           # builds the schedule at every range end
        assert len(space) == 2 and all(not d.choices and d.low < d.high for d in space.values())
    laplace = spaces.build_space("laplace")
    assert laplace["mu"] == spaces.Dim(-4.0, 4.0) and laplace["b"] == spaces.Dim(0.1, 4.0, log=True)
    assert set(spaces.build_space("edm")) == {"p_mean", "p_std"}
    assert set(spaces.build_space("cosine", tune=["lr", "weighting"])) == {"shift", "scale", "lr", "weighting"}


def test_overrides_fixed_params_and_errors():
    space = spaces.build_space("laplace", overrides={"b": {"low": 0.2, "high": 2}, "lr": {"low": 1e-4, "high": 1e-3,
                                                                                        "log": True}})
    assert space["b"] == spaces.Dim(0.2, 2.0, log=True) and space["lr"].high == 1e-3
    assert set(spaces.build_space("laplace", fixed={"b": 0.5})) == {"mu"}
    space = spaces.build_space("laplace", overrides={"weighting": {"choices": ["schedule", "min-snr"]}})
    assert space["weighting"].choices == ("schedule", "min-snr")
    for overrides, message in (({"bb": {"low": 0.1, "high": 1}}, "did you mean 'b'"),
                               ({"b": {"low": 2, "high": 1}}, "low < high"),
                               ({"b": {"low": 0.0, "log": False}}, "valid laplace parameter"),
                               ({"b": {"lo": 0.1}}, "did you mean 'low'"),
                               ({"weighting": {"choices": ["min_snr"]}}, "unknown weighting")):
        with pytest.raises(UsageError, match=message):
            spaces.build_space("laplace", overrides=overrides)
    with pytest.raises(UsageError, match="fixed"):
        spaces.build_space("laplace", overrides={"b": {"high": 2}}, fixed={"b": 0.5})
    with pytest.raises(UsageError, match="no search space"):
        spaces.build_space("uniform")
    with pytest.raises(UsageError, match="did you mean 'trials'"):
        spaces.split_config({"sweep": {"trails": 3}})


def test_trial_config_applies_params():
    config = spaces.trial_config(tiny(), {"mu": 1.5, "b": 0.25, "lr": 3e-4, "weighting": "min-snr"})
    assert config.schedule.params == {"mu": 1.5, "b": 0.25} and config.train.lr == 3e-4
    assert config.weighting.name == "min-snr" and config.data.n == 2000


# --- studies ----------------------------------------------------------------------------------------------------

def test_sqlite_study_resumes_writes_outputs_and_best_toml_trains(tmp_path, capsys):
    toml = tmp_path / "sweep.toml"
    toml.write_text(cfg.dumps_toml({**TINY, "sweep": {"trials": 3, "space": {"b": {"low": 0.2, "high": 2}}}}))
    out = tmp_path / "sweep"
    args = ["--schedule", "laplace", "--config", str(toml), "--out", str(out)]
    assert sweep.main(args) == 0
    printed = capsys.readouterr().out
    assert "[3/3] trial 2" in printed and "best: trial" in printed
    frame = pd.read_csv(out / "trials.csv")
    assert list(frame["number"]) == [0, 1, 2] and set(frame["state"]) == {"COMPLETE"}
    assert frame["param_b"].between(0.2, 2).all() and frame["param_mu"].between(-4, 4).all()
    assert list(json.loads(frame["intermediate"][0])) == ["20", "40", "60"]
    for n in range(3):                          # inspectable run dirs, without the (never resumed) full states
        names = {p.name for p in (out / "trials" / str(n)).iterdir()}
        assert {"metrics.csv", "config.toml", "ema.pt"} <= names and "checkpoint.pt" not in names, names
    for name in ("optimization_history.png", "param_importances.png", "contour.png", "intermediate_values.png"):
        assert (out / name).stat().st_size > 1000, name

    assert sweep.main(args + ["--trials", "5"]) == 0            # the same command, more trials: adds exactly 2
    frame = pd.read_csv(out / "trials.csv")
    assert list(frame["number"]) == [0, 1, 2, 3, 4]
    assert sweep.main(args + ["--trials", "5"]) == 0            # nothing left to run
    assert len(pd.read_csv(out / "trials.csv")) == 5

    best = json.loads((out / "best.json").read_text())
    winner = frame.loc[frame["value"].idxmin()]
    assert best["trial"] == winner["number"] and best["value"] == pytest.approx(winner["value"])
    assert best["config"]["schedule"]["name"] == "laplace"
    assert best["config"]["schedule"]["b"] == best["params"]["b"]
    assert best["schedule_params"] == [f"mu={best['params']['mu']!r}", f"b={best['params']['b']!r}"]
    assert cfg.parse_assignments(best["schedule_params"], "--schedule-param") == best["params"]
    assert best["compare_entry"] == {"name": "laplace", "label": "laplace (tuned)", **best["params"]}
    run = tmp_path / "best_run"
    assert cli.main(["train", "--config", str(out / "best.toml"), "--out", str(run), "--quiet"]) == 0
    assert cfg.load_toml(run / "config.toml").schedule.params == best["params"]

    for name in ("trials.csv", "best.json", "contour.png"):
        (out / name).unlink()
    assert sweep.main(["--report", str(out)]) == 0                # re-rendered from storage, no training
    assert len(pd.read_csv(out / "trials.csv")) == 5 and (out / "best.json").exists() and (out / "contour.png").exists()
    capsys.readouterr()
    assert sweep.main(args + ["--trials", "6", "--steps", "80"]) == 2     # a different budget is another study
    assert "[train] steps = 60, now 80" in capsys.readouterr().err
    assert "storage" not in json.loads((out / "sweep.json").read_text())     # DIR/study.db: the folder can move
    moved = tmp_path / "elsewhere" / "sweep"
    shutil.copytree(out, moved)
    (moved / "trials.csv").unlink()
    assert sweep.main(["--report", str(moved)]) == 0                # reads the copy's own study.db
    assert len(pd.read_csv(moved / "trials.csv")) == 5
    # an older sweep.json held the absolute default path, which names the original folder after a move
    (moved / "sweep.json").write_text(json.dumps({"study": "laplace", "storage": f"sqlite:///{out / 'study.db'}"}))
    (out / "study.db").unlink()
    optuna.storages.RDBStorage(f"sqlite:///{out / 'study.db'}")     # the original now holds no study at all
    assert sweep.main(["--report", str(moved)]) == 0 and len(pd.read_csv(moved / "trials.csv")) == 5


def test_journal_storage_and_pruning(tmp_path):
    out = tmp_path / "sweep"
    url = f"journal:{tmp_path / 'journal.log'}"
    study = sweep.run_sweep(tiny("cauchy"), out, trials=2, storage=url, pruner=AlwaysPrune())
    assert states(study) == ["PRUNED", "PRUNED"]
    assert all(t.last_step == 20 for t in study.trials)                 # stopped at the first eval
    assert not (out / "best.json").exists()
    study = sweep.run_sweep(tiny("cauchy"), out, trials=3, storage=url, pruner="none")
    assert states(study) == ["PRUNED", "PRUNED", "COMPLETE"]
    assert json.loads((out / "best.json").read_text())["trial"] == 2
    assert set(pd.read_csv(out / "trials.csv")["state"]) == {"PRUNED", "COMPLETE"}


def test_failed_trials_are_recorded_and_the_study_goes_on(tmp_path, monkeypatch):
    fail = {1: UsageError("training diverged: 20 non-finite losses in a row by step 40"),
            2: RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")}
    monkeypatch.setattr("adaptive_sched.train.train", fake_train(fail))
    study = sweep.run_sweep(tiny(), tmp_path, trials=5)
    assert states(study) == ["COMPLETE", "FAIL", "FAIL", "FAIL", "COMPLETE"]
    frame = pd.read_csv(tmp_path / "trials.csv", keep_default_na=False)
    assert "training diverged" in frame["error"][1] and "out of memory" in frame["error"][2]
    assert "eval_eps_mse is nan" in frame["error"][3]
    assert "RuntimeError" in (tmp_path / "trials" / "2" / "error.txt").read_text()     # a crash keeps its traceback
    assert json.loads((tmp_path / "best.json").read_text())["trial"] in (0, 4)


def test_a_sweep_whose_every_trial_failed_exits_2_with_the_first_error(tmp_path, monkeypatch, capsys):
    fail = {i: RuntimeError(f"CUDA out of memory ({i})\nmore") for i in range(3)}
    monkeypatch.setattr("adaptive_sched.train.train", fake_train(fail))
    args = ["--schedule", "laplace", "--trials", "3", "--out", str(tmp_path), "--data", "gmm"]
    assert sweep.main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "error: all 3 trials failed; the first: CUDA out of memory (0); more"
    monkeypatch.setattr("adaptive_sched.train.train", fake_train())       # (trial 3 logs NaN: failed too)
    assert sweep.main(["--schedule", "laplace", "--trials", "5", "--out", str(tmp_path), "--data", "gmm"]) == 0


def test_a_time_budget_stops_starting_trials_and_the_same_call_continues(tmp_path, monkeypatch, capsys):
    import time
    slow, pause = fake_train(), [2.0]

    def train(*args, **kwargs):
        time.sleep(pause[0])
        return slow(*args, **kwargs)
    monkeypatch.setattr("adaptive_sched.train.train", train)
    study = sweep.run_sweep(tiny(), tmp_path, trials=6, time_budget=4.0)     # 6 trials would take 12 s
    pause[0] = 0.0
    first = len(study.trials)
    assert 1 <= first < 6 and set(states(study)) == {"COMPLETE"}      # trials that started, finished
    assert sweep.run_sweep(tiny(), tmp_path, trials=6, time_budget=0).trials == study.trials   # nothing new
    assert len(sweep.run_sweep(tiny(), tmp_path, trials=6).trials) == 6
    with pytest.raises(UsageError, match="--time-budget must be a number of seconds >= 0"):
        sweep.run_sweep(tiny(), tmp_path, trials=6, time_budget=-1)
    capsys.readouterr()
    (tmp_path / "base.toml").write_text(cfg.dumps_toml(tiny().to_dict()))
    assert cli.main(["sweep", "--config", str(tmp_path / "base.toml"), "--trials", "8", "--out", str(tmp_path),
                     "--time-budget", "0"]) == 0
    assert "time budget spent: 6 of 8 trials" in capsys.readouterr().out


def test_ctrl_c_marks_the_running_trial_failed_and_exits_130(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("adaptive_sched.train.train", fake_train({1: KeyboardInterrupt()}))
    args = ["--schedule", "laplace", "--trials", "3", "--out", str(tmp_path), "--data", "gmm"]
    assert sweep.main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    study = optuna.load_study(study_name="laplace", storage=sweep.open_storage(sweep.default_storage(tmp_path)))
    assert states(study) == ["COMPLETE", "FAIL"] and study.trials[1].user_attrs["error"] == "interrupted"
    monkeypatch.setattr("adaptive_sched.train.train", fake_train())
    capsys.readouterr()
    assert sweep.main(args) == 0                                       # the same command continues
    assert "1 of 3 trials there; running 2" in capsys.readouterr().out  # the interrupted trial is redone, not counted
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE", "FAIL"]   # (trial 3 of the stand-in diverges)
    assert len(sweep.counted(study)) == 3


def test_a_metric_the_runs_never_log_stops_the_sweep(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("adaptive_sched.train.train", fake_train())
    args = ["--schedule", "laplace", "--trials", "3", "--out", str(tmp_path), "--data", "gmm", "--metric", "eval_swd"]
    assert sweep.main(args) == 2                # (a stand-in trainer that logs no samples' distance)
    assert "eval_swd was not logged at step 20 (this run logs: eval_eps_mse)" in capsys.readouterr().err
    study = optuna.load_study(study_name="laplace", storage=sweep.open_storage(sweep.default_storage(tmp_path)))
    assert states(study) == ["FAIL"]                                # one trial, not three


def test_stale_running_trial_of_a_dead_worker_is_failed(tmp_path, monkeypatch):
    monkeypatch.setattr("adaptive_sched.train.train", fake_train())
    study = sweep.run_sweep(tiny(), tmp_path, trials=1)
    stale = study.ask()                                 # as if its worker had been killed mid-trial
    stale.set_user_attr("host", socket.gethostname())
    stale.set_user_attr("pid", 2 ** 22 + 1)             # above pid_max: no such process
    with pytest.raises(UsageError, match="created with the pruner = 'median', now 'hyperband'"):
        sweep.run_sweep(tiny(), tmp_path, trials=3, pruner="hyperband")      # a study keeps its pruner
    study = sweep.run_sweep(tiny(), tmp_path, trials=3)
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE", "FAIL"]   # the stale one does not count (3 diverges)
    assert "died" in study.trials[1].user_attrs["error"]


@pytest.mark.parametrize("args,message", [
    (["--storage", "postgresql://nobody@127.0.0.1:1/nodb"], "cannot open Optuna storage postgresql://nobody@"),
    (["--storage", "postgresql://me:secret@127.0.0.1:1/db"], "me:***@"),
    (["--storage", "postgresql://me:se/cret@127.0.0.1:1/db"], "me:***@"),     # a password with a slash
    (["--storage", "postgresql://:secret@127.0.0.1:1/db"], "//:***@"),         # and without a user name
    (["--storage", "sqlite://"], "in-memory SQLite storage"),                  # each worker would get its own
    (["--storage", "sqlite:///:memory:"], "in-memory SQLite storage"),
    (["--trials", "0"], "--trials and --workers must be >= 1, got 0"),
    (["--study", " "], "--study is empty"),
    (["--storage", "redis://localhost"], "unknown storage URL"),
    (["--storage", "journal:/no/such/folder/j.log"], "no folder"),
    (["--metric", "eval_fdi"], "did you mean 'eval_fid'"),
    (["--schedule", "flow"], "no search space"),
    (["--workers", "0"], "must be >= 1"),
    (["--metric", "eval_bpd"], "eval_bpd needs held-out examples"),          # metrics no trial could log
    (["--metric", "eval_fid"], "eval_fid needs image data and a feature network"),
    (["--metric", "eval_excess_mse", "--data", "digits"], "needs the exact denoiser of data gmm"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    base = ["--schedule", "laplace", "--trials", "1", "--out", str(tmp_path / "out"), "--data", "gmm"]
    assert sweep.main(base + args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "secret" not in lines[0]


def test_other_study_in_the_same_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("adaptive_sched.train.train", fake_train())
    sweep.run_sweep(tiny(), tmp_path, trials=1)
    with pytest.raises(UsageError, match="--study laplace"):
        sweep.run_sweep(tiny(), tmp_path, trials=1, study="other")


def test_the_same_study_name_in_another_storage_is_refused(tmp_path, monkeypatch):
    """Trial folders are numbered per study: a second study of the same name would overwrite the first's."""
    monkeypatch.setattr("adaptive_sched.train.train", fake_train())
    sweep.run_sweep(tiny(), tmp_path / "out", trials=1)
    marker = tmp_path / "out" / "trials" / "0" / "marker"
    marker.write_text("mine")
    with pytest.raises(UsageError, match="holds study 'laplace' of the storage sqlite:///.*study.db, not journal:"):
        sweep.run_sweep(tiny(), tmp_path / "out", trials=1, storage=f"journal:{tmp_path / 'j.log'}")
    assert marker.read_text() == "mine" and len(pd.read_csv(tmp_path / "out" / "trials.csv")) == 1
    assert not (tmp_path / "j.log").exists()         # the refused storage was not created
    monkeypatch.chdir(tmp_path)                      # a relative file storage is recorded as an absolute path
    sweep.run_sweep(tiny(), Path("rel"), trials=1, storage="journal:rel.log")
    assert json.loads((tmp_path / "rel" / "sweep.json").read_text())["storage"] == f"journal:{tmp_path / 'rel.log'}"
    sweep.run_sweep(tiny(), Path("rel"), trials=2, storage=f"journal:{tmp_path / 'rel.log'}")   # the same file
    assert len(pd.read_csv(tmp_path / "rel" / "trials.csv")) == 2


def test_file_storage_urls_are_made_absolute_and_a_sqlite_driver_is_read(tmp_path, monkeypatch):
    from adaptive_sched.sweep_storage import absolute_storage, open_storage
    monkeypatch.chdir(tmp_path)
    assert absolute_storage("journal:j.log") == f"journal:{tmp_path / 'j.log'}"
    assert absolute_storage("sqlite:///s.db") == f"sqlite:///{tmp_path / 's.db'}"
    assert absolute_storage("sqlite+pysqlite:///s.db") == f"sqlite+pysqlite:///{tmp_path / 's.db'}"
    for kept in ("sqlite:////abs/s.db", "sqlite:///:memory:", "postgresql://u:p@host/db"):
        assert absolute_storage(kept) == kept
    optuna.create_study(study_name="x", storage=open_storage(f"sqlite+pysqlite:///{tmp_path / 'd.db'}"))
    assert optuna.get_all_study_names(open_storage(f"sqlite:///{tmp_path / 'd.db'}")) == ["x"]


def test_machines_joining_one_study_seed_tpe_differently(monkeypatch):
    from adaptive_sched import sweep_trials
    salts = []
    for host in ("node-a", "node-b", "node-a"):
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        salts.append(sweep_trials.host_salt())
    assert salts[0] != salts[1] and salts[0] == salts[2]       # other machines differ; one machine is reproducible


@pytest.mark.slow
def test_two_cpu_workers_share_the_trials(tmp_path):
    study = sweep.run_sweep(tiny(), tmp_path, trials=3, workers=2, pruner="none")
    assert states(study) == ["COMPLETE"] * 3
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2      # two processes ran them


# --- PostgreSQL -------------------------------------------------------------------------------------------------

def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl (PATH, or Debian's /usr/lib/postgresql/<version>/bin)."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: p.parent.parent.name)
    return versions[-1].parent if versions else None


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server on a free loopback port (as the `postgres` or `nobody` user when root)."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl); install the Debian package postgresql")
    psycopg2 = pytest.importorskip("psycopg2", reason="the psycopg2 driver is missing: pip install psycopg2-binary")
    root = Path(tempfile.mkdtemp(prefix="adaptive-sched-pg-"))
    prefix = []
    if os.geteuid() == 0:                             # postgres refuses to run as root
        users = [u for u in ("postgres", "nobody") if _user_exists(u)]
        if not users or not shutil.which("runuser"):
            pytest.skip("running as root without a `postgres`/`nobody` user or runuser to start PostgreSQL as")
        entry = pwd.getpwnam(users[0])
        os.chown(root, entry.pw_uid, entry.pw_gid)
        prefix = [shutil.which("runuser"), "-u", users[0], "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    steps = [[str(bindir / "initdb"), "-D", str(data), "-U", "sweep", "-A", "trust", "--no-sync", "-E", "UTF8"],
             [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
              f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"]]
    for command in steps:
        result = subprocess.run(prefix + command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip(f"could not start PostgreSQL ({Path(command[0]).name}): {result.stderr.strip()[-300:]}")
    try:
        con = psycopg2.connect(host="127.0.0.1", port=port, user="sweep", dbname="postgres")
        con.autocommit = True
        con.cursor().execute("CREATE DATABASE optuna")
        con.close()
        yield f"postgresql://sweep@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def test_postgres_storage_with_two_workers(tmp_path, postgres_url):
    study = sweep.run_sweep(tiny("normal"), tmp_path, trials=2, storage=postgres_url, workers=2, pruner="none")
    assert states(study) == ["COMPLETE", "COMPLETE"]
    again = optuna.load_study(study_name="normal", storage=sweep.open_storage(postgres_url))
    assert len(again.trials) == 2 and {t.user_attrs["pid"] for t in again.trials} != {os.getpid()}
    assert json.loads((tmp_path / "sweep.json").read_text())["storage"] == postgres_url


def test_a_curriculum_sweep_tunes_start_and_end(tmp_path):
    """With a curriculum in the base config, the ramp's START and END are the tuned dimensions."""
    base = cfg.from_dict({**TINY, "schedule": {"name": "laplace", "curriculum": {"b": "0.3:1.5:cosine"}}})
    space = spaces.build_space("laplace", curriculum=base.schedule.curriculum)
    assert set(space) == {"mu", "b.start", "b.end"}
    narrowed = spaces.build_space("laplace", overrides={"b.end": {"low": 1.0, "high": 2.0}},
                                  curriculum=base.schedule.curriculum)
    assert (narrowed["b.end"].low, narrowed["b.end"].high) == (1.0, 2.0)
    config = spaces.trial_config(base, {"mu": 0.5, "b.start": 0.2, "b.end": 1.8})
    assert config.schedule.curriculum == {"b": "0.2:1.8:cosine"} and config.schedule.params["mu"] == 0.5
    with pytest.raises(UsageError, match="unknown key 'gamma.start'"):
        spaces.build_space("laplace", overrides={"gamma.start": {"low": 1, "high": 2}},
                           curriculum=base.schedule.curriculum)
    out = tmp_path / "sweep"
    toml = tmp_path / "sweep.toml"
    toml.write_text(cfg.dumps_toml({**TINY, "schedule": {"name": "laplace", "curriculum": {"b": "0.3:1.5"}},
                                    "sweep": {"trials": 2}}))
    assert sweep.main(["--schedule", "laplace", "--config", str(toml), "--out", str(out)]) == 0
    frame = pd.read_csv(out / "trials.csv")
    assert {"param_b.start", "param_b.end"} <= set(frame.columns) and set(frame["state"]) == {"COMPLETE"}
    metrics = pd.read_csv(out / "trials" / "0" / "metrics.csv")
    assert metrics["schedule_b"].iloc[-1] == pytest.approx(frame["param_b.end"].iloc[0])
    # best.json carries the tuned ramp in every form that can hold it: compare trains what the trial trained
    best = json.loads((out / "best.json").read_text())
    ramp = f"{best['params']['b.start']!r}:{best['params']['b.end']!r}"
    ramp_str = f"{best['params']['b.start']}:{best['params']['b.end']}"
    assert best["config"]["schedule"]["curriculum"] == {"b": ramp_str} and "b" not in best["config"]["schedule"]
    assert best["compare_entry"]["curriculum"] == {"b": ramp_str} and "b" not in best["compare_entry"]
    assert best["train_args"][-2:] == ["--curriculum", f"b={ramp_str}"] and ramp.replace("'", "") == ramp_str
    assert best["resolved_schedule"]["curriculum"] == {"b": ramp_str} and "b" not in best["resolved_schedule"]
    (tmp_path / "cmp.toml").write_text(cfg.dumps_toml(TINY) + f'[compare]\nseeds = [0]\nschedules = [{{ best = '
                                       f'"{out / "best.json"}" }}]\n')
    from adaptive_sched.compare import parse as parse_compare, run_config
    plan = parse_compare(tmp_path / "cmp.toml")
    trained = run_config(plan.base, plan.entries[0], 0)
    assert trained.schedule.curriculum == {"b": ramp_str} and trained.schedule.params["mu"] == best["params"]["mu"]


def test_best_json_keeps_a_tuned_window(tmp_path):
    toml = tmp_path / "sweep.toml"
    toml.write_text(cfg.dumps_toml({**TINY, "sweep": {"trials": 1, "space": {"logsnr_min": {"low": -9, "high": -8}}}}))
    out = tmp_path / "sweep"
    assert sweep.main(["--schedule", "laplace", "--config", str(toml), "--out", str(out)]) == 0
    best = json.loads((out / "best.json").read_text())
    low = best["params"]["logsnr_min"]
    assert -9 <= low <= -8 and best["compare_entry"]["logsnr_min"] == low
    assert f"logsnr_min={low!r}" in best["schedule_params"] and f"logsnr_min={low!r}" in best["train_args"]
    assert cli.resolve_config(cli.make_parser().parse_args(["train", *best["train_args"]])).schedule.logsnr_min == low


def test_a_study_stored_before_newer_config_keys_continues():
    """Settings stored by an older version lack keys added since (compile, channels_last, clip_x0): a missing key
    reads as its default, as a resumed run's config does; a key whose stored value differs still refuses."""
    from adaptive_sched.sweep_storage import check_settings, settings_of
    base = cfg.RunConfig()
    current = settings_of(base, {}, "eval_fid")
    old = json.loads(json.dumps(current))
    del old["base"]["eval"]["clip_x0"]
    old["base"]["train"].pop("channels_last", None)
    old["base"]["train"].pop("compile", None)
    check_settings(old, current, "s")
    old["base"]["eval"]["sample_steps"] = 7
    with pytest.raises(UsageError, match=r"\[eval\] sample_steps = 7"):
        check_settings(old, current, "s")


def test_speed_options_do_not_split_a_study():
    from adaptive_sched.sweep_storage import check_settings, settings_of
    plain, fast = cfg.RunConfig(), cfg.RunConfig()
    fast.train.compile, fast.train.channels_last = True, True
    check_settings(settings_of(plain, {}, "eval_fid"), settings_of(fast, {}, "eval_fid"), "s")


def test_a_study_stored_while_compile_was_compared_ignores_it_now():
    from adaptive_sched.sweep_storage import check_settings, settings_of
    current = settings_of(cfg.RunConfig(), {}, "eval_fid")
    old = json.loads(json.dumps(current))
    old["base"]["train"]["compile"] = False                 # stored by the version that still compared it
    check_settings(old, current, "s")


def test_a_sqlite_url_with_a_query_opens_its_file_in_wal_mode(tmp_path, monkeypatch):
    import sqlite3
    from adaptive_sched.sweep_storage import absolute_storage, open_storage
    optuna.create_study(study_name="q", storage=open_storage(f"sqlite:///{tmp_path / 'q.db'}?timeout=5"))
    assert sorted(p.name for p in tmp_path.iterdir() if "?" in p.name) == []        # no file named q.db?timeout=5
    assert sqlite3.connect(tmp_path / "q.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    monkeypatch.chdir(tmp_path)
    assert absolute_storage("sqlite:///q.db?timeout=5") == f"sqlite:///{tmp_path / 'q.db'}?timeout=5"


def test_a_study_that_sweep_did_not_make_is_refused_not_adopted(tmp_path, monkeypatch, capsys):
    """On a shared database a study named like the schedule may be someone else's: its trials would count towards
    --trials, and the report failed on them with a traceback."""
    monkeypatch.setattr("adaptive_sched.train.train", fake_train())
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    foreign = optuna.create_study(study_name="laplace", storage=sweep.open_storage(storage))
    foreign.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    with pytest.raises(UsageError, match="holds 2 trial\\(s\\) that `adaptive-sched sweep` did not make"):
        sweep.run_sweep(tiny(), tmp_path / "out", trials=3, storage=storage)
    assert len(foreign.trials) == 2
    assert cli.main(["sweep", "--report", str(tmp_path / "out"), "--storage", storage, "--study", "laplace"]) == 2
    assert "was not made by `adaptive-sched sweep`" in capsys.readouterr().err
    empty = optuna.create_study(study_name="mine", storage=sweep.open_storage(storage))   # no trials: adopted
    assert len(sweep.run_sweep(tiny(), tmp_path / "mine", trials=1, storage=storage, study="mine").trials) == 1
    assert "sweep" in empty.user_attrs or "sweep" in optuna.load_study(
        study_name="mine", storage=sweep.open_storage(storage)).user_attrs


def test_report_refuses_every_run_option_it_would_not_use(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("adaptive_sched.train.train", fake_train())
    sweep.run_sweep(tiny(), tmp_path, trials=1)
    for option in (["--lr", "0.5"], ["--seed", "9"], ["--schedule-param", "b=1"], ["--eval-every", "5"]):
        assert cli.main(["sweep", "--report", str(tmp_path), *option]) == 2, option
        assert f"{option[0]} would not be used" in capsys.readouterr().err
    assert cli.main(["sweep", "--report", str(tmp_path)]) == 0


def test_a_studys_data_folder_may_move_between_machines():
    """data_dir says where the files are, not which data: a study continued on a machine that keeps Fashion-MNIST
    elsewhere is the same study."""
    from adaptive_sched.sweep_storage import check_settings, settings_of
    space = spaces.build_space("laplace", [])
    here, there = (cfg.from_dict({**TINY, "data": {"name": "fashion-mnist", "data_dir": d},
                                  "schedule": {"name": "laplace"}}) for d in ("/data/a", "/mnt/b"))
    check_settings(settings_of(here, space, "eval_fid", pruner="median"),
                   settings_of(there, space, "eval_fid", pruner="median"), "laplace")
    with pytest.raises(UsageError, match="pruner"):
        check_settings(settings_of(here, space, "eval_fid", pruner="median"),
                       settings_of(here, space, "eval_fid", pruner="none"), "laplace")
    check_settings(settings_of(here, space, "eval_fid"), settings_of(here, space, "eval_fid", pruner="none"),
                   "laplace")                           # a study stored before the pruner was recorded


SIGTERM_SWEEP = """
import sys, time
from pathlib import Path
from adaptive_sched import sweep

def slow(config, out_dir, resume=False, progress=True, on_eval=None):
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "started").write_text("")
    time.sleep(60)

import adaptive_sched.train
adaptive_sched.train.train = slow
sys.exit(sweep.main(["--schedule", "laplace", "--trials", "2", "--out", sys.argv[1], "--data", "gmm"]))
"""


def test_sigterm_to_a_one_worker_sweep_marks_its_trial_failed_and_frees_it(tmp_path):
    """The trial stayed RUNNING (Optuna fails a trial on KeyboardInterrupt, not on SystemExit) and counted."""
    import signal
    import sys
    import time
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SWEEP, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if (tmp_path / "trials" / "0" / "started").exists():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted: the running trials are marked FAIL" in err
    study = optuna.load_study(study_name="laplace", storage=sweep.open_storage(sweep.default_storage(tmp_path)))
    assert states(study) == ["FAIL"] and study.trials[0].user_attrs["error"] == "interrupted"
    assert sweep.counted(study) == []


def test_stopping_workers_interrupts_them_all_at_once():
    """After SIGTERM to the sweep, each worker got 15 s of waiting and 15 s after SIGINT in turn: four workers took
    over a minute, past a scheduler's grace period."""
    import sys
    import time
    from adaptive_sched.sweep_trials import stop_workers
    stubborn = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print(flush=True); time.sleep(60)"
    procs = [subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    for proc in procs:
        proc.stdout.readline()                               # its handler is set
    start = time.monotonic()
    stop_workers(procs, signalled=False, grace=1.0)          # SIGINT (ignored), then SIGTERM ends them
    assert time.monotonic() - start < 3.0 and all(proc.poll() is not None for proc in procs)


def test_a_missing_database_driver_is_not_blamed_on_the_server(tmp_path, capsys):
    args = ["--schedule", "laplace", "--trials", "1", "--out", str(tmp_path), "--data", "gmm",
            "--storage", "mysql://u@127.0.0.1:1/db"]               # no MySQL driver is installed here
    assert sweep.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "install" in err and "server running" not in err and len(err.splitlines()) == 1
