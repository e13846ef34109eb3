"""The learned schedule: monotone with exact endpoints for any weights, exact density, variance objective,
export and reload, resume."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from adaptive_sched import checkpoint, config as cfg, schedules, weighting
from adaptive_sched.data.gmm import make_gmm
from adaptive_sched.errors import UsageError
from adaptive_sched.export import export, load_run_schedule
from adaptive_sched.losses import DiffusionLoss
from adaptive_sched.schedules.base import uniform_t
from adaptive_sched.schedules.learned import LearnedSchedule
from adaptive_sched.train import train


def randomised(scale, seed, floor=0.02):
    sched = LearnedSchedule(hidden=16, floor=floor, init="none", logsnr_min=-12.0, logsnr_max=9.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sched.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return sched


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0, 100.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_monotone_with_exact_endpoints_for_any_weights(scale, seed):
    sched = randomised(scale, seed)
    t = torch.cat([torch.tensor([0.0, 1.0, 1e-300, 1 - 1e-16], dtype=torch.float64),
                   torch.linspace(0, 1, 20001, dtype=torch.float64)])
    lam, slope = sched.logsnr_and_slope(t)
    assert lam[0].item() == 9.0 and lam[1].item() == -12.0
    assert torch.isfinite(lam).all() and torch.isfinite(slope).all() and (slope < 0).all()
    grid = lam[4:]
    assert (grid[1:] <= grid[:-1]).all()
    # the floor: |dλ/dt| ≥ ε·(λ_max − λ_min), so p(λ) ≤ 1/(ε·(λ_max − λ_min)): no point mass
    assert (-slope >= 0.02 * 21.0 * (1 - 1e-9)).all()
    lam32 = sched.logsnr(torch.tensor([0.0, 1e-45, 0.5, 1.0]))
    assert torch.isfinite(lam32).all() and lam32[0].item() == 9.0 and lam32[-1].item() == -12.0


def test_slope_matches_autograd_and_density_integrates_to_one():
    sched = randomised(1.0, 3)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64, requires_grad=True)
    lam, slope = sched.logsnr_and_slope(t)
    (auto,) = torch.autograd.grad(lam.sum(), t)
    np.testing.assert_allclose(slope.detach().numpy(), auto.numpy(), rtol=1e-9)
    x = torch.linspace(-12.0, 9.0, 40001, dtype=torch.float64)
    with torch.no_grad():
        dens = sched.density(x)
    assert float(torch.trapezoid(dens, x)) == pytest.approx(1.0, abs=2e-3)
    with torch.no_grad():
        back = sched.t_of(sched.logsnr(t.detach()))
    np.testing.assert_allclose(back.numpy(), t.detach().numpy(), atol=1e-10)


@pytest.mark.parametrize("name,params", [("cosine", {}), ("laplace", {"b": 1.0}), ("edm", {})])
def test_init_fits_a_fixed_schedule(name, params):
    sched = LearnedSchedule(init="none")
    rmse = sched.fit_to(name, **params)
    assert rmse < 0.05
    ref = schedules.build(name, **params)
    lam = torch.linspace(-6, 6, 12, dtype=torch.float64)     # avoids λ = 0, Laplace's cusp
    with torch.no_grad():
        np.testing.assert_allclose(sched.density(lam).numpy(), ref.density(lam).numpy(), rtol=0.15, atol=2e-3)


def test_the_initial_fit_is_done_once_per_shape_and_copied_bit_for_bit():
    fresh = LearnedSchedule(hidden=12, floor=0.03, init="none", logsnr_min=-11.0, logsnr_max=8.0)
    fresh.fit_to("cosine")
    first = LearnedSchedule(hidden=12, floor=0.03, init="cosine", logsnr_min=-11.0, logsnr_max=8.0)
    with torch.no_grad():
        first.c.add_(1.0)                                       # training one schedule leaves the next one's start
    second = LearnedSchedule(hidden=12, floor=0.03, init="cosine", logsnr_min=-11.0, logsnr_max=8.0, num_classes=3)
    for a, b in zip((fresh.raw_u, fresh.c, fresh.raw_pi), (second.raw_u, second.c, second.raw_pi)):
        assert torch.equal(a, b)
    assert not torch.equal(first.c, second.c)
    other = LearnedSchedule(hidden=12, floor=0.03, init="laplace", logsnr_min=-11.0, logsnr_max=8.0)
    assert not torch.equal(other.c, second.c)                   # a different target is fitted, not copied
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:                                                        # a float64 schedule gets a float64 fit
        wide = LearnedSchedule(hidden=12, floor=0.03, init="cosine", logsnr_min=-11.0, logsnr_max=8.0)
        wide_fresh = LearnedSchedule(hidden=12, floor=0.03, init="none", logsnr_min=-11.0, logsnr_max=8.0)
        wide_fresh.fit_to("cosine")
    finally:
        torch.set_default_dtype(before)
    assert wide.c.dtype == torch.float64 and torch.equal(wide.c, wide_fresh.c) and not torch.equal(wide.c.float(),
                                                                                                    second.c)


def test_bad_parameters():
    for kwargs in (dict(floor=0.0), dict(floor=1.5), dict(hidden=0), dict(logsnr_min=3.0, logsnr_max=2.0),
                   dict(init="laplase")):
        with pytest.raises(UsageError):
            LearnedSchedule(**kwargs)


class OracleEps(torch.nn.Module):
    """The exact ε-predictor of a Gaussian mixture, as a 'model' (differentiable in x and λ)."""

    def __init__(self, mixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x, logsnr, y=None):
        return self.mixture.eps_hat(x.double(), logsnr.double()).float()


def estimator_stats(loss, model, x0, seed):
    with torch.no_grad():
        f = loss.terms(model, x0, generator=torch.Generator().manual_seed(seed)).loss.double()
    return f.mean().item(), f.var().item()


def test_variance_objective_reduces_the_estimator_variance_on_gmm():
    mixture = make_gmm(dim=4, k=3, seed=0)
    model = OracleEps(mixture)
    sched = LearnedSchedule(hidden=32, init="cosine")
    loss = DiffusionLoss(sched, "eps", weighting.build("like", schedule="laplace", b=1.0), objective="variance")
    x_eval = mixture.sample(40000, generator=torch.Generator().manual_seed(1))
    mean0, var0 = estimator_stats(loss, model, x_eval, 2)
    opt = torch.optim.Adam(sched.parameters(), lr=1e-2)
    for step in range(250):
        x0 = mixture.sample(512, generator=torch.Generator().manual_seed(100 + step))
        opt.zero_grad()
        loss.terms(model, x0, generator=torch.Generator().manual_seed(10_000 + step)).loss.mean().backward()
        opt.step()
    mean1, var1 = estimator_stats(loss, model, x_eval, 2)
    assert var1 < 0.55 * var0, (var0, var1)
    # and below sampling from the weighting's own schedule (laplace b=1, where w/p = 1 and f = ℓ)
    own = DiffusionLoss(schedules.build("laplace", b=1.0), "eps", weighting.build("like", schedule="laplace", b=1.0))
    assert var1 < estimator_stats(own, model, x_eval, 2)[1]
    # the objective itself does not move: both estimate ∫ w ℓ dλ
    assert mean1 == pytest.approx(mean0, rel=4 * np.sqrt(var0 / 40000) / mean0 + 0.01)


def test_variance_objective_refuses_relative_weightings():
    with pytest.raises(UsageError, match="absolute weighting"):
        DiffusionLoss(LearnedSchedule(init="none"), "eps", weighting.build("min-snr"), objective="variance")


def learned_config(steps):
    return cfg.from_dict({
        "data": {"name": "gmm", "n": 2000, "dim": 4},
        "schedule": {"name": "learned", "hidden": 16},
        "learned": {"lr": 1e-2, "freeze_steps": 10},
        "model": {"name": "mlp", "hidden": 64, "depth": 1},
        "train": {"steps": steps, "batch_size": 64, "log_every": 10, "checkpoint_every": 20, "target": "v"},
        "eval": {"every": 20, "n": 200, "sample_n": 0, "logsnr_points": 5}})


def test_resume_restores_the_schedule_and_its_optimizer(tmp_path):
    train(learned_config(40), tmp_path / "straight", progress=False)
    train(learned_config(20), tmp_path / "resumed", progress=False)
    train(learned_config(40), tmp_path / "resumed", resume=True, progress=False)
    a = checkpoint.load(tmp_path / "straight" / "checkpoint.pt")
    b = checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")
    for key in a["schedule"]:
        assert torch.allclose(a["schedule"][key], b["schedule"][key], atol=1e-6), key
    init = LearnedSchedule(hidden=16).state_dict()
    assert not torch.allclose(a["schedule"]["raw_pi"], init["raw_pi"]), "the schedule did not train"
    density = pd.read_csv(tmp_path / "straight" / "schedule_density.csv")
    assert list(density["step"]) == [20, 40]
    bins = pd.read_csv(tmp_path / "straight" / "loss_bins.csv")
    resumed_bins = pd.read_csv(tmp_path / "resumed" / "loss_bins.csv")
    assert list(bins["step"]) == [20, 40] and np.allclose(bins.values, resumed_bins.values, equal_nan=True)
    assert (tmp_path / "straight" / "schedule_density.png").stat().st_size > 1000


def test_export_and_reload_as_table(tmp_path):
    train(learned_config(20), tmp_path / "run", progress=False)
    _, learned, _ = load_run_schedule(tmp_path / "run")
    out = export(tmp_path / "run", tmp_path / "learned.csv", points=201, discrete_steps=50)
    table = schedules.build("table", path=str(out))
    t = torch.linspace(0, 1, 201, dtype=torch.float64)
    with torch.no_grad():
        expected = learned.logsnr(t)
    np.testing.assert_allclose(table.logsnr(t).numpy(), expected.numpy(), atol=1e-9)
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["t", "logsnr", "density", "alpha", "sigma"]
    np.testing.assert_allclose(frame["alpha"] ** 2 + frame["sigma"] ** 2, 1.0, rtol=1e-12)
    meta = json.loads((tmp_path / "learned.csv.json").read_text())
    assert meta["objective"] == "variance" and meta["step"] == 20 and len(meta["alphas_cumprod"]) == 50
    assert np.all(np.diff(meta["alphas_cumprod"]) < 0)
    export(tmp_path / "run", tmp_path / "learned.json")
    assert len(json.loads((tmp_path / "learned.json").read_text())["logsnr"]) == 1001
    with pytest.raises(UsageError, match="--alphas-cumprod must be >= 1, got 0"):     # was ignored, not refused
        export(tmp_path / "run", tmp_path / "zero.csv", discrete_steps=0)
    assert not (tmp_path / "zero.csv").exists()


@pytest.mark.slow
def test_train_learned_on_digits_through_the_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "adaptive_sched", "train", "--data", "digits", "--schedule", "learned",
         "--schedule-objective", "variance", "--model-param", "channels=[16,32]", "--steps", "20",
         "--batch-size", "32", "--eval-every", "20", "--target", "v", "--out", str(tmp_path / "run"), "--quiet"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "schedule_density.csv").exists()
    out = subprocess.run([sys.executable, "-m", "adaptive_sched", "export", str(tmp_path / "run"), "--out",
                          str(tmp_path / "s.csv")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_adaptive_objective_converges_to_the_analytic_density():
    """With ℓ ≡ 1 (a zero ε-predictor on zero data, D = 256) and w = p_normal(1, 2), the adaptive
    objective's fixed point is p = (1 − ε)·normal(1, 2) + ε·uniform."""
    sched = LearnedSchedule(hidden=32, init="cosine", logsnr_min=-10.0, logsnr_max=10.0)
    w = weighting.build("like", schedule="normal", mean=1.0, std=2.0, logsnr_min=-10.0, logsnr_max=10.0)
    loss = DiffusionLoss(sched, "eps", w, objective="adaptive")
    zero_model = lambda x, lam, y=None: torch.zeros_like(x)   # noqa: E731
    x0 = torch.zeros(1024, 256)
    opt = torch.optim.Adam(sched.parameters(), lr=1e-2)
    for step in range(300):
        terms = loss.terms(zero_model, x0, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        (terms.loss.mean() + terms.extra).backward()
        opt.step()
    lam = torch.tensor([-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    normal = schedules.build("normal", mean=1.0, std=2.0, logsnr_min=-10.0, logsnr_max=10.0)
    expected = (1 - sched.floor) * normal.density(lam) + sched.floor / 20.0
    with torch.no_grad():
        got = sched.density(lam).numpy()
    near = (lam - 1).abs().numpy() <= 2      # within a std of the mode: 10%; everywhere: 7% of the peak
    np.testing.assert_allclose(got[near], expected.numpy()[near], rtol=0.1)
    np.testing.assert_allclose(got, expected.numpy(), atol=0.015)
    with torch.no_grad():
        # the histogram itself estimated w·ℓ ∝ the laplace density
        q = loss.histogram.target_density()
    centres = 0.5 * (loss.histogram.edges[1:] + loss.histogram.edges[:-1])
    inner = (centres - 1).abs() < 5
    ref = (1 - sched.floor) * normal.density(centres) + sched.floor / 20.0
    assert ((q[inner] - ref[inner]).abs() / ref[inner]).median() < 0.1


def test_binned_adaptive_baseline_tracks_the_weighted_loss():
    """adaptive_binned samples from its own histogram; with ℓ ≡ 1 and w = p_normal(1, 2) its bins converge to w."""
    sched = schedules.build("adaptive_binned", bins=40, decay=0.9, logsnr_min=-10.0, logsnr_max=10.0)
    w = weighting.build("like", schedule="normal", mean=1.0, std=2.0, logsnr_min=-10.0, logsnr_max=10.0)
    loss = DiffusionLoss(sched, "eps", w)
    zero_model = lambda x, lam, y=None: torch.zeros_like(x)   # noqa: E731
    for step in range(200):
        loss.terms(zero_model, torch.zeros(2048, 256), generator=torch.Generator().manual_seed(step))
    centres = torch.linspace(-9.75, 9.75, 40, dtype=torch.float64)
    normal = schedules.build("normal", mean=1.0, std=2.0, logsnr_min=-10.0, logsnr_max=10.0)
    expected = (1 - 0.02) * normal.density(centres) + 0.02 / 20.0
    near = (centres - 1).abs() < 4
    got = sched.density(centres)
    assert ((got[near] - expected[near]).abs() / expected[near]).max() < 0.1
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    np.testing.assert_allclose(sched.t_of(sched.logsnr(t)).numpy(), t.numpy(), atol=1e-9)
    x = torch.linspace(-10, 10, 20001, dtype=torch.float64)
    assert float(torch.trapezoid(sched.density(x), x)) == pytest.approx(1.0, abs=1e-3)


def test_cvdm_objective_moves_the_schedule_through_the_loss_itself():
    """cvdm: no hooks; the schedule's gradient is that of the loss plus the smoothness penalty."""
    mixture = make_gmm(dim=4, k=3, seed=0)
    sched = LearnedSchedule(hidden=16, init="cosine")
    loss = DiffusionLoss(sched, "eps", weighting.build("schedule"), objective="cvdm", smoothness=1e-3)
    x0 = mixture.sample(256, generator=torch.Generator().manual_seed(0))
    terms = loss.terms(OracleEps(mixture), x0, generator=torch.Generator().manual_seed(1))
    (terms.loss.mean() + terms.extra).backward()
    grads = [p.grad for p in sched.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # the penalty is the batch's extra term, smoothness·mean((d²λ/dt²)²)/(λ_max − λ_min)² at the drawn t, and the
    # per-example loss is c·ℓ alone: recompute both without it
    plain = DiffusionLoss(sched, "eps", weighting.build("schedule"), objective="cvdm", smoothness=0.0)
    base = plain.terms(OracleEps(mixture), x0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(terms.loss.detach(), base.loss.detach()) and base.extra == 0.0
    t = uniform_t(256, torch.Generator().manual_seed(1))                 # the t the loss drew first
    width = sched.logsnr_max - sched.logsnr_min
    with torch.no_grad():
        penalty = 1e-3 * float((sched.curvature(t) / width).square().mean())
    assert float(terms.extra.detach()) == pytest.approx(penalty, rel=1e-6)
