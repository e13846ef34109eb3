"""run_artifacts: finished runs stay finished, plotted and shown without their checkpoints (a GPU run brought
back without .pt files), and compare/sweep stop starting work when their time budget is spent."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from adaptive_sched import config as cfg
from adaptive_sched.compare import compare, parse, run_dir_of
from adaptive_sched.errors import UsageError
from adaptive_sched.run_artifacts import (FINAL_TABLE, FINISHED, SAMPLE_PANEL, cached_panel, final_schedule,
                                          is_finished, mark_finished)
from adaptive_sched.train import train

from test_compare import write_config


def tiny_run(tmp_path, schedule="learned", steps=20, **train_extra):
    config = cfg.from_dict({"data": {"name": "gmm", "n": 500, "dim": 2}, "model": {"name": "mlp", "hidden": 16,
                                                                                  "depth": 1},
                            "schedule": {"name": schedule},
                            "train": {"steps": steps, "batch_size": 32, "log_every": 10, **train_extra},
                            "eval": {"every": 10, "n": 50, "logsnr_points": 3}})
    out = tmp_path / "run"
    train(config, out, progress=False)
    return out


def strip_checkpoints(run_dir):
    for path in run_dir.glob("*.pt"):
        path.unlink()


def test_a_learned_run_marks_itself_finished_and_exports_its_trained_schedule(tmp_path):
    run = tiny_run(tmp_path)
    assert json.loads((run / FINISHED).read_text())["step"] == 20
    assert is_finished(run, 20) and not is_finished(run, 21)
    from_ema, _, step = final_schedule(run)
    strip_checkpoints(run)
    assert is_finished(run, 20)                      # the marker, not the checkpoint, says so
    from_table, weights, table_step = final_schedule(run)
    assert step == table_step == 20 and weights is None
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    with torch.no_grad():
        exact = from_ema.logsnr(t).double()
    assert torch.allclose(from_table.logsnr(t), exact, atol=1e-6)       # exact at the table's grid points
    lam = torch.linspace(-8, 8, 33, dtype=torch.float64)
    with torch.no_grad():                # piecewise linear in t: its CDF is close, its density the segment mean
        assert torch.allclose(from_table.t_of(lam), from_ema.t_of(lam).double(), atol=1e-4)
        assert torch.allclose(from_table.density(lam), from_ema.density(lam).double(), rtol=0.05)


def test_a_fixed_run_writes_the_marker_but_no_table(tmp_path):
    run = tiny_run(tmp_path, schedule="cosine")
    assert (run / FINISHED).exists() and not (run / FINAL_TABLE).exists()
    strip_checkpoints(run)
    assert final_schedule(run) is None


def test_runs_from_before_the_marker_count_as_finished_by_metrics_and_snapshot(tmp_path):
    run = tiny_run(tmp_path, schedule="cosine")
    (run / FINISHED).unlink()
    assert is_finished(run, 20) and not is_finished(run, 40)
    (run / "ema.pt").unlink()
    assert not is_finished(run, 20)
    (run / FINISHED).write_text("{not json")
    assert not is_finished(run, 20)


class Killed(BaseException):
    """Stands for SIGKILL at a chosen moment (a BaseException, as nothing in train may catch it)."""


def kill_at_the_end(monkeypatch, tmp_path, after_metrics_row=False):
    """Run tiny_run (steps 20, checkpoints at 10 and 20) and stop it at its last step: right after its last metrics
    row (before the step-20 checkpoint), or between writing checkpoint.pt and ema.pt at step 20."""
    from adaptive_sched import checkpoint, runlog
    with monkeypatch.context() as patched:
        if after_metrics_row:
            append = runlog.CsvLog.append

            def stop_after(self, row):
                append(self, row)
                if self.path.name == "metrics.csv" and row["step"] == 20:
                    raise Killed
            patched.setattr(runlog.CsvLog, "append", stop_after)
        else:
            atomic_save = checkpoint.atomic_save

            def stop_before_snapshot(obj, path):
                if obj.get("kind") == "ema" and obj["step"] == 20:
                    raise Killed
                atomic_save(obj, path)
            patched.setattr(checkpoint, "atomic_save", stop_before_snapshot)
        with pytest.raises(Killed):
            tiny_run(tmp_path, schedule="cosine", checkpoint_every=10)
    return tmp_path / "run"


def test_a_run_killed_after_its_last_metrics_row_is_not_counted_finished(tmp_path, monkeypatch):
    """Before finished.json the check is metrics.csv's last row and ema.pt: a run killed between its last row and its
    last checkpoint has the row, and the ema.pt of step 10; compare counted it finished and reported that snapshot."""
    from adaptive_sched import checkpoint
    run = kill_at_the_end(monkeypatch, tmp_path, after_metrics_row=True)
    assert list(pd.read_csv(run / "metrics.csv")["step"]) == [10, 20] and not (run / FINISHED).exists()
    assert checkpoint.load(run / "ema.pt")["step"] == 10
    assert not is_finished(run, 20)


def test_a_run_killed_between_its_last_checkpoint_and_snapshot_resumes_to_its_final_snapshot(tmp_path, monkeypatch):
    """checkpoint.pt at step 20 but ema.pt still at step 10: the resume found nothing to train, wrote finished.json and
    left the step-10 snapshot as the run's final one (sampled, exported and reported)."""
    from adaptive_sched import checkpoint
    straight = tiny_run(tmp_path / "straight", schedule="cosine", checkpoint_every=10)
    run = kill_at_the_end(monkeypatch, tmp_path)
    assert checkpoint.load(run / "checkpoint.pt")["step"] == 20 and checkpoint.load(run / "ema.pt")["step"] == 10
    config = cfg.load_toml(run / "config.toml")
    train(config, run, resume=True, progress=False)
    snapshot, expected = checkpoint.load(run / "ema.pt"), checkpoint.load(straight / "ema.pt")
    assert snapshot["step"] == 20 and json.loads((run / FINISHED).read_text())["step"] == 20
    assert all(torch.equal(snapshot["model"][k], expected["model"][k]) for k in expected["model"])


