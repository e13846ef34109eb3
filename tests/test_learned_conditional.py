"""The class-conditional learned schedule λ(t, y): monotone with exact endpoints for every class and any
weights, a density per class, per-example labels, and the schedule objectives applied per class."""
import numpy as np
import pytest
import torch

from adaptive_sched import schedules, weighting
from adaptive_sched.diffusion import alpha_sigma
from adaptive_sched.errors import UsageError
from adaptive_sched.losses import DiffusionLoss
from adaptive_sched.schedules.learned import LOGIT_WINDOW, LearnedSchedule

F64 = torch.float64
LO, HI, K = -12.0, 9.0, 3
GL_NODES, GL_WEIGHTS = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(10))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randomised(scale, seed, num_classes=K, shared_only=False):
    """Every parameter (or only the shared ones) drawn from N(0, scale²)."""
    sched = LearnedSchedule(hidden=16, init="none", logsnr_min=LO, logsnr_max=HI, num_classes=num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sched.named_parameters():
            if not (shared_only and name.startswith("class_")):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return sched


def dense_t():
    tails = torch.logspace(-300, -1, 200, dtype=F64)
    return torch.sort(torch.cat([torch.tensor([0.0, 5e-324, 1 - 1e-16, 1.0], dtype=F64),
                                 tails, 1 - tails, torch.linspace(0, 1, 20001, dtype=F64)])).values


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_monotone_with_exact_endpoints_for_every_class(scale, seed):
    sched = randomised(scale, seed)
    t = dense_t()
    curves = []
    with torch.no_grad():
        for k in range(K):
            lam, slope = sched.logsnr_and_slope(t, k)
            assert lam[0].item() == HI and lam[-1].item() == LO
            assert torch.isfinite(lam).all() and torch.isfinite(slope).all() and (slope < 0).all()
            assert (lam[1:] <= lam[:-1]).all()
            assert (-slope >= 0.02 * (HI - LO) * (1 - 1e-9)).all()          # the floor ε holds per class
            lam32 = sched.logsnr(torch.tensor([0.0, 1e-45, 0.5, 1 - 6e-8, 1.0]), k)
            assert lam32[0].item() == HI and lam32[-1].item() == LO and (lam32[1:] <= lam32[:-1]).all()
            curves.append(lam)
    if scale <= 3:          # the offsets are live (at scale 30 the softmax saturates onto one unit in every class)
        assert (curves[0] - curves[1]).abs().max() > 1e-3 and (curves[1] - curves[2]).abs().max() > 1e-3


def integrate(sched, k) -> float:
    """∫ p(λ | k) dλ: 10-point Gauss–Legendre on panels whose edges are λ(t_i, k), each holding ≤ 1e-3 of the mass,
    with edges at the kinks of λ(t), t = sigmoid(±L) where ℓ = logit(t) meets the window [−L, L]."""
    tails = torch.logspace(-14, -3, 120, dtype=F64)
    kinks = torch.sigmoid(torch.tensor([-LOGIT_WINDOW, LOGIT_WINDOW], dtype=F64))
    t = torch.cat([tails, torch.linspace(0, 1, 1001, dtype=F64), 1 - tails, kinks])
    with torch.no_grad():
        edges = torch.unique(sched.logsnr(t, k).clamp(LO, HI))
        left, right = edges[:-1], edges[1:]
        x = 0.5 * (left + right) + 0.5 * (right - left) * GL_NODES[:, None]            # (10, panels)
        p = sched.density(x.reshape(-1), k).reshape(x.shape)
    return float((0.5 * (right - left) * (GL_WEIGHTS @ p)).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_density_integrates_to_one_per_class(seed):
    """Tolerance 1e-8: with the kinks as panel edges p is smooth on every panel, each holding ≤ 1e-3 of the
    mass, where a 10-point rule errs by < 1e-7 of the panel's mass (observed totals: ≤ 3e-10 up to weight
    scale 3); the mass outside the panels (t < 1e-14 and t > 1 − 1e-14) is 2e-14. Without the kink edges the
    two kink panels alone miss ~1e-7: the check is sharp enough to see a wrong slope on 1e-7 of the mass."""
    sched = randomised(1.0, seed)
    for k in range(K):
        assert integrate(sched, k) == pytest.approx(1.0, abs=1e-8), k
    assert integrate(sched, None) == pytest.approx(1.0, abs=1e-8)


def test_t_of_inverts_logsnr_and_slope_matches_autograd_per_class():
    sched = randomised(1.0, 3)
    t = torch.linspace(0.01, 0.99, 60, dtype=F64, requires_grad=True)
    for k in range(K):
        lam, slope = sched.logsnr_and_slope(t, k)
        (auto,) = torch.autograd.grad(lam.sum(), t)
        np.testing.assert_allclose(slope.detach().numpy(), auto.numpy(), rtol=1e-9)
        with torch.no_grad():
            back = sched.t_of(lam.detach(), k)
        np.testing.assert_allclose(back.numpy(), t.detach().numpy(), atol=1e-10)


def test_per_example_labels_match_per_class_scalar_calls():
    sched = randomised(1.0, 4)
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(300, generator=gen, dtype=F64)
    y = torch.randint(K, (300,), generator=gen)
    with torch.no_grad():
        lam, slope = sched.logsnr_and_slope(t, y)
        lam_grid = torch.linspace(LO - 1, HI + 1, 300, dtype=F64)
        outs = {"logsnr": lam, "slope": slope, "curvature": sched.curvature(t, y), "t_of": sched.t_of(lam_grid, y),
                "log_density": sched.log_density(lam_grid, y),
                "sample": sched.sample(300, torch.Generator().manual_seed(5), dtype=F64, y=y)}
        for k in range(K):
            ref = {"logsnr": sched.logsnr(t, k), "slope": sched.logsnr_and_slope(t, k)[1],
                   "curvature": sched.curvature(t, k), "t_of": sched.t_of(lam_grid, k),
                   "log_density": sched.log_density(lam_grid, k),
                   "sample": sched.sample(300, torch.Generator().manual_seed(5), dtype=F64, y=k)}
            for name in outs:
                assert torch.equal(outs[name][y == k], ref[name][y == k]), (name, k)


def test_zero_offsets_and_y_none_give_the_shared_schedule():
    shared = randomised(1.0, 5, shared_only=True)
    plain = LearnedSchedule(hidden=16, init="none", logsnr_min=LO, logsnr_max=HI)
    assert list(plain.state_dict()) == ["raw_u", "c", "raw_pi"]          # num_classes = 0: unchanged keys
    plain.load_state_dict({k: v for k, v in shared.state_dict().items() if not k.startswith("class_")})
    t = dense_t()
    with torch.no_grad():
        expected = plain.logsnr(t)
        for k in range(K):
            assert torch.equal(shared.logsnr(t, k), expected)
        assert torch.equal(shared.logsnr(t), expected)
        everything = randomised(1.0, 5)                                   # same shared draws, random offsets too
        assert torch.equal(everything.logsnr(t), expected)
        assert not torch.equal(everything.logsnr(t, 0), expected)
    # fit_to fits the shared parameters and leaves the offsets at zero
    fitted = LearnedSchedule(hidden=8, num_classes=2)
    assert (fitted.class_c == 0).all() and (fitted.class_pi == 0).all()
    with torch.no_grad():
        assert torch.equal(fitted.logsnr(t, 1), fitted.logsnr(t))


def test_params_and_state_dict():
    assert "num_classes" not in LearnedSchedule(init="none").params()
    sched = LearnedSchedule(hidden=5, init="none", num_classes=4)
    assert sched.params()["num_classes"] == 4 and sched.num_classes == 4
    shapes = {k: tuple(v.shape) for k, v in sched.state_dict().items()}
    assert shapes == {"raw_u": (5,), "c": (5,), "raw_pi": (5,), "class_c": (4, 5), "class_pi": (4, 5)}
    assert LearnedSchedule(init="none").num_classes == 0
    assert schedules.build("learned", init="none", num_classes=2).num_classes == 2


def test_bad_labels_and_parameters():
    sched = randomised(1.0, 6)
    t = torch.linspace(0, 1, 4, dtype=F64)
    bad = [K, -1, True, 1.0, "0", torch.tensor([0, 1, K, 0]), torch.tensor([0, -1, 0, 0]),
           torch.tensor([0.0, 1.0, 0.0, 0.0]), torch.tensor([0, 1]), torch.tensor([[0, 1, 0, 0]])]
    for y in bad:
        with pytest.raises(UsageError):
            sched.logsnr(t, y)
    with pytest.raises(UsageError):
        sched.t_of(t, K)
    with pytest.raises(UsageError):
        sched.sample(5, y=torch.zeros(4, dtype=torch.int64))
    plain = LearnedSchedule(hidden=4, init="none")
    for y in (0, torch.zeros(4, dtype=torch.int64)):
        with pytest.raises(UsageError, match="unconditional"):
            plain.logsnr(t, y)
    for n in (-1, 1.5, "two"):
        with pytest.raises(UsageError):
            LearnedSchedule(init="none", num_classes=n)
    loss = DiffusionLoss(sched, "eps", weighting.build("like", schedule="laplace", b=1.0))
    with pytest.raises(UsageError, match="cond"):
        loss.terms(lambda x, lam, y=None: torch.zeros_like(x), torch.zeros(4, 2))


class ClassProfile(torch.nn.Module):
    """On x0 = 0, ε = x_λ/σ; predicting ε̂ = a·ε with a = sigmoid(±λ) by class gives ℓ_ε = (1 − a)²·mean(ε²):
    class 0 is bad at low λ (ℓ ≈ sigmoid(−λ)²), class 1 at high λ (ℓ ≈ sigmoid(λ)²)."""

    def forward(self, x, logsnr, y):
        a = torch.sigmoid(torch.where(y == 0, logsnr, -logsnr))
        return a[:, None] * x / alpha_sigma(logsnr)[1][:, None]


def class_labels(n):
    return torch.arange(n) % 2


def expected_density(w, lam, k, floor, width):
    """(1 − ε)·w·ℓ_k/∫w·ℓ_k + ε/width on a grid: the density that minimises the estimator's variance for class k."""
    shape = torch.exp(w.log_weight(lam)) * torch.sigmoid(lam if k == 1 else -lam).square()
    return (1 - floor) * shape / torch.trapezoid(shape, lam) + floor / width


def distance(sched, w, k):
    lam = torch.linspace(sched.logsnr_min, sched.logsnr_max, 4001, dtype=F64)
    with torch.no_grad():
        gap = sched.density(lam, k) - expected_density(w, lam, k, sched.floor, sched.logsnr_max - sched.logsnr_min)
    return float(torch.trapezoid(gap.abs(), lam))


def test_variance_objective_moves_each_class_towards_its_own_loss_profile():
    """With cond, the variance gradient reaches class_c/class_pi per class: opposite loss profiles pull the two
    classes' schedules in opposite directions, each closer to its own optimum p ∝ w·ℓ_k."""
    sched = LearnedSchedule(hidden=16, num_classes=2, logsnr_min=-10.0, logsnr_max=10.0)
    w = weighting.build("like", schedule="normal", mean=0.0, std=3.0, logsnr_min=-10.0, logsnr_max=10.0)
    loss = DiffusionLoss(sched, "eps", w, objective="variance")
    x0, cond = torch.zeros(512, 16), class_labels(512)
    before = [distance(sched, w, k) for k in range(2)]
    mid0 = [float(sched.logsnr(torch.tensor(0.5), k).detach()) for k in range(2)]
    opt = torch.optim.Adam(sched.parameters(), lr=2e-2)
    for step in range(40):
        opt.zero_grad()
        loss.terms(ClassProfile(), x0, cond, torch.Generator().manual_seed(step), cond=cond).loss.mean().backward()
        if step == 0:
            assert sched.class_c.grad is not None and not torch.allclose(sched.class_c.grad[0], sched.class_c.grad[1])
        opt.step()
    after = [distance(sched, w, k) for k in range(2)]
    mid1 = [float(sched.logsnr(torch.tensor(0.5), k).detach()) for k in range(2)]
    assert after[0] < 0.8 * before[0] and after[1] < 0.8 * before[1], (before, after)
    assert mid1[0] < mid0[0] - 0.5 and mid1[1] > mid0[1] + 0.5, (mid0, mid1)   # class 0 down in λ, class 1 up


def test_conditional_loss_with_zero_offsets_equals_the_shared_one():
    """cond selects the class schedule; with zero offsets every class is the shared schedule, so the loss terms
    match an unconditional schedule with the same shared parameters; a fixed schedule ignores cond."""
    cond_sched = LearnedSchedule(hidden=8, init="none", num_classes=2)
    plain = LearnedSchedule(hidden=8, init="none")
    w = weighting.build("like", schedule="laplace", b=1.0)
    x0, cond = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), class_labels(64)
    model = ClassProfile()
    a = DiffusionLoss(cond_sched, "eps", w).terms(model, x0, cond, torch.Generator().manual_seed(1), cond=cond)
    b = DiffusionLoss(plain, "eps", w).terms(model, x0, cond, torch.Generator().manual_seed(1))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.logsnr, b.logsnr)
    fixed = DiffusionLoss(schedules.build("cosine"), "eps", w)
    c = fixed.terms(model, x0, cond, torch.Generator().manual_seed(1), cond=cond)
    d = fixed.terms(model, x0, cond, torch.Generator().manual_seed(1))
    assert torch.equal(c.loss, d.loss)


