"""The trainer on gmm: it approaches the exact denoiser, resumes exactly, and guards its run directory."""
import json
import math
import pickle

import pandas as pd
import pytest
import torch

from adaptive_sched import checkpoint, config as cfg
from adaptive_sched.errors import UsageError
from adaptive_sched.evaluate import sliced_wasserstein
from adaptive_sched.optim import build_optimizer
from adaptive_sched.train import train


def gmm_config(steps=200, **train_overrides):
    raw = {"data": {"name": "gmm", "n": 4000, "dim": 8},
           "model": {"name": "mlp", "hidden": 128, "depth": 2},
           "train": {"steps": steps, "batch_size": 128, "lr": 2e-3, "warmup": 20, "log_every": 25,
                     "checkpoint_every": 50, "target": "v", **train_overrides},
           "eval": {"every": 100, "n": 500, "sample_n": 0, "logsnr_points": 9}}
    return cfg.from_dict(raw)


@pytest.mark.slow
def test_training_on_gmm_approaches_the_exact_denoiser(tmp_path):
    config = gmm_config(steps=1500)
    config.eval.every = 100
    config.eval.sample_n = 500
    final = train(config, tmp_path / "run", progress=False)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv").dropna(subset=["eval_excess_mse"])
    first, last = metrics["eval_excess_mse"].iloc[0], metrics["eval_excess_mse"].iloc[-1]
    profile = pd.read_csv(tmp_path / "run" / "eval_profile.csv")
    exact = profile[profile.step == 1500]["oracle_eps_mse"].mean()
    assert last < 0.3 * first, (first, last)
    assert last < 0.05 * exact, (last, exact)      # within 5% of the exact denoiser's error, averaged over λ
    assert float(final["eval_swd"]) < 0.15          # samples land near the data (floor ≈ 0.05 at n=500)


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    train(gmm_config(steps=200), tmp_path / "straight", progress=False)
    train(gmm_config(steps=100), tmp_path / "resumed", progress=False)
    train(gmm_config(steps=200), tmp_path / "resumed", resume=True, progress=False)
    a = pd.read_csv(tmp_path / "straight" / "metrics.csv")
    b = pd.read_csv(tmp_path / "resumed" / "metrics.csv")
    assert list(a["step"]) == list(b["step"])
    assert abs(a["loss"].iloc[-1] - b["loss"].iloc[-1]) < 1e-5
    sa = checkpoint.load(tmp_path / "straight" / "checkpoint.pt")["model"]
    sb = checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")["model"]
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_run_dir_is_not_overwritten_and_resume_checks_config(tmp_path):
    train(gmm_config(steps=50), tmp_path / "run", progress=False)
    with pytest.raises(UsageError, match="--resume"):
        train(gmm_config(steps=50), tmp_path / "run", progress=False)
    with pytest.raises(UsageError, match="lr"):
        train(gmm_config(steps=100, lr=1e-4), tmp_path / "run", resume=True, progress=False)
    # finished: resuming again does nothing and returns the last row
    final = train(gmm_config(steps=50), tmp_path / "run", resume=True, progress=False)
    assert int(float(final["step"])) == 50


def test_a_run_without_its_checkpoint_is_not_trained_over(tmp_path):
    """A finished run brought back without checkpoints (as the GPU sessions bring them): training there, with or
    without --resume, started from step 0 over its metrics while its finished.json stayed, so a killed retrain
    counted as finished. A run killed before its first checkpoint restarts only with --resume."""
    run = tmp_path / "run"
    train(gmm_config(steps=50), run, progress=False)
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "ema.pt"):
        (run / name).unlink(missing_ok=True)
    before = (run / "metrics.csv").read_text()
    for resume in (False, True):
        with pytest.raises(UsageError, match="holds a finished run .finished.json. without its checkpoint"):
            train(gmm_config(steps=100), run, resume=resume, progress=False)
    assert (run / "metrics.csv").read_text() == before
    (run / "finished.json").unlink()                     # as a run killed before its first checkpoint
    with pytest.raises(UsageError, match="metrics.csv but no checkpoint .* pass --resume"):
        train(gmm_config(steps=50), run, progress=False)
    train(gmm_config(steps=50), run, resume=True, progress=False)
    assert (run / "metrics.csv").read_text().splitlines()[1:] != [] and (run / "finished.json").exists()


