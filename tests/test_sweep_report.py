"""A sweep's report: pruned trials are not ranked as results (trials.csv, best.json, plots), and a best value at the
edge of its search range carries a warning (best.json, best.toml, the printed summary)."""
import json
import math
from pathlib import Path

import optuna
import pandas as pd
import pytest

from adaptive_sched import sweep, sweep_space as spaces
from test_sweep import fake_train, states, tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class PruneOdd(optuna.pruners.BasePruner):
    """Prunes the odd-numbered trials at their first report."""

    def prune(self, study, trial) -> bool:
        return trial.number % 2 == 1


def train_low_when_pruned(config, out_dir, resume=False, progress=True, on_eval=None):
    """Odd trials report 0.01 at step 20 (lower than any final value) and are pruned there; even ones end at 1 + b."""
    number = int(Path(out_dir).name)
    final = 1.0 + config.schedule.params["b"]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    on_eval(20, {"step": 20, "eval_eps_mse": 0.01 if number % 2 else 2.0 + final})
    return {"step": 60, "eval_eps_mse": final}


# --- pruned trials ----------------------------------------------------------------------------------------------

def test_a_pruned_trials_last_report_is_not_its_value_nor_ranked(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("adaptive_sched.train.train", train_low_when_pruned)
    study = sweep.run_sweep(tiny(), tmp_path, trials=4, pruner=PruneOdd())
    assert states(study) == ["COMPLETE", "PRUNED", "COMPLETE", "PRUNED"]
    assert study.trials[1].value == 0.01                 # Optuna stores the last report as a pruned trial's value
    for rendered in ("by the sweep", "by sweep --report"):
        frame = pd.read_csv(tmp_path / "trials.csv")
        pruned, done = frame[frame["state"] == "PRUNED"], frame[frame["state"] == "COMPLETE"]
        assert pruned["value"].isna().all(), rendered                        # blank, not 0.01
        assert list(pruned["last_intermediate"]) == [0.01, 0.01] and list(pruned["pruned_at_step"]) == [20, 20]
        for _, row in done.iterrows():
            b = study.trials[int(row["number"])].params["b"]
            assert row["value"] == pytest.approx(1.0 + b, rel=1e-12)
            assert row["last_intermediate"] == pytest.approx(3.0 + b, rel=1e-12) and math.isnan(row["pruned_at_step"])
        winner = frame.loc[frame["value"].idxmin()]                          # a naive ranking picks a complete trial
        assert winner["state"] == "COMPLETE" and winner["value"] == pytest.approx(done["value"].min())
        best = json.loads((tmp_path / "best.json").read_text())
        assert best["trial"] == int(winner["number"]) and best["value"] == pytest.approx(winner["value"])
        printed = capsys.readouterr().out
        assert f"best: trial {best['trial']} eval_eps_mse={best['value']:.5g}" in printed
        for name in ("trials.csv", "best.json"):
            (tmp_path / name).unlink()
        assert sweep.main(["--report", str(tmp_path)]) == 0


def test_a_failed_trials_row_has_no_value_and_no_pruned_step(tmp_path, monkeypatch):
    monkeypatch.setattr("adaptive_sched.train.train", fake_train({1: RuntimeError("boom")}))
    sweep.run_sweep(tiny(), tmp_path, trials=2, pruner="none")
    frame = pd.read_csv(tmp_path / "trials.csv", keep_default_na=False)
    assert list(frame["state"]) == ["COMPLETE", "FAIL"]
    assert frame["pruned_at_step"].tolist() == ["", ""] and frame["last_intermediate"][1] == ""
    assert frame["value"][1] == "" and frame["last_intermediate"][0] != ""


# --- a best value at the edge of its range ----------------------------------------------------------------------

def test_edge_warnings_name_the_parameter_the_edge_and_the_range():
    laplace = spaces.build_space("laplace", tune=["lr", "weighting"])
    # the committed digits Laplace study (results/sweep-digits-cpu/laplace/best.json): b is 5.8% in, in log space
    digits = {"mu": -0.07326595797882428, "b": 0.12398341362918304, "weighting": "eps", "lr": 1e-3}
    assert spaces.edge_warnings(digits, laplace) == [
        "b = 0.124 is at the low edge of its range [0.1, 4] log: widen the range ([sweep.space] b)"]
    assert spaces.edge_warnings(digits, laplace, within=0.05) == []
    assert spaces.edge_warnings({"mu": 3.7, "b": 3.0}, laplace) == [       # 3.75% linear; 7.8% of log(40)
        "mu = 3.7 is at the high edge of its range [-4, 4]: widen the range ([sweep.space] mu)",
        "b = 3 is at the high edge of its range [0.1, 4] log: widen the range ([sweep.space] b)"]
    assert spaces.edge_warnings({"mu": 3.1, "b": 2.0, "lr": 1.2e-4}, laplace) == [       # 11%, 19%: inside
        "lr = 0.00012 is at the low edge of its range [0.0001, 0.01] log: widen the range ([sweep.space] lr)"]
    assert spaces.edge_warnings({"mu": -4.0}, laplace) == [
        "mu = -4 is at the low edge of its range [-4, 4]: widen the range ([sweep.space] mu)"]
    assert spaces.edge_warnings({"mu": 0.0, "b": math.sqrt(0.4)}, laplace) == []          # the middle; b fixed
    narrow = {"x": spaces.Dim(0.0, 1.0)}
    assert spaces.edge_warnings({"x": 0.5}, narrow, within=0.5) == [
        "x = 0.5 is at the low edge of its range [0, 1]: widen the range ([sweep.space] x)",
        "x = 0.5 is at the high edge of its range [0, 1]: widen the range ([sweep.space] x)"]


def test_best_json_best_toml_and_the_summary_warn_of_a_best_at_the_edge(tmp_path, monkeypatch, capsys):
    def train(config, out_dir, resume=False, progress=True, on_eval=None):
        """The metric is b: the enqueued trial (b = 0.101) wins."""
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        b = config.schedule.params["b"]
        on_eval(20, {"step": 20, "eval_eps_mse": b})
        return {"step": 60, "eval_eps_mse": b}
    monkeypatch.setattr("adaptive_sched.train.train", train)
    store = sweep.open_storage(sweep.default_storage(tmp_path))
    for target, out in ((None, tmp_path), (5.0, tmp_path / "multi")):
        storage = sweep.default_storage(tmp_path)
        study = sweep.run_sweep(tiny(), out, trials=1, storage=storage, study=f"s{target}", target=target,
                                space={"b": {"low": 0.1, "high": 4.0, "log": False}} if target is None else None)
        optuna.load_study(study_name=study.study_name, storage=store).enqueue_trial({"mu": 0.0, "b": 0.101})
        capsys.readouterr()
        study = sweep.run_sweep(tiny(), out, trials=2, storage=storage, study=f"s{target}", target=target,
                                space={"b": {"low": 0.1, "high": 4.0, "log": False}} if target is None else None)
        assert study.trials[1].params == {"mu": 0.0, "b": 0.101}
        best = json.loads((out / "best.json").read_text())
        if target is None:               # a linear range this time: 0.001 of 3.9 in
            warning = "b = 0.101 is at the low edge of its range [0.1, 4]: widen the range ([sweep.space] b)"
            assert best["trial"] == 1 and best["warnings"] == [warning]
            printed = warning
        else:
            warning = "b = 0.101 is at the low edge of its range [0.1, 4] log: widen the range ([sweep.space] b)"
            top = best["front"][0]
            assert top["trial"] == 1 and top["warnings"] == [warning]
            printed = f"trial 1: {warning}"
        assert f"# warning: {warning}\n" in (out / "best.toml").read_text()
        assert f"warning: {printed}" in capsys.readouterr().err.splitlines()
