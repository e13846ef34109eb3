"""The command line, run as a user would: exit codes, one-line errors, files written; config files."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from adaptive_sched import config as cfg
from adaptive_sched.errors import UsageError

FAST = ["--data", "gmm", "--model", "mlp", "--model-param", "hidden=64", "--model-param", "depth=1",
        "--steps", "40", "--batch-size", "64", "--eval-every", "40", "--log-every", "10", "--device", "cpu"]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "adaptive_sched", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_train_then_sample_npz_and_png(tmp_path):
    run = tmp_path / "run"
    result = cli("train", *FAST, "--schedule", "laplace", "--schedule-param", "b=1.0", "--target", "v",
                 "--out", str(run), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "done: step=40" in result.stdout
    for name in ("metrics.csv", "config.toml", "checkpoint.pt", "ema.pt", "eval_profile.csv"):
        assert (run / name).exists(), name
    saved = cfg.load_toml(run / "config.toml")
    assert saved.schedule.name == "laplace" and saved.schedule.params == {"b": 1.0} and saved.train.target == "v"
    assert pd.read_csv(run / "metrics.csv")["step"].tolist() == [10, 20, 30, 40]
    result = cli("sample", str(run), "--n", "300", "--out", str(tmp_path / "s.npz"), "--sampler", "heun",
                 "--sample-steps", "10")
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "s.npz") as f:
        assert f["x"].shape == (300, 8 * 2) and np.isfinite(f["x"]).all() and str(f["sampler"]) == "heun"
        assert np.all(np.diff(f["logsnr_grid"]) > 0)
    assert cli("sample", str(run), "--n", "16", "--out", str(tmp_path / "s.png")).returncode == 0
    assert (tmp_path / "s.png").stat().st_size > 1000


@pytest.mark.parametrize("args,message", [
    (["train", *FAST, "--schedule", "laplase", "--out", "X"], "unknown schedule 'laplase'"),
    (["train", *FAST, "--schedule", "laplace", "--schedule-param", "b=0", "--out", "X"], "b must be > 0"),
    (["train", *FAST, "--schedule", "laplace", "--schedule-param", "sigma=1", "--out", "X"], "no parameter"),
    (["train", *FAST, "--data", "nosuch", "--out", "X"], "unknown"),
    (["train", *FAST, "--target", "score", "--out", "X"], "unknown target"),
    (["train", *FAST, "--weighting", "minsnr", "--out", "X"], "unknown weighting"),
    (["train", *FAST, "--steps", "0", "--out", "X"], "steps must be > 0"),
    (["train", *FAST, "--optimizer", "adamz", "--out", "X"], "unknown optimizer"),
    (["train", *FAST, "--data", "npz:/no/such/file.npz", "--out", "X"], "/no/such/file.npz"),
    (["train", *FAST, "--schedule-param", "logsnr_min=5", "--schedule-param", "logsnr_max=1", "--out", "X"],
     "logsnr_min"),
    (["train", *FAST, "--config", "/no/such.toml", "--out", "X"], "config file not found"),
    (["sample", "/no/such/run", "--out", "x.npz"], "no EMA snapshot"),
    (["train", "--stepz", "3"], "unrecognized arguments"),
    (["train", *FAST, "--seed", "4294967296", "--out", "X"], "seed must be"),
    (["train", *FAST, "--schedule", "table", "--schedule-param", "path=1", "--out", "X"], "table path"),
    (["train", *FAST, "--schedule", "learned", "--schedule-objective", "varianse", "--out", "X"],
     "unknown schedule objective"),
    (["train", *FAST, "--schedule", "learned", "--weighting", "min-snr", "--out", "X"], "absolute weighting"),
    (["export", "/no/such/run", "--out", "x.csv"], "no EMA snapshot"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, capsys, args, message):
    """In-process through cli.main (a second each); the first case also runs as `python -m adaptive_sched`."""
    from adaptive_sched.cli import main
    monkeypatch.chdir(tmp_path)
    if args[:2] == ["train", *FAST[:1]] and "laplase" in args:
        result = cli(*args, cwd=tmp_path)
        status, err = result.returncode, result.stderr
    else:
        status, err = main(args), capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "X").exists()


def test_out_that_is_a_file_and_bad_eval_settings(tmp_path):
    (tmp_path / "file").write_text("x")
    result = cli("train", *FAST, "--out", str(tmp_path / "file"))
    assert result.returncode == 2 and "is a file" in result.stderr
    config = tmp_path / "c.toml"
    for body, message in (("[eval]\nn = 0\n", "[eval] n"), ('[eval]\nsampler = "dim"\n', "unknown sampler")):
        config.write_text(body)
        result = cli("train", *FAST, "--config", str(config), "--out", str(tmp_path / "r"))
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert not (tmp_path / "r" / "checkpoint.pt").exists()


@pytest.mark.parametrize("compare_section,message", [
    ('metric = "loss"\nschedules = [{ name = "cosine" }]', "not an eval metric"),
    ('seeds = 3\nschedules = [{ name = "cosine" }]', "seeds must be"),
    ('schedules = 5', "schedules must be"),
    ('schedules = [{ name = "laplace", b = 0.5 }, { name = "laplace", label = "laplace(b=0.5)" }]', "share a label"),
    ('schedules = [{ name = "laplace", b = -1.0 }]', "b must be > 0"),
    ('schedulez = []', "did you mean 'schedules'"),
])
def test_compare_refuses_bad_configs_before_training(tmp_path, compare_section, message):
    config = tmp_path / "cmp.toml"
    config.write_text("[compare]\n" + compare_section + "\n")
    result = cli("compare", str(config), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out" / "runs").exists() or not any((tmp_path / "out" / "runs").iterdir())


def test_sample_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "run"
    bogus.mkdir()
    (bogus / "ema.pt").write_text("hello")
    result = cli("sample", str(bogus), "--out", str(tmp_path / "x.npz"))
    assert result.returncode == 2 and "not a readable" in result.stderr


def test_schedules_command_lists_parameters():
    result = cli("schedules")
    assert result.returncode == 0
    assert "laplace" in result.stdout and "b=0.5" in result.stdout and "p_mean=-1.2" in result.stdout


def test_toml_config_with_cli_override(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[schedule]\nname = "cauchy"\ngamma = 2.0\n[train]\nsteps = 30\nlr = 0.01\n')
    config = cfg.load_toml(path)
    assert config.schedule.params == {"gamma": 2.0} and config.train.steps == 30 and config.train.lr == 0.01
    # a CLI schedule of another name drops the file's schedule parameters
    over = cfg.from_dict({"schedule": {"name": "laplace"}}, config)
    assert over.schedule.params == {}
    # written config reads back identically
    again = cfg.from_dict(cfg.read_toml_text(cfg.dumps_toml(config.to_dict())))
    assert again == config


def test_unknown_toml_keys_get_a_suggestion(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nstep = 30\n")
    with pytest.raises(UsageError, match="did you mean 'steps'"):
        cfg.load_toml(path)
    path.write_text("[trian]\nsteps = 30\n")
    with pytest.raises(UsageError, match="did you mean 'train'"):
        cfg.load_toml(path)
    path.write_text("[train]\nsteps = 'many'\n")
    with pytest.raises(UsageError, match="must be a int"):
        cfg.load_toml(path)


def test_compare_writes_tables_and_plots_and_skips_finished_runs(tmp_path):
    config = tmp_path / "cmp.toml"
    config.write_text("""