def test_a_metrics_csv_that_is_not_a_runs_is_not_overwritten(tmp_path):
    """A folder holding a file of the user's named metrics.csv: it was truncated and overwritten (only a run's own
    metrics were protected)."""
    run = tmp_path / "notes"
    run.mkdir()
    (run / "metrics.csv").write_text("my notes\nlr 1e-3 looked best\n")
    for resume in (False, True):
        with pytest.raises(UsageError, match=r"metrics.csv is not a run's metrics file \(its first line: 'my notes'\)"):
            train(gmm_config(steps=10), run, resume=resume, progress=False)
    assert (run / "metrics.csv").read_text() == "my notes\nlr 1e-3 looked best\n"


def test_a_resume_names_the_settings_it_changes(tmp_path, capsys):
    """A resume command that does not restate --checkpoint-every gets the default (500 here, 25 before): allowed,
    but said, since a rarer checkpoint can lose progress."""
    train(gmm_config(steps=50, checkpoint_every=25), tmp_path / "run", progress=False)
    capsys.readouterr()
    train(gmm_config(steps=60, checkpoint_every=25), tmp_path / "run", resume=True, progress=False)
    err = capsys.readouterr().err
    assert "note: resuming" in err and "[train] steps 50 → 60" in err and "checkpoint_every" not in err
    train(gmm_config(steps=70, checkpoint_every=500), tmp_path / "run", resume=True, progress=False)
    err = capsys.readouterr().err
    assert "[train] checkpoint_every 25 → 500, [train] steps 60 → 70" in err


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(tmp_path):
    """Resuming a 50-step checkpoint with steps = 25 returned at once and marked the run finished at step 25."""
    train(gmm_config(steps=50), tmp_path / "run", progress=False)
    with pytest.raises(UsageError, match="checkpoint is at step 50, beyond \\[train\\] steps 25"):
        train(gmm_config(steps=25), tmp_path / "run", resume=True, progress=False)


def test_a_resume_with_more_steps_trains_what_a_run_that_long_from_the_start_trains(tmp_path):
    """The lr has no horizon (warmup only), and the EMA and every draw depend on the step alone (a curriculum, which
    ramps over the steps, refuses the change): raising steps on resume gives the same weights and EMA bit for bit.
    metrics.csv differs only by the shorter run's final row (step 60, an eval), after which the step-75 row averages
    steps 61-75 instead of 51-75."""
    train(gmm_config(steps=100, warmup=80), tmp_path / "straight", progress=False)
    train(gmm_config(steps=60, warmup=80), tmp_path / "longer", progress=False)
    train(gmm_config(steps=100, warmup=80), tmp_path / "longer", resume=True, progress=False)
    a, b = (checkpoint.load(tmp_path / name / "checkpoint.pt") for name in ("straight", "longer"))
    assert a["step"] == b["step"] == 100
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["ema"]["params"], b["ema"]["params"]))
    ma, mb = (pd.read_csv(tmp_path / name / "metrics.csv") for name in ("straight", "longer"))
    assert list(ma["step"]) == [25, 50, 75, 100] and list(mb["step"]) == [25, 50, 60, 75, 100]
    assert mb["eval_eps_mse"].notna().tolist() == [False, False, True, False, True]
    same = mb[mb.step != 75].drop(index=mb.index[mb.step == 60]).reset_index(drop=True)
    assert same["loss"].tolist() == ma[ma.step != 75]["loss"].tolist()
    assert same["eval_eps_mse"].iloc[-1] == ma["eval_eps_mse"].iloc[-1]
    assert mb.loc[mb.step == 75, "loss"].item() != ma.loc[ma.step == 75, "loss"].item()


