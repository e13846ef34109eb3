"""Multi-objective sweeps (`sweep --target-value V`): steps to target, the two objectives against each trial's
own metrics.csv, the Pareto front in best.json, resuming, refusals, and `--report`."""
import csv
import json
from pathlib import Path

import optuna
import pandas as pd
import pytest

from adaptive_sched import config as cfg, sweep, sweep_space as spaces
from adaptive_sched.errors import UsageError
from adaptive_sched.sweep_pareto import steps_to_target

STEPS, EVERY, TARGET = 40, 20, 0.73          # gmm evals here read ~0.85 at step 20 and ~0.72-0.75 at step 40
TINY = {"data": {"name": "gmm", "n": 2000, "dim": 4},
        "model": {"name": "mlp", "hidden": 64, "depth": 2},
        "train": {"steps": STEPS, "batch_size": 64, "warmup": 10, "log_every": EVERY, "checkpoint_every": STEPS,
                  "device": "cpu"},
        "eval": {"every": EVERY, "n": 300, "sample_n": 0, "logsnr_points": 5}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def own_objectives(run_dir: Path, metric: str = "eval_eps_mse") -> tuple[float, int]:
    """(metric at the budget, first eval step with metric <= TARGET or STEPS + EVERY) from a run's metrics.csv."""
    with open(run_dir / "metrics.csv", newline="") as f:
        evals = [(int(r["step"]), float(r[metric])) for r in csv.DictReader(f) if r[metric] != ""]
    assert [s for s, _ in evals] == list(range(EVERY, STEPS + 1, EVERY))
    reached = [s for s, v in evals if v <= TARGET]
    return evals[-1][1], reached[0] if reached else STEPS + EVERY


def dominates(a, b) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


# --- steps to target, a pure function ---------------------------------------------------------------------------

def test_steps_to_target_is_the_first_eval_at_or_below_the_target():
    evals = {20: 0.9, 40: 0.5, 60: 0.4}
    assert steps_to_target(evals, 0.5, 60, 20) == 40          # exactly the target counts
    assert steps_to_target(evals, 0.49, 60, 20) == 60
    assert steps_to_target(evals, 1.0, 60, 20) == 20
    assert steps_to_target({60: 0.1, 20: 0.9, 40: 0.2}, 0.3, 60, 20) == 40      # by step, not by insertion
    assert steps_to_target({20: 0.9, 40: 0.5, 60: 0.4}, 0.1, 60, 20) == 80      # not reached: steps + every
    assert steps_to_target({20: 0.9, 40: 0.8, 50: 0.7}, 0.1, 50, 20) == 70      # a budget off the eval grid
    assert steps_to_target({}, 0.1, 60, 20) == 80
    assert steps_to_target({20: 0.4, 40: 0.6}, 0.5, 40, 20) == 20               # later rises do not matter


def test_target_in_the_sweep_section_is_validated():
    assert spaces.split_config({"sweep": {"target": 0.05}})[1]["target"] == 0.05
    assert spaces.split_config({"sweep": {"target": 1}})[1]["target"] == 1
    for bad in ("0.05", True, float("nan")):
        with pytest.raises(UsageError, match=r"\[sweep\] target must be a finite number"):
            spaces.split_config({"sweep": {"target": bad}})


# --- a tiny multi-objective study on the gmm --------------------------------------------------------------------

def test_multi_objective_study_front_resume_refusals_and_report(tmp_path, capsys):
    toml = tmp_path / "sweep.toml"
    toml.write_text(cfg.dumps_toml({**TINY, "sweep": {"trials": 4, "target": TARGET}}))
    out = tmp_path / "sweep"
    args = ["--schedule", "laplace", "--config", str(toml), "--out", str(out)]
    assert sweep.main(args) == 0
    printed = capsys.readouterr().out
    assert f"steps to eval_eps_mse <= {TARGET:g}" in printed and "no pruning" in printed
    assert "[4/4] trial 3 COMPLETE eval_eps_mse=" in printed and "steps_to_target=" in printed
    assert "| front: " in printed

    store = sweep.open_storage(sweep.default_storage(out))
    study = optuna.load_study(study_name="laplace", storage=store)
    assert len(study.directions) == 2 and all(d.name == "MINIMIZE" for d in study.directions)
    assert all(not t.intermediate_values for t in study.trials)             # multi-objective: never reported
    assert json.loads((out / "sweep.json").read_text())["target"] == TARGET

    # trials.csv: both objectives, each as the trial's own metrics.csv gives it
    frame = pd.read_csv(out / "trials.csv")
    assert list(frame["number"]) == [0, 1, 2, 3] and set(frame["state"]) == {"COMPLETE"}
    for _, row in frame.iterrows():
        metric, steps = own_objectives(out / "trials" / str(row["number"]))
        assert row["value"] == row["value_metric"] == pytest.approx(metric, rel=1e-12, abs=0)
        assert row["value_steps_to_target"] == steps
        assert sorted(int(s) for s in json.loads(row["intermediate"])) == [20, 40]

    # best.json: the Pareto front, non-dominated and complete
    best = json.loads((out / "best.json").read_text())
    assert best["target"] == TARGET and best["not_reached_value"] == STEPS + EVERY
    points = {int(r["number"]): (r["value_metric"], r["value_steps_to_target"]) for _, r in frame.iterrows()}
    front = {e["trial"] for e in best["front"]}
    expected = {n for n, p in points.items() if not any(dominates(q, p) for m, q in points.items() if m != n)}
    assert front == expected and front
    for entry in best["front"]:
        assert entry["value_metric"] == pytest.approx(points[entry["trial"]][0], rel=1e-12, abs=0)
        assert entry["value_steps_to_target"] == points[entry["trial"]][1]
        assert entry["reached_target"] == (entry["value_steps_to_target"] <= STEPS)
        assert cfg.parse_assignments(entry["schedule_params"], "--schedule-param") == entry["params"]
        assert entry["config"]["schedule"]["mu"] == entry["params"]["mu"]
    metrics = [e["value_metric"] for e in best["front"]]
    assert metrics == sorted(metrics) and best["lowest_metric_trial"] == best["front"][0]["trial"]
    assert min(metrics) == frame["value_metric"].min()            # the lowest metric is always on the front

    # best.toml: the front's lowest-metric trial, a config `train --config` reads
    header = (out / "best.toml").read_text().splitlines()[0]
    assert f"trial {best['front'][0]['trial']} " in header and "lowest eval_eps_mse" in header
    assert cfg.load_toml(out / "best.toml").schedule.params == best["front"][0]["params"]
    for name in ("pareto_front.png", "optimization_history.png", "param_importances.png", "contour.png",
                 "intermediate_values.png"):
        assert (out / name).stat().st_size > 1000, name

    # the same command with more trials continues the study
    assert sweep.main(args + ["--trials", "5"]) == 0
    assert list(pd.read_csv(out / "trials.csv")["number"]) == [0, 1, 2, 3, 4]
    assert len(study.trials) == 5 and len(study.trials[4].values) == 2

    # refusals: another target, no target, a pruner; each before any trial runs
    capsys.readouterr()
    assert sweep.main(args + ["--trials", "6", "--target-value", "0.5"]) == 2
    assert f"created with target = {TARGET}, now with target = 0.5" in one_error_line(capsys)
    plain = tmp_path / "plain.toml"
    plain.write_text(cfg.dumps_toml(TINY))
    assert sweep.main(["--schedule", "laplace", "--config", str(plain), "--out", str(out), "--trials", "6"]) == 2
    assert "now without a target (single-objective)" in one_error_line(capsys)
    assert sweep.main(args + ["--trials", "6", "--pruner", "median"]) == 2
    assert "Optuna cannot prune a multi-objective study" in one_error_line(capsys)
    assert len(study.trials) == 5 and json.loads((out / "sweep.json").read_text())["target"] == TARGET

    # --report re-renders the multi-objective outputs from storage
    before = (out / "best.json").read_text()
    for name in ("trials.csv", "best.json", "best.toml", "pareto_front.png"):
        (out / name).unlink()
    assert sweep.main(["--report", str(out)]) == 0
    assert (out / "best.json").read_text() == before and (out / "pareto_front.png").exists()
    assert "value_steps_to_target" in pd.read_csv(out / "trials.csv").columns and (out / "best.toml").exists()


def test_pruners_with_a_target_are_refused_and_the_default_is_none(tmp_path, monkeypatch):
    base = cfg.from_dict({**TINY, "schedule": {"name": "laplace"}})
    for pruner in ("median", "hyperband", optuna.pruners.MedianPruner()):
        with pytest.raises(UsageError, match="cannot prune"):
            sweep.run_sweep(base, tmp_path, trials=1, pruner=pruner, target=0.5)
    with pytest.raises(UsageError, match="finite number"):
        sweep.run_sweep(base, tmp_path, trials=1, target=float("inf"))
    assert not (tmp_path / "sweep.json").exists()

    def fake_train(config, out_dir, resume=False, progress=True, on_eval=None):
        """Two evals from the params; trial 1 diverges."""
        if Path(out_dir).name == "1":
            raise UsageError("training diverged")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        mu, b = config.schedule.params["mu"], config.schedule.params["b"]
        on_eval(20, {"step": 20, "eval_eps_mse": abs(mu)})
        on_eval(40, {"step": 40, "eval_eps_mse": b})
        return {"step": 40, "eval_eps_mse": b}
    monkeypatch.setattr("adaptive_sched.train.train", fake_train)
    study = sweep.run_sweep(base, tmp_path, trials=4, target=1.0, pruner="none")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    for t in study.trials:
        if t.state.name == "COMPLETE":
            mu, b = t.params["mu"], t.params["b"]
            assert t.values == [b, 20 if abs(mu) <= 1 else 40 if b <= 1 else 60]
    frame = pd.read_csv(tmp_path / "trials.csv", keep_default_na=False)
    assert frame["value_steps_to_target"][1] == "" and "training diverged" in frame["error"][1]
    points = {t.number: tuple(t.values) for t in study.trials if t.state.name == "COMPLETE"}
    expected = {n for n, p in points.items() if not any(dominates(q, p) for q in points.values())}
    assert {e["trial"] for e in json.loads((tmp_path / "best.json").read_text())["front"]} == expected
    assert (tmp_path / "pareto_front.png").exists()