[data]
name = "gmm"
n = 2000
dim = 4
[model]
name = "mlp"
hidden = 64
depth = 1
[train]
steps = 40
batch_size = 64
log_every = 20
[eval]
every = 20
n = 200
sample_n = 200
sample_steps = 10
[compare]
seeds = [0, 1]
metric = "eval_excess_mse"
schedules = [{ name = "cosine" }, { name = "laplace", b = 1.0 }]
""")
    out = tmp_path / "out"
    result = cli("compare", str(config), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["label"]) == {"cosine", "laplace(b=1.0)"} and set(summary["seed"]) == {0, 1}
    agg = pd.read_csv(out / "aggregates.csv")
    final = agg[(agg.step == 40) & (agg.metric == "eval_excess_mse")]
    assert len(final) == 2 and (final["seeds"] == 2).all() and (final["ci95"] > 0).all()
    for name in ("results.md", "metric_vs_step.png", "densities.png", "loss_profile.png"):
        assert (out / name).exists(), name
    again = cli("compare", str(config), "--out", str(out), "--quiet")
    assert again.returncode == 0 and again.stdout.count("finished, skipped") == 4


def test_the_command_line_parser_loads_without_torch():
    """`adaptive-sched --help` and argument errors answer at once: no subcommand's parser imports torch."""
    import subprocess
    import sys
    probe = "import sys; from adaptive_sched.cli import make_parser; make_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.mark.parametrize("raw, expected", [
    ({}, []),
    ({"schedule": {"name": "laplace"}, "learned": {"smoothness": 1e-3}}, ["[learned] smoothness = 0.001"]),
    ({"schedule": {"name": "learned"}, "learned": {"objective": "variance", "smoothness": 1e-3}},
     ["smoothness = 0.001 has no effect with objective 'variance'"]),
    ({"schedule": {"name": "learned"}, "learned": {"objective": "cvdm", "smoothness": 1e-3}}, []),
    ({"schedule": {"name": "cosine"}, "learned": {"objective": "cvdm", "lr": 0.01}},
     ["[learned] objective = 'cvdm'", "[learned] lr = 0.01"]),
    ({"schedule": {"name": "learned"}, "learned": {"objective": "cvdm", "weight_like": "cosine"}},
     ["weight_like = 'cosine' has no effect"]),
    ({"schedule": {"name": "learned"}, "learned": {"weight_like": "cosine"}}, []),
    ({"schedule": {"name": "learned"}, "learned": {"weight_like": "cosine"}, "weighting": {"name": "elbo"}},
     ["weight_like = 'cosine' has no effect"]),
    ({"schedule": {"name": "adaptive_binned"}, "learned": {"weight_like": "cosine"}}, []),
    ({"schedule": {"name": "table"}, "learned": {"condition": "class"}}, []),
    ({"schedule": {"name": "laplace"}, "learned": {"condition": "class"}}, []),     # refused when the run builds
    ({"train": {"p_uncond": 0.2}, "eval": {"sample_labels": "balanced"}},
     ["[train] p_uncond = 0.2 has no effect without", "[eval] sample_labels = 'balanced' has no effect without"]),
    ({"train": {"p_uncond": 0.2, "conditional": True}, "eval": {"sample_labels": "balanced"}}, []),
])
def test_ineffective_settings_name_each_setting_nothing_uses(raw, expected):
    from adaptive_sched.run_checks import ineffective_settings
    lines = ineffective_settings(cfg.from_dict(raw))
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected):
        assert start in line