def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path):
    train(gmm_config(steps=100), tmp_path / "run", progress=False)
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="damaged"):
        state = checkpoint.load_training_state(tmp_path / "run")
    assert state["step"] == 50
    with pytest.warns(UserWarning, match="damaged"):              # resumed from step 50: the damaged file is set
        train(gmm_config(steps=100), tmp_path / "run", resume=True, progress=False)    # aside, not made the fallback
    assert (tmp_path / "run" / "checkpoint.damaged.pt").read_bytes() == b"truncated"
    assert checkpoint.load(tmp_path / "run" / "checkpoint.prev.pt")["step"] == 50
    assert checkpoint.load(tmp_path / "run" / "checkpoint.pt")["step"] == 100
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"truncated")
    metrics = (tmp_path / "run" / "metrics.csv").read_text()
    (tmp_path / "run" / "checkpoint.prev.pt").write_bytes(b"")         # no readable checkpoint left
    for resume in (True, False):                   # refused, not a fresh run over the old one's metrics.csv
        with pytest.warns(UserWarning, match="damaged"), pytest.raises(UsageError, match="checkpoint.prev.pt, neither readable"):
            train(gmm_config(steps=100), tmp_path / "run", resume=resume, progress=False)
    assert (tmp_path / "run" / "metrics.csv").read_text() == metrics


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_pickle_payload_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        torch.save({"kind": "ema", "x": Payload(str(marker))}, handle)
    with pytest.raises(UsageError, match="not a readable"):
        checkpoint.load(path)
    assert not marker.exists()
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UsageError):
        checkpoint.load(tmp_path / "plain.pkl")


def test_validation_refuses_bad_settings(tmp_path):
    with pytest.raises(UsageError, match="steps must be > 0"):
        train(gmm_config(steps=0), tmp_path / "a", progress=False)
    with pytest.raises(UsageError, match="batch_size"):
        train(gmm_config(steps=10, batch_size=10**6), tmp_path / "b", progress=False)


def test_optimizers_by_name():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert type(build_optimizer("adamw", params, 1e-3)).__name__ == "AdamW"
    assert type(build_optimizer("lamb", params, 1e-3)).__name__ == "Lamb"
    with pytest.raises(UsageError, match="unknown optimizer"):
        build_optimizer("adamz", params, 1e-3)


