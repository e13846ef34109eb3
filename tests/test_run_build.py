"""run_build: the build phase's factories, against closed forms and their refusals (the whole build is exercised
by test_train, test_conditioning and test_compiling)."""
import numpy as np
import pytest
import scipy.stats
import torch

from adaptive_sched import config as cfg
from adaptive_sched.errors import UsageError
from adaptive_sched.run_build import (build_schedule, build_weighting, conditional_schedule, metric_columns,
                                      resolve_device, schedule_at)


def test_resolve_device_names_and_refusals():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device is visible"):
            resolve_device("cuda")


@pytest.mark.parametrize("objective", ["variance", "adaptive"])
def test_the_schedule_weighting_of_a_learned_schedule_is_laplaces_effective_weighting(objective):
    # w(λ) = p_laplace(λ) · m_v(λ), with p the Laplace(0, 0.5) density truncated to [-20, 20] and m_v = 1 + e^{-λ}
    config = cfg.from_dict({"schedule": {"name": "learned"}, "train": {"target": "v"},
                            "learned": {"objective": objective, "weight_like": "laplace"}})
    w = build_weighting(config, learned=True)
    assert w.name == "like" and not w.relative
    lam = np.linspace(-6.0, 6.0, 25)
    law = scipy.stats.laplace(loc=0.0, scale=0.5)
    expected = law.pdf(lam) / (law.cdf(20.0) - law.cdf(-20.0)) * (1.0 + np.exp(-lam))
    got = w.log_weight(torch.tensor(lam, dtype=torch.float64)).exp().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_a_fixed_schedule_or_the_cvdm_objective_keeps_the_configured_weighting():
    fixed = cfg.from_dict({"schedule": {"name": "cosine"}})
    assert build_weighting(fixed, learned=False).name == "schedule"
    cvdm = cfg.from_dict({"schedule": {"name": "learned"}, "learned": {"objective": "cvdm"}})
    assert build_weighting(cvdm, learned=True).name == "schedule"
    sigmoid = cfg.from_dict({"schedule": {"name": "learned"}, "weighting": {"name": "sigmoid"}})
    assert build_weighting(sigmoid, learned=True).name == "sigmoid"


def test_schedule_at_moves_a_curriculum_parameter_linearly():
    # steps 0..100 of a 101-step run: b = 0.3 + 1.2 · step / 100
    s = cfg.ScheduleConfig("laplace", -20.0, 20.0, {}, curriculum={"b": "0.3:1.5:linear"})
    assert [schedule_at(s, step, 101).b for step in (0, 50, 100)] == pytest.approx([0.3, 0.9, 1.5])
    assert build_schedule(s, 25, 101).b == pytest.approx(0.6)


def test_a_curriculum_on_a_learned_schedule_or_a_conditional_one_is_refused():
    learned = cfg.ScheduleConfig("learned", -20.0, 20.0, {}, curriculum={"b": "0.3:1.5"})
    with pytest.raises(UsageError, match="learns its own"):
        build_schedule(learned)
    with pytest.raises(UsageError, match="do not combine"):
        conditional_schedule(learned, 10)
    with pytest.raises(UsageError, match="conditioned on 10 classes"):
        conditional_schedule(cfg.ScheduleConfig("cosine", -20.0, 20.0, {}), 10)


def test_metric_columns_add_curriculum_parameters_and_guided_metrics_per_scale():
    plain = cfg.from_dict({"schedule": {"name": "laplace", "curriculum": {"b": "0.3:1.5"}}})
    assert metric_columns(plain)[-1] == "schedule_b" and "eval_fid@w2" not in metric_columns(plain)
    guided = cfg.from_dict({"train": {"conditional": True}, "eval": {"guidance": [1.0, 2.0]}})
    columns = metric_columns(guided)
    assert columns[-6:] == ["eval_swd@w1", "eval_fid@w1", "eval_kid@w1", "eval_swd@w2", "eval_fid@w2", "eval_kid@w2"]


def test_like_weights_the_whole_of_a_wider_window():
    """`like`'s reference schedule took the default window ±20 whatever the run's: beyond it w was 0 (log -inf)."""
    import torch
    from adaptive_sched import config as cfg
    from adaptive_sched.run_build import build_weighting
    lam = torch.tensor([-24.0, 0.0, 22.0])
    for raw, learned in (({"schedule": {"name": "cosine", "logsnr_min": -25.0, "logsnr_max": 25.0},
                           "weighting": {"name": "like", "schedule": "laplace"}}, False),
                         ({"schedule": {"name": "learned", "logsnr_min": -25.0, "logsnr_max": 25.0}}, True)):
        w = build_weighting(cfg.from_dict(raw), learned)
        assert torch.isfinite(w.log_weight(lam)).all(), raw
    default = build_weighting(cfg.from_dict({"weighting": {"name": "like"}}), False)
    assert "logsnr_min" not in default.params                  # runs in the default window are unchanged
    mine = build_weighting(cfg.from_dict({"schedule": {"logsnr_min": -25.0},
                                          "weighting": {"name": "like", "logsnr_min": -22.0}}), False)
    assert mine.params["logsnr_min"] == -22.0                  # the user's own window for it wins


def test_the_unsampled_window_warning_reaches_every_trainer_once(tmp_path, capsys, monkeypatch):
    """Only the train command warned of an absolute weighting on a light-tailed fixed schedule; compare and sweep,
    which call train() (and so build()) themselves, trained in silence. build() warns now, once per warning and
    process (compare's seeds share one), and the train command does not repeat it."""
    from adaptive_sched import run_checks
    from adaptive_sched.cli import main
    from adaptive_sched.train import train
    monkeypatch.setattr(run_checks, "_WARNED", set())
    settings = {"data": {"name": "gmm", "n": 256}, "model": {"name": "mlp", "hidden": 16, "depth": 1},
                "schedule": {"name": "laplace"}, "weighting": {"name": "elbo"},
                "train": {"steps": 2, "batch_size": 16, "device": "cpu", "log_every": 2},
                "eval": {"every": 2, "n": 32, "sample_n": 0, "logsnr_points": 3}}
    (line,) = run_checks.unsampled_window(cfg.from_dict(settings))
    assert "λ is only ever drawn in [-8.32, 8.32] of the window [-20, 20]" in line
    for seed in (0, 1):                                    # as compare trains two seeds of one schedule
        settings["train"]["seed"] = seed
        train(cfg.from_dict(settings), tmp_path / f"seed{seed}", progress=False)
    assert capsys.readouterr().err == f"warning: {line}\n"
    monkeypatch.setattr(run_checks, "_WARNED", set())      # a fresh process: the train command says it once
    run = ["train", "--data", "gmm", "--model", "mlp", "--model-param", "hidden=16", "--model-param", "depth=1",
           "--steps", "2", "--batch-size", "16", "--eval-every", "2", "--device", "cpu", "--quiet"]
    assert main([*run, "--schedule", "laplace", "--weighting", "elbo", "--out", str(tmp_path / "cli")]) == 0
    assert [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning: ")] == [f"warning: {line}"]
    assert main([*run, "--schedule", "cosine", "--weighting", "elbo", "--out", str(tmp_path / "cosine")]) == 0
    assert "warning: " not in capsys.readouterr().err
