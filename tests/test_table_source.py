"""A `table` run trains on the table its file holds: a window that would clip the table is refused, and the run
records the file's sha256, so resume, export, sampling-grid and sample refuse once the file has changed."""
import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from adaptive_sched import checkpoint, config as cfg, schedules
from adaptive_sched.errors import UsageError
from adaptive_sched.export import export, load_run_schedule
from adaptive_sched.grid_cli import grid_for_run
from adaptive_sched.run_build import build_schedule
from adaptive_sched.sample_run import sample_run
from adaptive_sched.schedules.table import read_table, write_class_table, write_table
from adaptive_sched.train import train

F64 = torch.float64
WIDE = "t,logsnr\n0,30\n0.5,0\n1,-30\n"             # a table reaching beyond the default window ±20
TWO_CLASSES = 2


def run_config(schedule: dict, steps: int = 2, **sections) -> cfg.RunConfig:
    """A run of a few steps on gmm with a tiny mlp on the CPU (checkpoint and eval every 2 steps)."""
    raw = {"data": {"name": "gmm", "n": 500, "dim": 2}, "model": {"name": "mlp", "hidden": 16, "depth": 1},
           "schedule": schedule, "train": {"steps": steps, "batch_size": 32, "log_every": 2, "checkpoint_every": 2,
                                           "device": "cpu"},
           "eval": {"every": 2, "n": 50, "sample_n": 0, "logsnr_points": 3}}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return cfg.from_dict(raw)


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "adaptive_sched", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


# --- the window must hold the table -----------------------------------------------------------------------------

