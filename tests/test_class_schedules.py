"""Class-conditional schedules: multi-class tables, the marginal mixture against closed forms, per-class medians,
per-class sampling grids, export of a conditional run, and the per-class density plot."""
import csv
import json

import numpy as np
import pytest
import torch

from adaptive_sched import checkpoint, class_schedules as cs, config as cfg, grids, schedules
from adaptive_sched.errors import UsageError
from adaptive_sched.export import export, load_run_schedule
from adaptive_sched.generate import sampling_grid
from adaptive_sched.plots import per_class_densities
from adaptive_sched.schedules.table import ClassTable, Table, write_class_table

F64 = torch.float64


class FixedPair:
    """A 2-class conditional schedule made of two fixed schedules in closed form (the independent reference)."""

    def __init__(self, first, second):
        self.parts, self.num_classes = [first, second], 2
        self.logsnr_min = min(p.logsnr_min for p in self.parts)
        self.logsnr_max = max(p.logsnr_max for p in self.parts)

    def _by_class(self, method, x, y):
        """parts[y].method(x) for an int y; for labels shaped like x, each part on its own rows (the protocol)."""
        if not isinstance(y, torch.Tensor):
            return getattr(self.parts[y], method)(x)
        out = torch.empty_like(x, dtype=F64)
        for k, part in enumerate(self.parts):
            out[y == k] = getattr(part, method)(x[y == k]).to(F64)
        return out

    def logsnr(self, t, y=None):
        return self._by_class("logsnr", t, y)

    def t_of(self, logsnr, y=None):
        return self._by_class("t_of", logsnr, y)

    def density(self, logsnr, y=None):
        return self._by_class("density", logsnr, y)


def laplace_cauchy(lo=-10.0, hi=10.0):
    return (schedules.build("laplace", mu=2.0, b=1.0, logsnr_min=lo, logsnr_max=hi),
            schedules.build("cauchy", mu=-1.0, gamma=2.0, logsnr_min=lo, logsnr_max=hi))


@pytest.fixture
def two_class(tmp_path):
    """A 2-class table file: class 0 = laplace on [-9, 11], class 1 = cauchy on [-12, 8], on t grids holding 0.5."""
    sources = (schedules.build("laplace", mu=1.0, b=1.0, logsnr_min=-9.0, logsnr_max=11.0),
               schedules.build("cauchy", mu=-2.0, gamma=1.0, logsnr_min=-12.0, logsnr_max=8.0))
    ts = (np.linspace(0, 1, 401), np.linspace(0, 1, 301))
    lams = tuple(s.logsnr(torch.tensor(t)).numpy() for s, t in zip(sources, ts))
    path = tmp_path / "two.csv"
    write_class_table(path, {0: (ts[0], lams[0]), 1: (ts[1], lams[1])})
    return path, sources, ts, lams


def test_multi_class_table_round_trip(two_class):
    path, _, ts, lams = two_class
    table = schedules.build("table", path=str(path))
    assert isinstance(table, ClassTable) and table.num_classes == 2
    for k in (0, 1):
        reference = Table(t=ts[k], logsnr=lams[k])
        t = torch.tensor(ts[k])
        np.testing.assert_array_equal(table.logsnr(t, k).numpy(), lams[k])
        np.testing.assert_allclose(table.t_of(torch.tensor(lams[k]), k).numpy(), ts[k], atol=1e-12)
        mids = 0.5 * (lams[k][1:] + lams[k][:-1])
        np.testing.assert_allclose(table.density(torch.tensor(mids), k).numpy(), np.diff(ts[k]) / -np.diff(lams[k]),
                                   rtol=1e-10)
        fine = torch.linspace(-13, 12, 2001, dtype=F64)
        np.testing.assert_array_equal(table.log_density(fine, k).numpy(), reference.log_density(fine).numpy())
    # y = None: the uniform mixture, whose survival is the average of the two tables' own t(λ)
    fine = torch.linspace(-13, 12, 5001, dtype=F64)
    expected = 0.5 * (Table(t=ts[0], logsnr=lams[0]).t_of(fine) + Table(t=ts[1], logsnr=lams[1]).t_of(fine))
    np.testing.assert_allclose(table.t_of(fine).numpy(), expected.numpy(), atol=1e-12)
    assert (table.logsnr_min, table.logsnr_max) == (-12.0, 11.0)
    header = path.read_text().splitlines()[0].split(",")
    assert header == ["class", "t", "logsnr", "density", "alpha", "sigma"]