def test_adaptive_objective_fits_each_class_to_its_own_histogram():
    """adaptive + conditional: one histogram per class, and each class's p(λ | k) converges to its own
    (1 − ε)·w·ℓ_k/Z_k + ε/width, which for the two opposite profiles are far apart."""
    sched = LearnedSchedule(hidden=16, num_classes=2, logsnr_min=-10.0, logsnr_max=10.0)
    w = weighting.build("like", schedule="normal", mean=0.0, std=3.0, logsnr_min=-10.0, logsnr_max=10.0)
    loss = DiffusionLoss(sched, "eps", w, objective="adaptive")
    assert isinstance(loss.histogram, torch.nn.ModuleList) and len(loss.histogram) == 2
    x0, cond = torch.zeros(1024, 64), class_labels(1024)
    opt = torch.optim.Adam(sched.parameters(), lr=2e-2)
    for step in range(400):
        terms = loss.terms(ClassProfile(), x0, cond, torch.Generator().manual_seed(step), cond=cond)
        opt.zero_grad()
        (terms.loss.mean() + terms.extra).backward()
        opt.step()
    lam = torch.linspace(-10.0, 10.0, 4001, dtype=F64)
    probe = torch.tensor([-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0], dtype=F64)
    for k in range(2):
        ref = expected_density(w, lam, k, sched.floor, 20.0)
        want = torch.from_numpy(np.interp(probe.numpy(), lam.numpy(), ref.numpy()))
        other = torch.from_numpy(np.interp(probe.numpy(), lam.numpy(), expected_density(w, lam, 1 - k, sched.floor,
                                                                                             20.0).numpy()))
        with torch.no_grad():
            got = sched.density(probe, k)
        # the histogram of class k saw only class k's examples
        h = loss.histogram[k]
        centres = 0.5 * (h.edges[1:] + h.edges[:-1])
        q_ref = torch.from_numpy(np.interp(centres.numpy(), lam.numpy(), ref.numpy()))
        inner = centres.abs() < 6
        assert ((h.target_density()[inner] - q_ref[inner]).abs() / q_ref[inner]).median() < 0.1, k
        # within 10% of the peak (4% after these 400 steps, 3% after 500: the fit is still converging)
        assert (got - want).abs().max() < 0.1 * want.max(), (k, got.tolist(), want.tolist())
        assert (got - want).abs().max() < 0.25 * (other - want).abs().max(), k
