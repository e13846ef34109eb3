"""SIGKILL a training run (and a compare) through the CLI at chosen moments, rerun it, and get the same result.

The uninterrupted runs are the reference: after kill + `--resume` (for compare: the same command again),
the final loss agrees to 1e-5, the logged steps are the same list (no duplicated or missing rows),
metrics.csv parses with pandas at every point, and the weights in checkpoint.pt agree.
Subprocesses run with one intra-op thread, so both sides do the same arithmetic in the same order.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from adaptive_sched import checkpoint

pytestmark = pytest.mark.slow

RUN_TOML = """
[data]
name = "gmm"
n = 2000
dim = 8
[model]
name = "mlp"
hidden = 128
depth = 2
[train]
steps = {steps}
batch_size = 128
checkpoint_every = 50
log_every = 25
device = "cpu"
[eval]
every = 100
n = 200
sample_n = 0
logsnr_points = 5
"""
STEPS = 400
COMPARE_STEPS = 200
COMPARE_TOML = RUN_TOML.format(steps=COMPARE_STEPS) + """
[compare]
seeds = [0]
metric = "eval_eps_mse"
schedules = [{ name = "cosine" }, { name = "laplace", b = 1.0 }]
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TIMEOUT_S = 240


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "adaptive_sched.cli", *args]


def run(argv: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def logged_steps(path: Path) -> list[int]:
    """Steps of the complete rows of a metrics.csv being written (a torn last line is left out)."""
    try:
        lines = path.read_text().split("\n")[1:-1]      # header, and whatever follows the last newline
    except FileNotFoundError:
        return []
    return [int(line.split(",", 1)[0]) for line in lines if line]


def kill_when(argv: list[str], ready) -> None:
    """Start `argv`, SIGKILL it as soon as ready() holds (polled every 5 ms); it must still have been running."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ready():
            assert proc.poll() is None, f"finished (status {proc.returncode}) before the kill moment: " \
                                        f"{proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "kill moment never came"
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def assert_same_run(resumed: Path, straight: Path) -> None:
    """Same logged steps, final loss to 1e-5, same eval rows, and the same weights (model and EMA)."""
    a, b = pd.read_csv(resumed / "metrics.csv"), pd.read_csv(straight / "metrics.csv")
    assert a["step"].tolist() == b["step"].tolist()
    assert a["step"].is_unique and a["step"].is_monotonic_increasing
    assert abs(a["loss"].iloc[-1] - b["loss"].iloc[-1]) < 1e-5
    pd.testing.assert_series_equal(a["loss"], b["loss"], atol=1e-5, rtol=0)
    pd.testing.assert_frame_equal(pd.read_csv(resumed / "eval_profile.csv"), pd.read_csv(straight / "eval_profile.csv"),
                                  atol=1e-5, rtol=0)
    for name in (checkpoint.STATE_NAME, checkpoint.EMA_NAME):
        wa, wb = checkpoint.load(resumed / name)["model"], checkpoint.load(straight / name)["model"]
        assert wa.keys() == wb.keys()
        assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa), name
        assert checkpoint.load(resumed / name)["step"] == checkpoint.load(straight / name)["step"]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("configs") / "run.toml"
    path.write_text(RUN_TOML.format(steps=STEPS))
    return path


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, config) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    run(cli("train", "--config", str(config), "--out", str(out), "--quiet"))
    return out


def after_row(step: int):
    """The moment the metrics row of `step` appears."""
    return lambda out: step in logged_steps(out / "metrics.csv")


def after_checkpoint_of(step: int):
    """The moment the state saved at `step` is complete: ema.pt (written after checkpoint.pt) is replaced
    after the row of `step` was seen."""
    seen = {}

    def ready(out: Path) -> bool:
        ema = out / checkpoint.EMA_NAME
        if "mtime" not in seen:
            if step in logged_steps(out / "metrics.csv"):
                seen["mtime"] = ema.stat().st_mtime_ns if ema.exists() else 0
            return False
        return ema.exists() and ema.stat().st_mtime_ns != seen["mtime"]
    return ready


@pytest.mark.parametrize("moment,step,expected", [
    (after_checkpoint_of, 100, (100, 100)),  # just after a complete checkpoint (and the eval at 100)
    (after_row, 200, (150, 200)),            # during or just after the write of the checkpoint at 200
    (after_row, 275, (250, 250)),            # mid-interval: 25 steps past the checkpoint at 250
], ids=["after-checkpoint", "during-checkpoint-write", "mid-interval"])
def test_sigkilled_train_resumes_to_the_uninterrupted_result(tmp_path, config, straight_run, moment, step, expected):
    out = tmp_path / "run"
    argv = cli("train", "--config", str(config), "--out", str(out), "--quiet")
    ready = moment(step)
    kill_when(argv, lambda: ready(out))
    killed_at = logged_steps(out / "metrics.csv")
    assert killed_at and killed_at[-1] < STEPS
    pd.read_csv(out / "metrics.csv")                                  # whole lines only, even after SIGKILL
    state = checkpoint.load_training_state(out)
    assert state is not None and state["step"] < STEPS
    assert expected[0] <= state["step"] <= max(expected[1], killed_at[-1])   # the kill landed where it was meant to
    run(argv + ["--resume"])
    assert_same_run(out, straight_run)


def test_a_killed_run_refuses_to_restart_without_resume(tmp_path, config):
    out = tmp_path / "run"
    argv = cli("train", "--config", str(config), "--out", str(out), "--quiet")
    ready = after_row(75)
    kill_when(argv, lambda: ready(out))
    result = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=TIMEOUT_S)
    assert result.returncode == 2 and "--resume" in result.stderr and "Traceback" not in result.stderr


def test_sigkilled_compare_resumes_to_the_uninterrupted_summary(tmp_path):
    config = tmp_path / "cmp.toml"
    config.write_text(COMPARE_TOML)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(cli("compare", str(config), "--out", str(straight), "--quiet"))
    second = killed / "runs" / "laplace_b=1.0" / "seed0"
    kill_when(cli("compare", str(config), "--out", str(killed), "--quiet"),
              lambda: any(s >= 75 for s in logged_steps(second / "metrics.csv")))
    assert logged_steps(killed / "runs" / "cosine" / "seed0" / "metrics.csv")[-1] == COMPARE_STEPS
    assert not (killed / "summary.csv").exists()
    again = run(cli("compare", str(config), "--out", str(killed), "--quiet"))
    assert again.stdout.count("finished, skipped") == 1                # the first run is not trained again
    a, b = pd.read_csv(killed / "summary.csv"), pd.read_csv(straight / "summary.csv")
    assert a[["label", "step"]].values.tolist() == b[["label", "step"]].values.tolist()
    final_a = a[a.step == COMPARE_STEPS].set_index("label")["loss"]
    final_b = b[b.step == COMPARE_STEPS].set_index("label")["loss"]
    assert sorted(final_a.index) == ["cosine", "laplace(b=1.0)"]
    assert (final_a - final_b).abs().max() < 1e-5
    assert_same_run(second, straight / "runs" / "laplace_b=1.0" / "seed0")