def test_all_rows_are_the_marginal(tmp_path, two_class):
    _, _, ts, lams = two_class
    cosine = schedules.build("cosine", logsnr_min=-12.0, logsnr_max=11.0)
    t = np.linspace(0, 1, 101)
    lam = cosine.logsnr(torch.tensor(t)).numpy()
    path = tmp_path / "with_all.csv"
    write_class_table(path, {1: (ts[1], lams[1]), "all": (t, lam), 0: (ts[0], lams[0])})
    table = schedules.build("table", path=str(path))
    np.testing.assert_array_equal(table.logsnr(torch.tensor(t)).numpy(), lam)
    np.testing.assert_array_equal(table.logsnr(torch.tensor(ts[1]), 1).numpy(), lams[1])


def test_tensor_labels_equal_per_class_scalar_calls(two_class):
    path, *_ = two_class
    table = schedules.build("table", path=str(path), logsnr_min=-10.0, logsnr_max=10.0)
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(1000, generator=gen, dtype=F64)
    lam = torch.empty(1000, dtype=F64).uniform_(-11, 11, generator=gen)
    y = torch.randint(2, (1000,), generator=gen)
    for method, x in (("logsnr", t), ("t_of", lam), ("density", lam), ("log_density", lam)):
        got = getattr(table, method)(x, y)
        expected = torch.where(y == 0, getattr(table, method)(x, 0), getattr(table, method)(x, 1))
        assert torch.equal(got, expected), method
    ones = table.sample(500, torch.Generator().manual_seed(3), y=torch.ones(500, dtype=torch.int64))
    assert torch.equal(ones, table.sample(500, torch.Generator().manual_seed(3), y=1))
    assert ones.dtype == torch.float32 and ones.min() >= -10 and ones.max() <= 10


@pytest.mark.parametrize("y", [2, -1, True, 1.0, "0", torch.tensor([0, 2]), torch.tensor([0.0, 1.0]),
                               torch.tensor([0, 1, 1])])
def test_bad_labels_are_one_line_usage_errors(two_class, y):
    path, *_ = two_class
    table = schedules.build("table", path=str(path))
    with pytest.raises(UsageError) as err:
        table.logsnr(torch.tensor([0.1, 0.9], dtype=F64), y)
    assert "\n" not in str(err.value)


def test_label_for_unconditional_schedule_is_refused():
    with pytest.raises(UsageError, match="unconditional"):
        cs.check_label(0, 0)
    with pytest.raises(UsageError, match="unconditional"):
        grids.class_grid(schedules.build("cosine"), 0, 10, -5.0, 5.0)


@pytest.mark.parametrize("content,match", [
    ("class,t,logsnr\na,0,5\na,1,-5\n", "'a' is not an integer"),
    ("class,t,logsnr\n0,0,5\n0,1,-5\n1.5,0,5\n1.5,1,-5\n", "'1.5' is not an integer"),
    ("class,t,logsnr\n-1,0,5\n-1,1,-5\n", "is not an integer"),
    ("class,t,logsnr\n0,0,5\n0,1,-5\n2,0,5\n2,1,-5\n", "missing 1"),
    ("class,t,logsnr\nall,0,5\nall,1,-5\n", "has none"),
    ("class,t,logsnr\n0,0,5\n0,1,-5\n1,0,5\n1,0.5,6\n1,1,-5\n", "class 1: logsnr must be strictly decreasing"),
    ("class,t,logsnr\n0,0,5\n0,1,-5\n1,0,5\n", "class 1 needs at least 2 rows"),
    ("class,t,logsnr\n0,0,5\n0,1,x\n", "numeric"),
    ("class,t\n0,0\n0,1\n", "lacks column"),
])
def test_bad_class_column_is_a_one_line_error_naming_the_file(tmp_path, content, match):
    path = tmp_path / "bad_classes.csv"
    path.write_text(content)
    with pytest.raises(UsageError, match=match) as err:
        schedules.build("table", path=str(path))
    assert "bad_classes.csv" in str(err.value) and "\n" not in str(err.value)