def test_a_table_beyond_the_window_is_refused_naming_both_and_how_to_widen(tmp_path):
    (tmp_path / "wide.csv").write_text(WIDE)
    fast = ["--data", "gmm", "--model", "mlp", "--model-param", "hidden=16", "--model-param", "depth=1",
            "--steps", "2", "--batch-size", "32", "--eval-every", "2", "--log-every", "2", "--device", "cpu"]
    result = cli("train", *fast, "--schedule", "table", "--schedule-param", "path=wide.csv", "--out", "r",
                 "--quiet", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: table wide.csv spans logsnr -30.0 to 30.0, beyond the run's window "
                                    "[-20.0, 20.0]"), result.stderr
    assert "logsnr_min = -30 and logsnr_max = 30" in result.stderr
    assert "--schedule-param logsnr_min=-30 --schedule-param logsnr_max=30" in result.stderr
    assert not (tmp_path / "r" / "checkpoint.pt").exists()
    # the widening the message names trains on the table itself: λ(0) = 30 and λ(0.25) = 15, as the file says
    result = cli("train", *fast, "--schedule", "table", "--schedule-param", "path=wide.csv", "--schedule-param",
                 "logsnr_min=-30", "--schedule-param", "logsnr_max=30", "--out", "r", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = cli("export", "r", "--out", "re.csv", "--points", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(read_table(tmp_path / "re.csv")[1], [30, 15, 0, -15, -30], rtol=0, atol=1e-12)


def test_only_the_side_that_clips_is_named(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_text(WIDE)
    with pytest.raises(UsageError, match=r"beyond the run's window \[-30.0, 20.0\].*\(\[schedule\] logsnr_max = 30 "
                                         r"in the config file, or --schedule-param logsnr_max=30\)$"):
        build_schedule(cfg.ScheduleConfig("table", -30.0, 20.0, {"path": str(path)}))


def test_tables_inside_the_window_train_on_the_table_as_before(tmp_path):
    """Inside the window (ends exactly on it included, as a learned export's sit) nothing changes: the run's
    schedule is the table's own, point for point; a wider window is not an error either."""
    t = np.linspace(0, 1, 101)
    for lo, hi in ((-20.0, 20.0), (-25.0, 25.0), (-8.8, 12.4)):
        lam = schedules.build("cosine", logsnr_min=lo, logsnr_max=hi).logsnr(torch.tensor(t)).numpy()
        lam[0], lam[-1] = hi, lo
        path = tmp_path / f"t{lo}.csv"
        write_table(path, t, lam)                    # repr(float): the CSV round trip of ±20.0 is exact
        assert read_table(path)[1][[0, -1]].tolist() == [hi, lo]
        for window in ((lo, hi), (lo - 5, hi + 5)):
            built = build_schedule(cfg.ScheduleConfig("table", *window, {"path": str(path)}))
            own = schedules.build("table", path=str(path))
            grid = torch.linspace(0, 1, 1001, dtype=F64)
            assert torch.equal(built.logsnr(grid), own.logsnr(grid))
            assert (built.logsnr_min, built.logsnr_max) == (lo, hi)


def test_round_off_at_the_ends_passes_and_a_real_excess_does_not(tmp_path):
    path = tmp_path / "t.csv"
    for top, ok in ((20.0 * (1 + 1e-12), True), (np.float32(20.0) + 1e-6, True), (20.01, False)):
        path.write_text(f"t,logsnr\n0,{float(top)!r}\n0.5,0\n1,-20\n")
        s = cfg.ScheduleConfig("table", -20.0, 20.0, {"path": str(path)})
        if ok:
            assert build_schedule(s).logsnr_max == 20.0
        else:
            with pytest.raises(UsageError, match="spans logsnr -20.0 to 20.01, beyond the run's window"):
                build_schedule(s)


def test_a_learned_export_reloads_in_its_own_window_and_is_refused_in_a_narrower_one(tmp_path):
    """The issue's case: a learned run with logsnr_min/max = -25/25, exported, trained on again as a table."""
    learned = {"name": "learned", "logsnr_min": -25.0, "logsnr_max": 25.0, "init": "none"}   # no init fit: fast
    train(run_config(learned), tmp_path / "learned", progress=False)
    out = export(tmp_path / "learned", tmp_path / "l.csv", points=201)
    assert read_table(out)[1][[0, -1]].tolist() == [25.0, -25.0]
    table = {"name": "table", "path": str(out)}
    assert build_schedule(cfg.ScheduleConfig("table", -25.0, 25.0, {"path": str(out)})).logsnr_max == 25.0
    with pytest.raises(UsageError, match=r"spans logsnr -25.0 to 25.0, beyond the run's window \[-20.0, 20.0\]"):
        train(run_config(table), tmp_path / "again", progress=False)
    assert not (tmp_path / "again" / "checkpoint.pt").exists()


def test_a_class_table_with_one_class_beyond_the_window_is_refused(tmp_path):
    t = np.linspace(0, 1, 51)

    def cosine(lo, hi):
        lam = schedules.build("cosine", logsnr_min=lo, logsnr_max=hi).logsnr(torch.tensor(t)).numpy()
        lam[0], lam[-1] = hi, lo
        return lam

    path = tmp_path / "c.classes.csv"
    write_class_table(path, {0: (t, cosine(-20, 20)), 1: (t, cosine(-12, 24))})
    s = cfg.ScheduleConfig("table", -20.0, 20.0, {"path": str(path)})
    with pytest.raises(UsageError, match=r"table .*c.classes.csv spans logsnr -20.0 to 24.0, beyond the run's window "
                                         r"\[-20.0, 20.0\].*--schedule-param logsnr_max=24\)$"):
        build_schedule(s, num_conditions=TWO_CLASSES)
    s.logsnr_max = 24.0
    table = build_schedule(s, num_conditions=TWO_CLASSES)
    assert table.logsnr(torch.tensor([0.0], dtype=F64), 1).item() == 24.0
    write_class_table(path, {0: (t, cosine(-20, 20)), 1: (t, cosine(-12, 18))})     # both inside: as before
    built = build_schedule(cfg.ScheduleConfig("table", -20.0, 20.0, {"path": str(path)}), num_conditions=TWO_CLASSES)
    grid = torch.linspace(0, 1, 501, dtype=F64)
    own = schedules.build("table", path=str(path))
    assert all(torch.equal(built.logsnr(grid, k), own.logsnr(grid, k)) for k in range(TWO_CLASSES))


# --- the run records the table it trained on -------------------------------------------------------------------

def table_run(tmp_path, steps=2, text="t,logsnr\n0,10\n0.5,0\n1,-10\n"):
    path = tmp_path / "t.csv"
    path.write_text(text)
    schedule = {"name": "table", "path": str(path)}
    train(run_config(schedule, steps), tmp_path / "run", progress=False)
    return path, tmp_path / "run", schedule


def test_the_run_records_the_sha256_of_its_table_in_both_checkpoints(tmp_path):
    path, run, _ = table_run(tmp_path)
    expected = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert checkpoint.load(run / checkpoint.STATE_NAME)["table_source"] == expected
    assert checkpoint.load_ema_snapshot(run)["table_source"] == expected
    cosine = tmp_path / "cosine"
    train(run_config({"name": "cosine"}), cosine, progress=False)
    assert "table_source" not in checkpoint.load(cosine / checkpoint.STATE_NAME)


def test_resume_refuses_a_table_edited_since_the_run_started(tmp_path):
    path, run, schedule = table_run(tmp_path)
    original = path.read_text()
    path.write_text("t,logsnr\n0,10\n0.5,3\n1,-10\n")                 # another density for steps 3-4
    with pytest.raises(UsageError, match=r"^cannot resume .*run: table .*t.csv changed since the run started "
                                         r"\(sha256 [0-9a-f]{12}\.\.\. then, [0-9a-f]{12}\.\.\. now\); restore the "
                                         r"file it trained on, or train into another --out$"):
        train(run_config(schedule, steps=4), run, resume=True, progress=False)
    assert checkpoint.load(run / checkpoint.STATE_NAME)["step"] == 2
    path.write_text(original)                                         # the same bytes again: it resumes
    assert train(run_config(schedule, steps=4), run, resume=True, progress=False)["step"] == 4


def test_export_grid_and_sample_refuse_a_table_edited_or_gone_since_the_run(tmp_path):
    path, run, _ = table_run(tmp_path)
    before = read_table(export(run, tmp_path / "before.csv", points=5))[1]
    grid_before, _ = grid_for_run(run, 4, "quantile")
    original = path.read_text()
    path.write_text("t,logsnr\n0,10\n0.5,3\n1,-10\n")
    changed = r"run: table .*t.csv changed since the run started .*; restore the file the run trained on"
    with pytest.raises(UsageError, match=changed):
        export(run, tmp_path / "after.csv", points=5)
    with pytest.raises(UsageError, match=changed):
        grid_for_run(run, 4, "quantile")
    path.unlink()
    gone = r"run: the run trained on table .*t.csv \(sha256 [0-9a-f]{12}\.\.\.\), which is gone; restore the file"
    with pytest.raises(UsageError, match=gone):
        export(run, tmp_path / "after.csv", points=5)
    path.write_text(original)
    assert read_table(export(run, tmp_path / "again.csv", points=5))[1].tolist() == before.tolist()
    assert torch.equal(grid_for_run(run, 4, "quantile")[0], grid_before)


def test_the_cli_refuses_in_one_line(tmp_path):
    path, run, _ = table_run(tmp_path)
    path.write_text("t,logsnr\n0,10\n0.5,3\n1,-10\n")
    for args in (["export", str(run), "--out", str(tmp_path / "e.csv")],
                 ["sampling-grid", str(run), "--method", "quantile", "--steps", "4", "--out", str(tmp_path / "g.csv")]):
        result = cli(*args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "changed since the run started" in result.stderr
    assert not (tmp_path / "e.csv").exists() and not (tmp_path / "g.csv").exists()


def test_a_class_table_run_refuses_per_class_sampling_once_its_file_changed(tmp_path):
    t = np.linspace(0, 1, 21)
    lams = {k: schedules.build("cosine", shift=k - 3.5).logsnr(torch.tensor(t)).numpy() for k in range(8)}  # gmm: 8
    path = tmp_path / "s.classes.csv"
    write_class_table(path, {k: (t, lam) for k, lam in lams.items()})
    schedule = {"name": "table", "path": str(path)}
    train(run_config(schedule, train={"conditional": True}, learned={"condition": "class"}), tmp_path / "run",
          progress=False)
    assert checkpoint.load_ema_snapshot(tmp_path / "run")["table_source"]["sha256"] == \
        hashlib.sha256(path.read_bytes()).hexdigest()
    sample_run(tmp_path / "run", 16, tmp_path / "a.npz", steps=4, grid="per-class", device="cpu")
    write_class_table(path, {k: (t, 0.9 * lam) for k, lam in lams.items()})
    with pytest.raises(UsageError, match=r"table .*s.classes.csv changed since the run started"):
        sample_run(tmp_path / "run", 16, tmp_path / "b.npz", steps=4, grid="per-class", device="cpu")
    assert not (tmp_path / "b.npz").exists()


def test_a_run_saved_before_runs_recorded_their_table_works_as_before(tmp_path):
    """No table_source in its checkpoints: export reads the file as it is now, and resume goes on (recording the
    file from then on)."""
    path, run, schedule = table_run(tmp_path)
    for name in (checkpoint.STATE_NAME, checkpoint.EMA_NAME):
        saved = checkpoint.load(run / name)
        del saved["table_source"]
        checkpoint.atomic_save(saved, run / name)
    path.write_text("t,logsnr\n0,10\n0.5,3\n1,-10\n")
    _, table, _ = load_run_schedule(run)
    assert table.logsnr(torch.tensor([0.5], dtype=F64)).item() == 3.0
    assert train(run_config(schedule, steps=4), run, resume=True, progress=False)["step"] == 4
    assert checkpoint.load(run / checkpoint.STATE_NAME)["table_source"]["sha256"] == \
        hashlib.sha256(path.read_bytes()).hexdigest()
