"""Property tests (hypothesis) over every registered schedule with random valid parameters.

For each schedule, random parameters and a random window logsnr_min < logsnr_max are drawn from STRATEGIES
(one entry per registered name; `learned` gets random network weights, `table` a random monotone table,
`adaptive_binned` a random loss histogram). "Valid" means what `schedules.build` accepts: a draw it refuses
with a UsageError (e.g. a window holding no float64 mass) is rejected, not counted as a failure.
Properties: λ(t) finite and non-increasing on a t grid with t = 0, 1 and denormal t; exact endpoints;
p(λ) ≥ 0 integrating to 1; t_of(λ(t)) = t; sample() inside the window.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings, strategies as st

from adaptive_sched import schedules
from adaptive_sched.errors import UsageError

# per schedule and property; derandomized (the same draws every run) unless PROPERTY_EXAMPLES=N asks to explore
MAX_EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "25"))
SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize="PROPERTY_EXAMPLES" not in os.environ,
                    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
F64 = torch.float64
EPS = torch.finfo(F64).eps


@dataclass
class Spec:
    """One random schedule: keyword parameters for `schedules.build`, plus what build cannot take."""

    kwargs: dict
    weights: tuple | None = None              # learned: (seed, scale); adaptive_binned: (seed, scale, zero_frac)
    table: tuple | None = None                # table: (t, logsnr) arrays, written to a CSV and passed as path
    breaks: list = field(default_factory=list)  # λ where p(λ) has a kink or jump (quadrature panel edges)


def log_uniform(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(math.log(lo), math.log(hi)).map(math.exp)


@st.composite
def windows(draw) -> dict:
    """A window logsnr_min < logsnr_max somewhere in [-30, 85], 0.05 to 60 wide."""
    lo = draw(st.floats(-30.0, 25.0))
    return {"logsnr_min": lo, "logsnr_max": lo + draw(log_uniform(0.05, 60.0))}


@st.composite
def location_scale(draw, loc: str, scale: str, loc_map=lambda v: v, scale_map=lambda v: v) -> Spec:
    """A location from half a window below to half above it, a scale from 0.02 to 30 (in λ units)."""
    window = draw(windows())
    width = window["logsnr_max"] - window["logsnr_min"]
    mu = window["logsnr_min"] + draw(st.floats(-0.5, 1.5)) * width
    s = draw(log_uniform(0.02, 30.0))
    return Spec({loc: loc_map(mu), scale: scale_map(s), **window}, breaks=[mu])


@st.composite
def window_only(draw) -> Spec:
    return Spec(draw(windows()))


@st.composite
def linear(draw) -> Spec:
    beta_min = draw(log_uniform(0.01, 5.0))
    return Spec({"beta_min": beta_min, "beta_max": beta_min + draw(st.floats(0.0, 40.0)), **draw(windows())})


@st.composite
def polynomial(draw) -> Spec:
    """σ_min from 1e-4 to 1, σ_max 1.5 to 1e5 times it, c from 0.1 to 10; continuous or 2 to 60 levels."""
    sigma_min = draw(log_uniform(1e-4, 1.0))
    spec = {"c": draw(log_uniform(0.1, 10.0)), "rho": draw(st.floats(1.0, 15.0)), "sigma_min": sigma_min,
            "sigma_max": sigma_min * draw(log_uniform(1.5, 1e5)), "levels": draw(st.one_of(st.just(0),
                                                                                          st.integers(2, 60)))}
    return Spec({**spec, **draw(windows())})


@st.composite
def table(draw) -> Spec:
    """A random strictly monotone table (2 to 40 points), with no window or a random one."""
    m = draw(st.integers(2, 40))
    inner = draw(st.lists(st.floats(1e-6, 1 - 1e-6), min_size=m - 2, max_size=m - 2, unique=True))
    t = np.array([0.0, *sorted(inner), 1.0])
    assume(np.all(np.diff(t) > 1e-9))
    steps = draw(st.lists(log_uniform(1e-3, 20.0), min_size=m - 1, max_size=m - 1))
    lam = draw(st.floats(-10.0, 40.0)) - np.concatenate([[0.0], np.cumsum(steps)])
    kwargs = draw(st.one_of(st.just({}), windows()))
    return Spec(kwargs, table=(t, lam), breaks=lam.tolist())


@st.composite
def learned(draw) -> Spec:
    """init="none", then every parameter re-drawn from N(0, scale²), scale ≤ 3, with 0–3 classes (the property
    tests use the shared schedule, y = None). Larger scales hold too (tests/test_learned_conditional.py) but
    integrate_density would need λ(sigmoid(±15)), where the units' logit window ends, as break points.
    """
    spec = {"hidden": draw(st.integers(1, 16)), "floor": draw(log_uniform(1e-3, 0.9)), "init": "none",
            "num_classes": draw(st.integers(0, 3))}
    return Spec({**spec, **draw(windows())}, weights=(draw(st.integers(0, 2 ** 31 - 1)), draw(log_uniform(0.01, 3.0))))


@st.composite
def binned(draw) -> Spec:
    """A histogram of log-normal bin values, some of them zero."""
    spec = {"bins": draw(st.integers(2, 60)), "decay": draw(st.floats(0.01, 0.99)),
            "floor": draw(log_uniform(1e-3, 0.9))}
    weights = (draw(st.integers(0, 2 ** 31 - 1)), draw(log_uniform(0.01, 5.0)), draw(st.floats(0.0, 0.9)))
    return Spec({**spec, **draw(windows())}, weights=weights)


# every registered schedule name -> a strategy of valid parameters for it
STRATEGIES: dict[str, st.SearchStrategy[Spec]] = {
    "cosine": location_scale("shift", "scale", scale_map=lambda s: s / 2),    # sech law of scale 2·scale
    "laplace": location_scale("mu", "b"),
    "cauchy": location_scale("mu", "gamma"),
    "normal": location_scale("mean", "std"),
    "edm": location_scale("p_mean", "p_std", loc_map=lambda v: -v / 2, scale_map=lambda s: s / 2),
    "logit_normal": location_scale("m", "s", loc_map=lambda v: -v / 2, scale_map=lambda s: s / 2),
    "logistic": location_scale("mu", "scale"),
    "flow": window_only(),
    "linear": linear(),
    "uniform": window_only(),
    "polynomial": polynomial(),
    "table": table(),
    "learned": learned(),
    "adaptive_binned": binned(),
}
NAMES = schedules.names()


def make(name: str, spec: Spec, folder) -> torch.nn.Module | schedules.Schedule:
    """Build the schedule of `spec`; a draw that build refuses (UsageError) is rejected by hypothesis."""
    kwargs = dict(spec.kwargs)
    if spec.table is not None:
        path = folder / f"table{abs(hash((spec.table[0].tobytes(), spec.table[1].tobytes())))}.csv"
        rows = "".join(f"{t!r},{lam!r}\n" for t, lam in zip(spec.table[0].tolist(), spec.table[1].tolist()))
        path.write_text("t,logsnr\n" + rows)
        kwargs["path"] = str(path)
    try:
        sched = schedules.build(name, **kwargs)
    except UsageError:
        assume(False)
    note(repr(sched))
    if spec.weights is not None:
        gen = torch.Generator().manual_seed(spec.weights[0])
        with torch.no_grad():
            if name == "learned":
                for p in sched.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * spec.weights[1])
            else:
                h = sched.histogram
                value = (torch.randn(h.value.shape, generator=gen, dtype=F64) * spec.weights[1]).exp()
                value[torch.rand(h.value.shape, generator=gen) < spec.weights[2]] = 0.0
                h.value.copy_(value)
                h.seen.fill_(1.0)
    return sched


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("tables")


def window_of(sched) -> tuple[float, float]:
    return float(sched.logsnr_min), float(sched.logsnr_max)


def t_grid(dtype: torch.dtype) -> torch.Tensor:
    """Increasing t with both ends, the smallest denormal, 1 − ulp, log-spaced tails and a uniform body."""
    tiny = 5e-324 if dtype == F64 else 1e-45
    below_one = 1 - 1e-16 if dtype == F64 else 1 - 6e-8
    tail = np.logspace(-300 if dtype == F64 else -44, -1, 60)
    t = np.concatenate([[0.0, tiny], tail, np.linspace(0, 1, 501), 1 - tail, [below_one, 1.0]])
    t = torch.tensor(t, dtype=F64).to(dtype)
    return torch.sort(t).values


def test_every_registered_schedule_has_a_strategy():
    assert set(STRATEGIES) == set(NAMES), "add a strategy for each new schedule to STRATEGIES"


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(data=st.data())
def test_strategies_draw_only_the_schedules_own_parameters(name, data):
    spec = data.draw(STRATEGIES[name])
    valid = set(schedules.parameters(name))
    assert set(spec.kwargs) <= valid
    # every parameter of the schedule is drawn (table: path is written from the drawn table)
    assert valid - set(spec.kwargs) - ({"path"} if name == "table" else set()) <= {"logsnr_min", "logsnr_max"}


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(data=st.data())
def test_logsnr_finite_monotone_with_exact_endpoints(name, data, folder):
    """λ(t) finite and non-increasing on the grid (float64 and float32), λ(0) = logsnr_max, λ(1) = logsnr_min.

    The endpoints are set exactly for closed forms, tables and the learned schedule; the binned schedule
    interpolates, y0 + 1·(y1 − y0), which may round once: a tolerance of 4 ulps of the window's magnitude.
    """
    sched = make(name, data.draw(STRATEGIES[name]), folder)
    lo, hi = window_of(sched)
    with torch.no_grad():
        for dtype in (F64, torch.float32):
            t = t_grid(dtype)
            lam = sched.logsnr(t)
            assert lam.dtype == dtype and lam.shape == t.shape
            assert torch.isfinite(lam).all(), (dtype, t[~torch.isfinite(lam)])
            bad = lam[1:] > lam[:-1]
            assert not bad.any(), (dtype, t[1:][bad][:5].tolist(), lam[1:][bad][:5].tolist())
        lam = sched.logsnr(torch.tensor([0.0, 1.0], dtype=F64))
    tol = 4 * EPS * max(abs(lo), abs(hi), 1.0)
    assert abs(lam[0].item() - hi) <= tol and abs(lam[1].item() - lo) <= tol, (lam.tolist(), lo, hi)
    requested_lo, requested_hi = sched_window_requested(sched)
    assert requested_lo <= lo < hi <= requested_hi     # a support may narrow the window, never widen it


def sched_window_requested(sched) -> tuple[float, float]:
    lo = getattr(sched, "logsnr_min_requested", sched.logsnr_min)
    hi = getattr(sched, "logsnr_max_requested", sched.logsnr_max)
    return float(lo), float(hi)


GL_NODES, GL_WEIGHTS = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(10))


def integrate_density(sched, breaks: list) -> float:
    """∫ p(λ) dλ over the window: 10-point Gauss–Legendre on panels in float64, plus the two end slivers.

    p may have an integrable power-law singularity at a window end (polynomial with c > 1:
    p ∝ (λ − end)^(1/c − 1), a few % of the mass within 1e-12 of the end for c = 10) that float64 nodes
    cannot resolve, so the slivers [lo, lo + δ] and [hi − δ, hi], δ = 1e-9·max(|lo|, |hi|, width), are
    taken from the CDF, 1 − t_of(lo + δ) and t_of(hi − δ) (t_of is coded apart from the density for every
    schedule). Panel edges on [lo + δ, hi − δ]: geometrically graded towards both ends, the schedule's
    kinks/jumps (`breaks`: location, table points, bin edges), and λ at log-spaced and uniform t, so each
    panel holds little mass however peaked p is; the ends are always edges, so a wrong λ(t) hides no mass.
    """
    lo, hi = window_of(sched)
    delta = 1e-9 * max(abs(lo), abs(hi), hi - lo)
    a, b = lo + delta, hi - delta
    tail = np.logspace(-14, -1.5, 15)
    t = torch.tensor(np.concatenate([tail, np.linspace(0, 1, 201), 1 - tail]), dtype=F64)
    graded = np.geomspace(delta, 0.1 * (hi - lo), 30)
    fixed = np.concatenate([[a, b], lo + graded, hi - graded, breaks])
    with torch.no_grad():
        edges = torch.cat([torch.tensor(fixed, dtype=F64), sched.logsnr(t).to(F64)])
        edges = torch.unique(edges.clamp(a, b))                      # sorted
        left, right = edges[:-1], edges[1:]
        x = 0.5 * (left + right) + 0.5 * (right - left) * GL_NODES[:, None]    # (10, panels)
        p = sched.density(x.reshape(-1)).reshape(x.shape)
        slivers = 1 - sched.t_of(torch.tensor(a, dtype=F64)) + sched.t_of(torch.tensor(b, dtype=F64))
    assert torch.isfinite(p).all() and (p >= 0).all(), p[~(torch.isfinite(p) & (p >= 0))][:5]
    return float((0.5 * (right - left) * (GL_WEIGHTS @ p)).sum() + slivers)


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(data=st.data())
def test_density_non_negative_and_normalised(name, data, folder):
    """p ≥ 0 everywhere (0 outside the window) and ∫p = 1 to 1e-6.

    1e-6: the rule is exact to ~1e-12 on smooth panels; the tolerance leaves room for a kink that falls
    inside a panel (a learned unit's power-law end, p ∝ (hi − λ)^((1−u)/u)), which costs far less than 1e-6
    on panels of 1e-14 to 1e-3 of the mass.
    """
    spec = data.draw(STRATEGIES[name])
    sched = make(name, spec, folder)
    lo, hi = window_of(sched)
    breaks = list(spec.breaks)
    if name == "adaptive_binned":
        breaks += sched.histogram.edges.tolist()
    if getattr(sched, "levels", 0):
        breaks += sched._cell_edges.tolist()    # polynomial's discrete variant: p is constant on each cell
    total = integrate_density(sched, breaks)
    assert total == pytest.approx(1.0, abs=1e-6)
    width = hi - lo
    with torch.no_grad():
        outside = sched.density(torch.tensor([lo - 0.5 * width - 1, hi + 0.5 * width + 1], dtype=F64))
        grid = sched.density(torch.linspace(lo, hi, 257, dtype=F64))
    assert (outside == 0).all() and torch.isfinite(grid).all() and (grid >= 0).all()


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(data=st.data())
def test_t_of_inverts_logsnr_at_interior_points(name, data, folder):
    """t_of(λ(t)) = t in float64 for t in [1e-3, 1 − 1e-3].

    The tolerance is the problem's conditioning: λ(t) is known to a few ulps of |λ|, and t moves by
    p(λ) per unit of λ, so t_of can be no closer than ~ulp(λ)·p(λ); plus 1e-9 for the truncated CDFs
    (t = (S(λ) − S(hi))/Z loses the relative precision of S(λ)/Z).
    """
    sched = make(name, data.draw(STRATEGIES[name]), folder)
    # polynomial with levels: λ(t) is a step function and t_of its histogram CDF, so t_of(λ(t)) ≠ t by design
    assume(not getattr(sched, "levels", 0))
    extra = data.draw(st.lists(st.floats(1e-3, 1 - 1e-3), max_size=20))
    t = torch.tensor(np.concatenate([np.linspace(1e-3, 1 - 1e-3, 199), extra]), dtype=F64)
    with torch.no_grad():
        lam = sched.logsnr(t).to(F64)
        back = sched.t_of(lam).to(F64)
        p = sched.density(lam).to(F64)
    tol = 1e-9 + 64 * EPS * (lam.abs() + 1) * p
    err = (back - t).abs()
    worst = int(torch.argmax(err - tol))
    assert (err <= tol).all(), {"t": t[worst].item(), "t_of": back[worst].item(), "logsnr": lam[worst].item(),
                                "density": p[worst].item(), "tol": tol[worst].item()}


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(data=st.data())
def test_sample_lies_in_the_window(name, data, folder):
    """sample() in float64 lies in [logsnr_min, logsnr_max]; in float32 in that window rounded to float32
    (rounding is monotone, so the rounded bounds are the tightest a float32 draw can be held to)."""
    sched = make(name, data.draw(STRATEGIES[name]), folder)
    lo, hi = window_of(sched)
    seed = data.draw(st.integers(0, 2 ** 31 - 1))
    with torch.no_grad():
        x64 = sched.sample(2000, generator=torch.Generator().manual_seed(seed), dtype=F64)
        x32 = sched.sample(2000, generator=torch.Generator().manual_seed(seed))
    assert x64.dtype == F64 and x32.dtype == torch.float32 and x64.shape == (2000,)
    assert torch.isfinite(x64).all() and x64.min().item() >= lo and x64.max().item() <= hi
    lo32, hi32 = torch.tensor([lo, hi], dtype=F64).float().tolist()
    assert torch.isfinite(x32).all() and x32.min().item() >= lo32 and x32.max().item() <= hi32


def test_learned_unit_parked_beyond_float64_reach_of_t():
    """One unit with slope u = 0.05 and centre c = −40: unrenormalised it was still ~0 at t = 1 − 1e-16, so λ
    jumped at t = 1 (λ(1 − 1e-16) = 0.5, λ(1) = 0) and ∫p over the window was ≈ 1.99 (issue 7). Each unit is
    now renormalised over its logit window, so λ is continuous at the ends and p integrates to 1."""
    sched = schedules.build("learned", hidden=1, floor=0.5, init="none", logsnr_min=0.0, logsnr_max=1.0)
    with torch.no_grad():
        sched.raw_u.fill_(-100.0)
        sched.c.fill_(-40.0)
        near_end, end = sched.logsnr(torch.tensor([1 - 1e-16, 1.0], dtype=F64)).tolist()
        total = integrate_density(sched, [])
    assert total == pytest.approx(1.0, abs=1e-6) and abs(near_end - end) < 1e-6