def test_marginal_functions_against_the_analytic_mixture():
    pair = FixedPair(*laplace_cauchy())
    w = np.array([0.3, 0.7])
    lam = torch.linspace(-10, 10, 801, dtype=F64)
    a, b = pair.parts
    survival = 0.3 * a.t_of(lam) + 0.7 * b.t_of(lam)
    density = 0.3 * a.density(lam) + 0.7 * b.density(lam)
    np.testing.assert_allclose(cs.marginal_survival(pair, lam, [3, 7]).numpy(), survival.numpy(), atol=1e-14)
    np.testing.assert_allclose(cs.marginal_density(pair, lam, w).numpy(), density.numpy(), rtol=1e-13)
    t, knots = cs.marginal_table(pair, lam.numpy(), w)
    np.testing.assert_array_equal(knots, lam.numpy()[::-1])
    np.testing.assert_allclose(t, survival.numpy()[::-1], atol=1e-14)
    assert t[0] == 0.0 and t[-1] == 1.0 and (np.diff(t) > 0).all()
    # the marginal at evenly spaced t inverts the mixture's survival function
    cols = cs.marginal_columns(pair, 201, w)
    back = 0.3 * a.t_of(torch.tensor(cols["logsnr"])) + 0.7 * b.t_of(torch.tensor(cols["logsnr"]))
    np.testing.assert_allclose(back.numpy(), cols["t"], atol=2e-5)


@pytest.mark.parametrize("elements", [1 << 16, 700, 1])
def test_the_marginal_computed_a_block_of_classes_at_a_time_is_the_per_class_sum(elements, monkeypatch):
    from adaptive_sched.schedules.learned import LearnedSchedule
    sched = LearnedSchedule(hidden=8, init="none", num_classes=5)
    with torch.no_grad():
        sched.class_c.normal_(generator=torch.Generator().manual_seed(0))
        sched.class_pi.normal_(generator=torch.Generator().manual_seed(1))
    lam = torch.linspace(-12, 12, 7 * 43, dtype=F64).view(7, 43)
    w = cs.class_weights(5, [1, 2, 3, 4, 5])
    one_by_one = sum(float(w[k]) * sched.t_of(lam, k).to(F64) for k in range(5))
    per_class = cs.per_class
    monkeypatch.setattr(cs, "per_class", lambda *args: per_class(*args, elements=elements))   # blocks of 5, 2 and 1
    torch.testing.assert_close(cs.marginal_survival(sched, lam, [1, 2, 3, 4, 5]), one_by_one, rtol=1e-15, atol=0)
    assert cs.marginal_survival(sched, torch.tensor(0.0, dtype=F64)).shape == ()


def test_class_table_marginal_is_the_exact_mixture_of_its_classes():
    sources = laplace_cauchy()
    knots = np.linspace(10, -10, 401)                        # both tables on the same λ knots
    tables = {k: (s.t_of(torch.tensor(knots)).numpy(), knots) for k, s in enumerate(sources)}
    table = ClassTable(tables, weights=[1.0, 3.0])
    survival = 0.25 * sources[0].t_of(torch.tensor(knots)) + 0.75 * sources[1].t_of(torch.tensor(knots))
    np.testing.assert_allclose(table.t_of(torch.tensor(knots)).numpy(), survival.numpy(), atol=1e-13)
    np.testing.assert_allclose(table.logsnr(survival).numpy(), knots, atol=1e-9)
    mids = torch.tensor(0.5 * (knots[1:] + knots[:-1]))
    exact_cell = np.diff(survival.numpy()) / -np.diff(knots)    # mixture mass per cell / cell width
    np.testing.assert_allclose(table.density(mids).numpy(), exact_cell, rtol=1e-8)
    closed_form = 0.25 * sources[0].density(mids) + 0.75 * sources[1].density(mids)
    np.testing.assert_allclose(table.density(mids).numpy(), closed_form.numpy(), rtol=2e-3)