def test_sliced_wasserstein_of_a_shift_matches_closed_form():
    """For a shift s in 2-D, E_θ|θ·s| = (2/π)|s|, and SW1 of two equal samples is 0."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 2, generator=gen, dtype=torch.float64)
    shift = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert sliced_wasserstein(a, a) == 0.0
    assert sliced_wasserstein(a, a + shift, projections=4000) == pytest.approx(2 / math.pi * 5.0, rel=0.03)


def poison_steps(monkeypatch, bad_calls):
    """Make DiffusionLoss.terms return a NaN loss on the given (0-based) call numbers."""
    from adaptive_sched.losses import DiffusionLoss
    original, calls = DiffusionLoss.terms, {"n": 0}

    def terms(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        k = calls["n"]
        calls["n"] += 1
        if k in bad_calls:
            out.loss = out.loss * float("nan")
        return out
    monkeypatch.setattr(DiffusionLoss, "terms", terms)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    clean = train(gmm_config(steps=50), tmp_path / "clean", progress=False)
    poison_steps(monkeypatch, {30, 31, 32})
    final = train(gmm_config(steps=50), tmp_path / "poisoned", progress=False)
    metrics = pd.read_csv(tmp_path / "poisoned" / "metrics.csv")
    assert list(metrics["skipped"]) == [0, 3]          # logged at steps 25 and 50 (steps 31-33 were bad)
    assert math.isfinite(float(final["loss"])) and math.isfinite(float(final["eval_eps_mse"]))
    assert abs(float(final["loss"]) - float(clean["loss"])) < 0.5 * float(clean["loss"])
    weights = checkpoint.load(tmp_path / "poisoned" / "checkpoint.pt")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_streak_of_non_finite_losses_stops_the_run_keeping_the_last_good_state(tmp_path, monkeypatch):
    poison_steps(monkeypatch, set(range(10, 1000)))
    with pytest.raises(UsageError, match="non-finite losses in a row"):
        train(gmm_config(steps=200, max_nonfinite=5), tmp_path / "run", progress=False)
    state = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 25                        # saved at the first log step after the streak reached 5
    assert all(torch.isfinite(w).all() for w in state["model"].values())
    marker = json.loads((tmp_path / "run" / "diverged.json").read_text())
    assert (marker["step"], marker["streak"]) == (25, 15) and not (tmp_path / "run" / "finished.json").exists()


def test_a_resumed_run_clears_the_diverged_marker_and_finishes(tmp_path, monkeypatch):
    """diverged.json (compare's reason to skip a run) is the verdict of one attempt; a retry decides anew."""
    with monkeypatch.context() as patched:
        poison_steps(patched, set(range(10, 1000)))
        with pytest.raises(UsageError, match="non-finite losses in a row"):
            train(gmm_config(steps=50, max_nonfinite=5), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "diverged.json").exists()
    train(gmm_config(steps=50, max_nonfinite=5), tmp_path / "run", resume=True, progress=False)
    assert not (tmp_path / "run" / "diverged.json").exists() and (tmp_path / "run" / "finished.json").exists()


def test_on_eval_sees_every_eval_and_can_stop_the_run(tmp_path):
    seen = []

    class Stop(Exception):
        pass

    def on_eval(step, row):
        seen.append((step, row["eval_eps_mse"]))
        if step == 100:
            raise Stop

    with pytest.raises(Stop):
        train(gmm_config(steps=200), tmp_path / "run", progress=False, on_eval=on_eval)
    assert [s for s, _ in seen] == [100] and math.isfinite(seen[0][1])
    assert checkpoint.load(tmp_path / "run" / "checkpoint.pt")["step"] == 100


def test_a_run_saved_before_newer_config_keys_resumes():
    """A checkpoint written by an older version lacks keys added since (e.g. [train] conditional, [eval] guidance):
    a missing key counts as its default, so the run resumes; a missing key set to a non-default value does not."""
    from adaptive_sched.train import check_resumable
    current = gmm_config().to_dict()
    saved = {section: dict(values) for section, values in current.items()}
    for section, key in (("train", "conditional"), ("train", "p_uncond"), ("eval", "guidance"),
                         ("learned", "condition")):
        del saved[section][key]
    check_resumable(saved, current)                                   # no error
    changed = {section: dict(values) for section, values in current.items()}
    changed["train"]["conditional"] = True
    with pytest.raises(UsageError, match="conditional"):
        check_resumable(saved, changed)


@pytest.mark.parametrize("damage", ["deleted", "cut short"])
def test_resume_refuses_a_checkpoint_whose_metrics_rows_are_gone(tmp_path, damage):
    """A checkpoint ahead of metrics.csv (the log was deleted or cut short, e.g. by a sync that keeps only
    the ignored *.pt files) would otherwise finish a run with its eval rows missing."""
    train(gmm_config(steps=100), tmp_path / "run", progress=False)
    metrics = tmp_path / "run" / "metrics.csv"
    if damage == "deleted":
        metrics.unlink()
    else:
        metrics.write_text("\n".join(metrics.read_text().splitlines()[:3]) + "\n")   # header + steps 25, 50
    with pytest.raises(UsageError, match="metrics.csv .* step 100"):
        train(gmm_config(steps=200), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(UsageError, match="metrics.csv"):
        train(gmm_config(steps=100), tmp_path / "run", resume=True, progress=False)   # finished: still refused


def test_resume_accepts_a_checkpoint_saved_between_log_rows(tmp_path):
    # logs every 40 steps, checkpoints every 50: once the step-100 checkpoint is damaged, the run resumes from
    # the step-50 one, whose last log row (step 40) is still in metrics.csv
    train(gmm_config(steps=100, log_every=40), tmp_path / "run", progress=False)
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="damaged"):
        train(gmm_config(steps=120, log_every=40), tmp_path / "run", resume=True, progress=False)
    steps = list(pd.read_csv(tmp_path / "run" / "metrics.csv")["step"])
    assert steps == [40, 80, 100, 120]


def digits_config(steps=20, **train_overrides):
    raw = {"data": {"name": "digits"},
           "model": {"name": "unet", "channels": [8], "emb_dim": 16, "mid_blocks": 0},
           "train": {"steps": steps, "batch_size": 32, "log_every": 10, "checkpoint_every": 10, **train_overrides},
           "eval": {"every": steps, "n": 40, "sample_n": 0, "logsnr_points": 3}}
    return cfg.from_dict(raw)


def test_channels_last_trains_the_same_model_in_the_other_memory_layout(tmp_path):
    from adaptive_sched.run_build import build
    run = build(digits_config(channels_last=True))
    convs = [p for p in run.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)           # really NHWC, not 1x1 kernels that are both
    train(digits_config(), tmp_path / "nchw", progress=False)
    train(digits_config(channels_last=True), tmp_path / "nhwc", progress=False)
    a, b = (pd.read_csv(tmp_path / name / "metrics.csv") for name in ("nchw", "nhwc"))
    assert list(a["step"]) == list(b["step"]) == [10, 20]
    assert a["loss"].to_numpy() == pytest.approx(b["loss"].to_numpy(), rel=1e-4)
    sa, sb = (checkpoint.load(tmp_path / name / "ema.pt")["model"] for name in ("nchw", "nhwc"))
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)


