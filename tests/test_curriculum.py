"""Dynamic schedules: ramp shapes and endpoints, the schedule a step sees, exact resume mid-curriculum."""
import json
import math

import pandas as pd
import pytest
import torch

from adaptive_sched import config as cfg
from adaptive_sched.compare import parse as parse_compare
from adaptive_sched.curriculum import Ramp, parse, parse_ramp, progress, values_at
from adaptive_sched.errors import UsageError
from adaptive_sched.export import export
from adaptive_sched.grid_cli import grid_for_run
from adaptive_sched.run_build import build_schedule, schedule_at
from adaptive_sched.train import train


@pytest.mark.parametrize("shape,g", [("linear", lambda p: p), ("cosine", lambda p: (1 - math.cos(math.pi * p)) / 2),
                                     ("sinusoidal", lambda p: math.sin(math.pi * p / 2))])
def test_ramp_shapes_hit_both_ends_and_follow_their_formula(shape, g):
    ramp = Ramp(0.3, 1.5, shape)
    assert ramp.value(0.0) == 0.3 and ramp.value(1.0) == pytest.approx(1.5, abs=1e-15)
    for p in (0.1, 0.25, 0.5, 0.9):
        assert ramp.value(p) == pytest.approx(0.3 + 1.2 * g(p), abs=1e-15)
    assert ramp.value(-1) == 0.3 and ramp.value(2) == pytest.approx(1.5)       # clamped


def test_specs_parse_from_cli_strings_and_toml_lists():
    assert parse_ramp("b", "0.3:1.5:cosine") == Ramp(0.3, 1.5, "cosine")
    assert parse_ramp("mu", [1, -1]) == Ramp(1.0, -1.0, "linear")
    for bad, message in (("0.3", "START:END"), ("a:1", "numbers"), ("0:1:fast", "unknown shape"),
                         ("0:inf", "finite")):
        with pytest.raises(UsageError, match=message):
            parse_ramp("b", bad)
    assert progress(0, 100) == 0 and progress(99, 100) == 1 and progress(0, 1) == 0
    assert values_at(parse({"b": "0.3:1.5"}), 99, 100) == {"b": 1.5}


def test_the_schedule_at_a_step_carries_the_ramped_parameter():
    s = cfg.ScheduleConfig("laplace", params={"mu": 1.0}, curriculum={"b": "0.3:1.5"})
    assert schedule_at(s, 0, 11).params() == {"mu": 1.0, "b": 0.3}
    assert schedule_at(s, 5, 11).params()["b"] == pytest.approx(0.9)
    assert schedule_at(s, 10, 11).params()["b"] == pytest.approx(1.5)
    with pytest.raises(UsageError, match="has no parameter 'beta'"):
        build_schedule(cfg.ScheduleConfig("laplace", curriculum={"beta": "0.3:1.5"}))
    with pytest.raises(UsageError, match="must be > 0"):
        build_schedule(cfg.ScheduleConfig("laplace", curriculum={"b": "1:-1"}))     # the end is invalid
    with pytest.raises(UsageError, match="learns its own"):
        build_schedule(cfg.ScheduleConfig("learned", curriculum={"b": "1:2"}))
    with pytest.raises(UsageError, match=r"laplace b is given both as a value \(0.7\) and by a curriculum "
                                         r"\(0.3:1.5:linear\)"):     # the value was recorded, the ramp trained
        build_schedule(cfg.ScheduleConfig("laplace", params={"b": 0.7}, curriculum={"b": "0.3:1.5"}))
    with pytest.raises(UsageError, match="polynomial levels takes whole numbers"):     # failed at step 2, mid-run
        build_schedule(cfg.ScheduleConfig("polynomial", curriculum={"levels": "2:10"}))


def curriculum_config(steps):
    return cfg.from_dict({"data": {"name": "gmm", "n": 2000, "dim": 4},
                          "schedule": {"name": "laplace", "curriculum": {"b": "0.3:1.5:sinusoidal",
                                                                         "mu": "1:-1"}},
                          "model": {"name": "mlp", "hidden": 32, "depth": 1},
                          "train": {"steps": steps, "batch_size": 64, "log_every": 10, "checkpoint_every": 20,
                                    "target": "v"},
                          "eval": {"every": 20, "n": 100, "sample_n": 0, "logsnr_points": 3}})


def test_resume_mid_curriculum_replays_it_exactly(tmp_path):
    straight = curriculum_config(60)
    train(straight, tmp_path / "a", progress=False)
    with pytest.raises(Stop):                          # interrupted at step 40 (its state is saved first)
        train(curriculum_config(60), tmp_path / "b", progress=False, on_eval=stop_at(40))
    train(curriculum_config(60), tmp_path / "b", resume=True, progress=False)
    a, b = pd.read_csv(tmp_path / "a" / "metrics.csv"), pd.read_csv(tmp_path / "b" / "metrics.csv")
    assert list(a["step"]) == list(b["step"]) == [10, 20, 30, 40, 50, 60]
    assert (a["loss"] - b["loss"]).abs().max() < 1e-5
    assert list(a["schedule_b"]) == list(b["schedule_b"]) and a["schedule_b"].iloc[-1] == pytest.approx(1.5)
    assert a["schedule_mu"].iloc[-1] == pytest.approx(-1.0)
    assert a["schedule_b"].iloc[0] == pytest.approx(0.3 + 1.2 * math.sin(math.pi / 2 * 9 / 59))
    assert (tmp_path / "a" / "schedule_density.png").exists()
    density = pd.read_csv(tmp_path / "a" / "schedule_density.csv")
    assert len(density) == 3 and not density.iloc[0, 1:].equals(density.iloc[-1, 1:])   # the density moved
    with pytest.raises(UsageError, match="curriculum ramps over the steps"):   # more steps would move the ramp
        train(curriculum_config(80), tmp_path / "b", resume=True, progress=False)
    # the run's export and quantile grid are of the schedule it trained on last (b = 1.5, mu = -1), not the config's
    export(tmp_path / "a", tmp_path / "final.csv", points=11)
    meta = json.loads((tmp_path / "final.csv.json").read_text())
    assert meta["params"] == pytest.approx({"b": 1.5, "mu": -1.0}) and meta["curriculum"] == straight.schedule.curriculum
    exported = pd.read_csv(tmp_path / "final.csv")
    last = schedule_at(straight.schedule, 59, 60)
    assert exported["logsnr"].to_numpy() == pytest.approx(last.logsnr(torch.tensor(exported["t"].to_numpy())).numpy())
    grid, grid_meta = grid_for_run(tmp_path / "a", 4, "quantile")
    assert grid_meta["training_params"] == pytest.approx({"b": 1.5, "mu": -1.0})
    assert grid_meta["curriculum"] == straight.schedule.curriculum                 # as the export's sidecar says


class Stop(Exception):
    """Raised by the on_eval callback to interrupt a run."""


def stop_at(step):
    def on_eval(done, row):
        if done == step:
            raise Stop
    return on_eval


def test_compare_entries_may_carry_a_curriculum(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[compare]\nseeds = [0]\nschedules = [{ name = "laplace", curriculum = { b = "0.3:1.5" } }]\n')
    plan = parse_compare(path)
    assert plan.entries[0]["curriculum"] == {"b": "0.3:1.5"}