def test_medians_and_spread():
    pair = FixedPair(schedules.build("laplace", mu=1.0, b=1.0, logsnr_min=-9.0, logsnr_max=11.0),
                     schedules.build("cauchy", mu=-2.0, gamma=1.0, logsnr_min=-12.0, logsnr_max=8.0))
    medians = cs.class_medians(pair)
    np.testing.assert_allclose(medians, [1.0, -2.0], atol=1e-12)
    spread = cs.median_spread(medians)
    assert spread["range"] == pytest.approx(3.0, abs=1e-12) and spread["std"] == pytest.approx(1.5, abs=1e-12)


def test_medians_of_a_class_table(two_class):
    path, *_ = two_class
    np.testing.assert_allclose(cs.class_medians(schedules.build("table", path=str(path))), [1.0, -2.0], atol=1e-12)


def test_median_of_density():
    lam = np.linspace(-10, 10, 4001)
    laplace = schedules.build("laplace", mu=1.0, b=1.0, logsnr_min=-9.0, logsnr_max=11.0)
    assert cs.median_of_density(lam, laplace.density(torch.tensor(lam)).numpy()) == pytest.approx(1.0, abs=1e-3)


def test_per_class_density_rows(two_class):
    path, *_ = two_class
    table = schedules.build("table", path=str(path))
    lam = torch.linspace(-12, 11, 51, dtype=F64)
    rows = cs.per_class_density_rows(table, lam, step=40, weights=[1, 1])
    assert len(rows) == 3 * 51 and {r["step"] for r in rows} == {40}
    assert [r["class"] for r in rows[::51]] == [0, 1, "all"]
    for k, chunk in zip((0, 1, "all"), (rows[:51], rows[51:102], rows[102:])):
        expected = table.density(lam, None if k == "all" else k)
        np.testing.assert_allclose([r["density"] for r in chunk], expected.numpy(), rtol=1e-12)
        assert [r["logsnr"] for r in chunk] == lam.tolist()


def test_class_grid_is_uniform_in_the_class_own_t():
    cosine, laplace = (schedules.build("cosine", logsnr_min=-15.0, logsnr_max=15.0),
                       schedules.build("laplace", mu=5.0, b=1.0, logsnr_min=-15.0, logsnr_max=15.0))
    pair = FixedPair(cosine, laplace)
    for steps in (1, 7, 32):
        grid = grids.class_grid(pair, 0, steps, -10.0, 12.0)
        assert grid.dtype == F64 and grid.shape == (steps + 1,)
        assert grid[0].item() == -10.0 and grid[-1].item() == 12.0 and (grid[1:] > grid[:-1]).all()
        np.testing.assert_allclose(grid.numpy(), sampling_grid("cosine", steps, -10.0, 12.0).numpy(), atol=1e-9)
    # a class whose mass sits at high λ gets its points there
    high = grids.class_grid(pair, 1, 20, -10.0, 12.0)
    assert (high > 3).sum() > 2 * (grids.class_grid(pair, 0, 20, -10.0, 12.0) > 3).sum()
    t = laplace.t_of(high[1:-1])
    np.testing.assert_allclose(np.diff(t.numpy()), np.diff(t.numpy()).mean(), rtol=1e-9)
    with pytest.raises(UsageError, match="outside"):
        grids.class_grid(pair, 2, 10, -10.0, 12.0)