def test_channels_last_is_refused_for_data_that_is_not_images(tmp_path):
    with pytest.raises(UsageError, match="channels_last .* images"):
        train(gmm_config(steps=10, channels_last=True), tmp_path / "run", progress=False)


def test_train_channels_last_on_the_command_line(tmp_path, capsys):
    from adaptive_sched.cli import main
    args = ["train", "--data", "digits", "--model", "unet", "--model-param", "channels=[8]", "--model-param",
            "mid_blocks=0", "--steps", "2", "--batch-size", "16", "--device", "cpu", "--eval-every", "1000",
            "--channels-last", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "run")]) == 0
    assert "channels_last = true" in (tmp_path / "run" / "config.toml").read_text()
    assert main(args + ["--data", "gmm", "--model", "mlp", "--out", str(tmp_path / "gmm")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0                   # one line, no traceback


def test_resuming_in_the_other_layout_moves_the_optimizer_state_too(tmp_path):
    # load_state_dict keeps the saved strides; CUDA's fused AdamW refuses state whose layout differs from the param's
    train(digits_config(steps=10), tmp_path / "run", progress=False)
    train(digits_config(steps=20, channels_last=True), tmp_path / "run", resume=True, progress=False)
    from adaptive_sched.run_build import build
    names = [name for name, _ in build(digits_config()).model.named_parameters()]   # the optimizer's order
    state = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    model, moments = state["model"], state["optimizer"]["state"]
    convs = [i for i, name in enumerate(names) if model[name].dim() == 4 and model[name].shape[-1] > 1]
    assert convs
    for i in convs:
        weight = model[names[i]]
        assert weight.is_contiguous(memory_format=torch.channels_last)
        assert moments[i]["exp_avg"].stride() == weight.stride() == moments[i]["exp_avg_sq"].stride()


def test_unresumable_names_the_run_dirs_whose_checkpoint_is_ahead_of_metrics(tmp_path, capsys):
    from adaptive_sched.run_checks import main, unresumable
    train(gmm_config(steps=50), tmp_path / "ok", progress=False)
    train(gmm_config(steps=50), tmp_path / "lost", progress=False)
    (tmp_path / "lost" / "metrics.csv").unlink()
    (tmp_path / "empty").mkdir()
    assert unresumable(tmp_path / "ok") is None and unresumable(tmp_path / "empty") is None
    assert "no metrics.csv" in unresumable(tmp_path / "lost")
    assert main(["--stale", *(str(tmp_path / name) for name in ("ok", "lost", "empty", "missing*"))]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "lost")]


def test_compile_mode_reaches_torch_compile_and_bad_values_are_refused(tmp_path, monkeypatch):
    from adaptive_sched import distributed, train as train_module
    modes = []
    monkeypatch.setattr(train_module, "compile_run", lambda run, mode="default": modes.append(mode))
    train(gmm_config(steps=10, compile=True, compile_mode="reduce-overhead"), tmp_path / "graphs", progress=False)
    assert modes == ["reduce-overhead"]
    assert (tmp_path / "graphs" / "metrics.csv").exists()
    with pytest.raises(UsageError, match=r"compile_mode must be one of default, reduce-overhead, got 'max'"):
        train(gmm_config(steps=10, compile=True, compile_mode="max"), tmp_path / "bad", progress=False)
    with pytest.raises(UsageError, match=r"compile_mode 'reduce-overhead' needs compile = true"):
        train(gmm_config(steps=10, compile_mode="reduce-overhead"), tmp_path / "bad", progress=False)
    with pytest.raises(UsageError, match=r"'reduce-overhead' \(CUDA graphs\) is for one process"):
        train_module.build(gmm_config(steps=10, compile=True, compile_mode="reduce-overhead"),
                           distributed.World(rank=0, size=2))
    assert not (tmp_path / "bad").exists()


def test_train_compile_mode_on_the_command_line(tmp_path, capsys):
    from adaptive_sched.cli import main
    base = ["train", "--data", "gmm", "--model", "mlp", "--steps", "2", "--batch-size", "16", "--device", "cpu",
            "--eval-every", "1000", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "a"), "--compile-mode", "reduce-overhead"]) == 2
    assert "needs compile = true (train --compile)" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "a"), "--compile-mode", "fast"]) == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err