def test_train_warns_about_config_file_settings_it_does_not_use(tmp_path):
    """A TOML key the run would ignore (here a cvdm smoothness with a fixed schedule) is named on stderr; the run
    still trains (a resolved config.toml of a learned run, reused with a fixed schedule, carries [learned])."""
    path = tmp_path / "c.toml"
    path.write_text('[learned]\nobjective = "cvdm"\nsmoothness = 1e-3\n[train]\np_uncond = 0.3\n')
    result = cli("train", *FAST, "--steps", "10", "--eval-every", "10", "--schedule", "laplace", "--config",
                 str(path), "--out", str(tmp_path / "run"), "--quiet")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == ["warning: [learned] objective = 'cvdm' has no effect with schedule 'laplace'",
                        "warning: [learned] smoothness = 0.001 has no effect with schedule 'laplace'",
                        "warning: [train] p_uncond = 0.3 has no effect without [train] conditional = true"]


def test_train_warns_when_an_absolute_weighting_meets_a_schedule_that_never_draws_the_windows_ends():
    """t is drawn from 2^24 bins: Laplace(0.5) never draws |λ| > 8.32 (its tail mass beyond is < 2^-25), so elbo's
    w = 1 out there is lost to the objective; cosine and Cauchy reach the window's ends."""
    import math
    from scipy import stats
    from adaptive_sched import config as cfg
    from adaptive_sched.run_checks import unsampled_window

    def warned(schedule, weighting, **params):
        return unsampled_window(cfg.from_dict({"schedule": {"name": schedule, **params},
                                               "weighting": {"name": weighting}}))
    line = warned("laplace", "elbo")
    edge = -stats.laplace(scale=0.5).ppf(2.0 ** -25 / (1 - 2 * stats.laplace(scale=0.5).cdf(-20)))
    assert len(line) == 1 and f"[{-edge:.3g}, {edge:.3g}] of the window [-20, 20]" in line[0]
    assert math.isclose(edge, 8.32, abs_tol=0.01)
    assert warned("normal", "sigmoid") and warned("edm", "like")
    assert not warned("cosine", "elbo") and not warned("cauchy", "elbo") and not warned("laplace", "v")
    assert not warned("learned", "elbo") and not warned("linear", "elbo")     # (linear: its own support's ends)
