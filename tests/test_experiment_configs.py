"""Every configuration in experiments/ is accepted by the code as it is now.

A GPU step reads its config only when a device is lent (a few sessions in five), so a config the code has outgrown
(a key renamed, a check added) would cost that call. Here each [compare] config is parsed as `compare` parses it
(settings validated: data and model names and options too; schedules and losses built; no data loaded) and each sweep config opens its study with no time
to run a trial (`--time-budget 0`: every check before the first trial).
"""
import json
import re
from pathlib import Path

import pytest

from adaptive_sched import compare
from adaptive_sched.cli import main

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
COMPARE_CONFIGS = sorted(p for p in EXPERIMENTS.glob("*.toml") if re.search(r"^\[compare\]", p.read_text(), re.M))
SWEEP_CONFIGS = sorted(EXPERIMENTS.glob("sweep_*.toml"))


def test_the_experiment_folder_holds_what_the_gpu_steps_run():
    names = {p.name for p in COMPARE_CONFIGS}
    assert {"fashion_mnist.toml", "fashion_mnist_cond.toml", "fashion_tuned.toml", "targets.toml",
            "demo.toml"} <= names
    assert {p.name for p in SWEEP_CONFIGS} == {"sweep_fashion.toml", "sweep_digits_cpu.toml"}


@pytest.mark.parametrize("path", COMPARE_CONFIGS, ids=lambda p: p.name)
def test_every_compare_config_parses(path, tmp_path, monkeypatch):
    """A `best = "DIR/best.json"` entry (a sweep's result, made on the GPU) is stood in by a best.json naming the
    swept schedule with its defaults, as `sweep` writes it."""
    monkeypatch.chdir(tmp_path)
    for best in re.findall(r'best\s*=\s*"([^"]+)"', path.read_text()):
        assert not Path(best).is_absolute(), best            # a stand-in must never overwrite a real best.json
        stand_in = tmp_path / best
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        schedule = stand_in.parent.name                      # results/sweep-<data>/<schedule>/best.json
        stand_in.write_text(json.dumps({"compare_entry": {"name": schedule, "label": f"{schedule} (tuned)"}}))
    plan = compare.parse(path)
    assert plan.entries and plan.seeds


def test_the_bench_config_is_a_valid_run_config():
    """experiments/bench_fashion.toml (gpu_steps.sh's bench steps) holds run settings only: bench reads it as a run."""
    from adaptive_sched import config as cfg
    from adaptive_sched.run_checks import validate
    validate(cfg.load_toml(EXPERIMENTS / "bench_fashion.toml"))


@pytest.mark.parametrize("schedule", ["laplace", "cauchy"])
@pytest.mark.parametrize("path", SWEEP_CONFIGS, ids=lambda p: p.name)
def test_every_sweep_config_opens_its_study(path, schedule, tmp_path, capsys):
    out = tmp_path / schedule
    status = main(["sweep", "--config", str(path), "--schedule", schedule, "--out", str(out), "--time-budget", "0",
                   "--device", "cpu"])
    assert status == 0, capsys.readouterr().err
    assert json.loads((out / "sweep.json").read_text())["schedule"] == schedule