def test_class_grid_of_a_table_close_to_cosine(tmp_path):
    cosine = schedules.build("cosine", logsnr_min=-15.0, logsnr_max=15.0)
    t = np.linspace(0, 1, 20001)
    lam = cosine.logsnr(torch.tensor(t)).numpy()
    path = tmp_path / "cos.csv"
    write_class_table(path, {0: (t, lam), 1: (t, lam - 1.0)})
    table = schedules.build("table", path=str(path))
    grid = grids.class_grid(table, 0, 25, -10.0, 12.0)
    assert grid[0].item() == -10.0 and grid[-1].item() == 12.0 and (grid[1:] > grid[:-1]).all()
    np.testing.assert_allclose(grid.numpy(), sampling_grid("cosine", 25, -10.0, 12.0).numpy(), atol=2e-3)


# --- export of a conditional run ------------------------------------------------------------------------------
def fake_run(run_dir, schedule_config: dict, **extra):
    """An EMA snapshot with a config training `schedule_config` (no network: export reads only the schedule)."""
    run_dir.mkdir()
    config = cfg.from_dict({"schedule": schedule_config})
    snap = {"kind": "ema", "step": 7, "config": config.to_dict(), "model": {}, "data_shape": [2], **extra}
    checkpoint.atomic_save(snap, run_dir / checkpoint.EMA_NAME)
    return run_dir


def test_export_of_a_class_conditional_run_writes_three_kinds_of_files(tmp_path, two_class):
    path, *_ = two_class
    run = fake_run(tmp_path / "run", {"name": "table", "path": str(path)}, schedule_num_classes=2,
                   class_weights=[1.0, 3.0])
    _, source, _ = load_run_schedule(run)
    out = export(run, tmp_path / "s.csv", points=401, discrete_steps=20)
    names = sorted(p.name for p in tmp_path.glob("s.*"))
    assert names == ["s.class0.csv", "s.class1.csv", "s.classes.csv", "s.csv", "s.csv.json"]
    meta = json.loads((tmp_path / "s.csv.json").read_text())
    assert meta["num_classes"] == 2 and meta["class_weights"] == [0.25, 0.75] and meta["step"] == 7
    assert meta["files"] == {"marginal": "s.csv", "classes": ["s.class0.csv", "s.class1.csv"],
                             "class_table": "s.classes.csv"}
    np.testing.assert_allclose(meta["class_medians"], [1.0, -2.0], atol=1e-12)
    assert len(meta["alphas_cumprod"]) == 20 and len(meta["alphas_cumprod_per_class"]) == 2
    # the marginal reloads as a plain table: t_marg = ¼ t(λ | 0) + ¾ t(λ | 1) at its rows
    marginal = schedules.build("table", path=str(out))
    assert isinstance(marginal, Table)
    lam = marginal.logsnr(torch.linspace(0, 1, 401, dtype=F64))
    expected = 0.25 * source.t_of(lam, 0) + 0.75 * source.t_of(lam, 1)
    np.testing.assert_allclose(torch.linspace(0, 1, 401, dtype=F64).numpy(), expected.numpy(), atol=1e-4)
    t = torch.linspace(0, 1, 401, dtype=F64)
    for k in (0, 1):
        plain = schedules.build("table", path=str(tmp_path / f"s.class{k}.csv"))
        np.testing.assert_allclose(plain.logsnr(t).numpy(), source.logsnr(t, k).numpy(), atol=1e-12)
    both = schedules.build("table", path=str(tmp_path / "s.classes.csv"))
    assert isinstance(both, ClassTable) and both.num_classes == 2
    np.testing.assert_array_equal(both.logsnr(t).numpy(), marginal.logsnr(t).numpy())
    for k in (0, 1):
        np.testing.assert_allclose(both.logsnr(t, k).numpy(), source.logsnr(t, k).numpy(), atol=1e-12)
    data = json.loads(export(run, tmp_path / "s.json", points=101).read_text())
    assert len(data["classes"]) == 2 and len(data["classes"][1]["logsnr"]) == 101 and len(data["logsnr"]) == 101
    np.testing.assert_allclose(data["classes"][0]["logsnr"],
                               source.logsnr(torch.linspace(0, 1, 101, dtype=F64), 0).numpy(), atol=1e-12)