def test_the_sample_panel_is_cached_when_drawn_and_served_without_the_checkpoint(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    assert cached_panel(run, 4, lambda: pytest.fail("nothing to draw from")) is None
    (run / "ema.pt").write_bytes(b"")
    image = np.random.default_rng(0).random((9, 9, 1)).astype(np.float32)
    got = cached_panel(run, 4, lambda: (image, "cosine\n(step 20)"))
    (run / "ema.pt").unlink()
    cached, title = cached_panel(run, 4, lambda: pytest.fail("must come from the cache"))
    assert np.array_equal(cached, image) and title == "cosine\n(step 20)" and np.array_equal(got[0], image)
    assert cached_panel(run, 16, lambda: pytest.fail("no checkpoint")) is None    # another n: not this panel
    assert (run / SAMPLE_PANEL).exists()


@pytest.mark.slow
def test_compare_keeps_runs_brought_back_without_checkpoints(tmp_path):
    """The GPU round trip: runs finish there, come back without .pt files, and the next compare skips them and
    still draws the learned density (from its table) and the sample panels (from their cache)."""
    config = write_config(tmp_path, data="digits", model="unet",
                          model_params="channels = [8]\nemb_dim = 16\nmid_blocks = 0", sample_n=16,
                          extra="samples = 16").read_text()
    config = config.replace('schedules = [{ name = "cosine" }, { name = "laplace", b = 1.0 }]',
                            'schedules = [{ name = "cosine" }, { name = "learned" }]')
    path = tmp_path / "c.toml"
    path.write_text(config)
    out = compare(path, tmp_path / "out", progress=False)
    before = pd.read_csv(out / "summary.csv")
    for run in (out / "runs").glob("*/seed0"):
        strip_checkpoints(run)
        assert (run / SAMPLE_PANEL).exists() and (run / FINISHED).exists()
        (run / "train.log").write_text("untouched")
    for png in ("densities.png", "samples.png"):
        (out / png).unlink()
    compare(path, out, progress=False)
    assert all((run / "train.log").read_text() == "untouched" for run in (out / "runs").glob("*/seed0"))
    assert pd.read_csv(out / "summary.csv").equals(before)
    assert (out / "densities.png").stat().st_size > 1000 and (out / "samples.png").stat().st_size > 1000


def test_compare_starts_nothing_once_its_time_budget_is_spent(tmp_path, capsys):
    config = write_config(tmp_path)
    for jobs in (1, 2):
        out = compare(config, tmp_path / f"out{jobs}", progress=False, jobs=jobs, time_budget=0)
        assert "2 of 2 runs not started" in capsys.readouterr().out
        plan = parse(config)
        assert not any((run_dir_of(out, e, 0) / "metrics.csv").exists() for e in plan.entries)
        assert not (out / "summary.csv").exists()
    with pytest.raises(UsageError, match="--time-budget must be a number of seconds >= 0"):
        compare(config, tmp_path / "bad", progress=False, time_budget=-1)


def test_compare_status_counts_finished_runs(tmp_path, capsys):
    from adaptive_sched.cli import main
    config = write_config(tmp_path)
    out = tmp_path / "out"
    assert main(["compare", str(config), "--out", str(out), "--status"]) == 0
    assert capsys.readouterr().out.strip() == "0 of 2 runs finished"
    run = run_dir_of(out, parse(config).entries[1], 0)
    run.mkdir(parents=True)
    mark_finished(run, 40, export_schedule=False)
    assert main(["compare", str(config), "--out", str(out), "--status"]) == 0
    assert capsys.readouterr().out.strip() == "1 of 2 runs finished"
    other = run_dir_of(out, parse(config).entries[0], 0)
    other.mkdir(parents=True)
    mark_finished(other, 40, export_schedule=False)
    main(["compare", str(config), "--out", str(out), "--status"])
    assert capsys.readouterr().out.strip() == "2 of 2 runs finished (all)"


def test_compare_runs_seed_by_seed(tmp_path, monkeypatch):
    import adaptive_sched.train as train_module
    order = []
    monkeypatch.setattr(train_module, "train", lambda config, run_dir, **kw: order.append(run_dir.parts[-2:]))
    config = write_config(tmp_path, extra="").read_text().replace("seeds = [0]", "seeds = [0, 1]")
    path = tmp_path / "s.toml"
    path.write_text(config)
    compare(path, tmp_path / "out", progress=False)
    assert order == [("cosine", "seed0"), ("laplace_b=1.0", "seed0"), ("cosine", "seed1"), ("laplace_b=1.0", "seed1")]


def test_mark_finished_is_atomic_json(tmp_path):
    mark_finished(tmp_path, 7, export_schedule=False)
    data = json.loads((tmp_path / FINISHED).read_text())
    assert data["step"] == 7 and data["finished_at"].endswith("Z")
    assert not list(tmp_path.glob(".*tmp*"))