def test_unconditional_run_exports_as_before(tmp_path):
    run = fake_run(tmp_path / "run", {"name": "laplace", "mu": 1.0, "logsnr_min": -10.0, "logsnr_max": 10.0})
    export(run, tmp_path / "u.csv", points=11)
    assert sorted(p.name for p in tmp_path.glob("u.*")) == ["u.csv", "u.csv.json"]
    meta = json.loads((tmp_path / "u.csv.json").read_text())
    assert set(meta) == {"schedule", "params", "logsnr_min", "logsnr_max", "objective", "step", "data", "target",
                         "source_run", "points"}
    data = json.loads(export(run, tmp_path / "u.json", points=11).read_text())
    assert "classes" not in data and list(data)[-5:] == ["t", "logsnr", "density", "alpha", "sigma"]


def test_load_run_schedule_passes_num_classes_to_the_learned_builder(tmp_path, monkeypatch, two_class):
    path, *_ = two_class
    calls = []

    def fake_learned(hidden=64, floor=0.02, init="cosine", num_classes=0, logsnr_min=-20.0, logsnr_max=20.0):
        calls.append({"init": init, "num_classes": num_classes, "window": (logsnr_min, logsnr_max)})
        return schedules.build("table", path=str(path))

    monkeypatch.setitem(schedules.SCHEDULES, "learned", fake_learned)
    run = fake_run(tmp_path / "run", {"name": "learned", "hidden": 8}, schedule_num_classes=2)
    _, schedule, _ = load_run_schedule(run)
    assert calls == [{"init": "none", "num_classes": 2, "window": (-20.0, 20.0)}] and schedule.num_classes == 2
    wrong = fake_run(tmp_path / "wrong", {"name": "learned"}, schedule_num_classes=3)
    with pytest.raises(UsageError, match="3 classes"):
        load_run_schedule(wrong)


def test_export_of_a_conditional_learned_run(tmp_path):
    if "num_classes" not in schedules.parameters("learned"):
        pytest.skip("LearnedSchedule does not take num_classes yet")
    learned = schedules.build("learned", hidden=8, init="none", num_classes=3, logsnr_min=-8.0, logsnr_max=8.0)
    run = fake_run(tmp_path / "run", {"name": "learned", "hidden": 8, "logsnr_min": -8.0, "logsnr_max": 8.0},
                   schedule_num_classes=3, schedule=learned.state_dict())
    out = export(run, tmp_path / "l.csv", points=101)
    assert schedules.build("table", path=str(tmp_path / "l.classes.csv")).num_classes == 3
    assert isinstance(schedules.build("table", path=str(out)), Table)


def test_per_class_density_plot(tmp_path, two_class):
    path, *_ = two_class
    table = schedules.build("table", path=str(path))
    rows = [row for step in (10, 20) for row in cs.per_class_density_rows(table, np.linspace(-12, 11, 200), step)]
    with (tmp_path / "density.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["step", "class", "logsnr", "density"])
        writer.writeheader()
        writer.writerows(rows)
    png = per_class_densities(tmp_path / "density.csv", tmp_path / "density.png", "two classes")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_class_tables_a_rounding_error_apart_have_no_gap():
    """Two classes' knots 1e-14 apart made a zero-width flat stretch of the marginal, refused as a gap."""
    from adaptive_sched.class_schedules import distinct_points
    from adaptive_sched.schedules.table import ClassTable
    cos = schedules.build("cosine", logsnr_min=-10.0, logsnr_max=10.0)
    t = np.linspace(0, 1, 2001)
    lam = cos.logsnr(torch.tensor(t, dtype=torch.float64)).numpy()
    table = ClassTable({0: (t, lam), 1: (t, lam + 1e-14 * np.sign(lam))})
    probe = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(table.logsnr(probe), cos.logsnr(probe), rtol=0, atol=1e-5)
    assert distinct_points(np.array([0.0, 1e-12, 0.5, 1.0 - 1e-12, 1.0]), 1e-9).tolist() == [0.0, 0.5, 1.0]
