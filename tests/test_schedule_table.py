"""The `table` schedule: piecewise-linear λ(t) from a CSV, exact at grid points, density consistent."""
import numpy as np
import pytest
import torch

from adaptive_sched import schedules
from adaptive_sched.errors import UsageError
from adaptive_sched.schedules import write_table


@pytest.fixture
def laplace_table(tmp_path):
    source = schedules.build("laplace", mu=0.5, b=1.0, logsnr_min=-10.0, logsnr_max=10.0)
    t = np.linspace(0, 1, 201)
    lam = source.logsnr(torch.tensor(t)).numpy()
    path = tmp_path / "laplace.csv"
    write_table(path, t, lam)
    return source, path, t, lam


def test_round_trip_exact_at_grid_points(laplace_table):
    source, path, t, lam = laplace_table
    table = schedules.build("table", path=str(path))
    np.testing.assert_array_equal(table.logsnr(torch.tensor(t)).numpy(), lam)
    assert table.logsnr_min == lam[-1] and table.logsnr_max == lam[0]
    np.testing.assert_allclose(table.t_of(torch.tensor(lam)).numpy(), t, atol=1e-12)


def test_piecewise_linear_between_points_and_close_to_source(laplace_table):
    source, path, t, lam = laplace_table
    table = schedules.build("table", path=str(path))
    mid = 0.5 * (t[1:] + t[:-1])
    np.testing.assert_allclose(table.logsnr(torch.tensor(mid)).numpy(), 0.5 * (lam[1:] + lam[:-1]), atol=1e-12)
    fine = torch.linspace(0.02, 0.98, 500, dtype=torch.float64)
    assert (table.logsnr(fine) - source.logsnr(fine)).abs().max() < 0.02
    values = table.logsnr(torch.linspace(0, 1, 5001, dtype=torch.float64))
    assert (values[1:] <= values[:-1]).all()


def test_density_consistent_with_logsnr(laplace_table):
    _, path, t, lam = laplace_table
    table = schedules.build("table", path=str(path))
    # the density is constant on each segment, so a midpoint rule per segment integrates it exactly
    fine = np.sort(np.concatenate([lam, np.linspace(lam[-1], lam[0], 20001)]))
    mids = torch.tensor(0.5 * (fine[1:] + fine[:-1]))
    assert float((table.density(mids).numpy() * np.diff(fine)).sum()) == pytest.approx(1.0, abs=1e-9)
    # inside segment i the density is Δt/|Δλ|
    mids = 0.5 * (lam[1:] + lam[:-1])
    expected = np.diff(t) / -np.diff(lam)
    np.testing.assert_allclose(table.density(torch.tensor(mids)).numpy(), expected, rtol=1e-10)


def test_csv_has_export_columns(laplace_table):
    _, path, _, _ = laplace_table
    header = path.read_text().splitlines()[0].split(",")
    assert header == ["t", "logsnr", "density", "alpha", "sigma"]


def test_table_can_be_truncated_further(laplace_table):
    _, path, _, _ = laplace_table
    table = schedules.build("table", path=str(path), logsnr_min=-3.0, logsnr_max=4.0)
    ends = table.logsnr(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert ends.tolist() == [4.0, -3.0]


@pytest.mark.parametrize("content,match", [
    ("t,logsnr\n0,5\n0.5,6\n1,-5\n", "not monotone"),
    ("t,density\n0,1\n1,1\n", "lacks column"),
    ("t,logsnr\n0,5\n0.5,nan\n1,-5\n", "NaN"),
    ("t,logsnr\n0,5\n0.5,abc\n1,-5\n", "numeric"),
    ("t,logsnr\n0.1,5\n1,-5\n", "from 0 to 1"),
    ("t,logsnr\n0,5\n", "at least 2"),
    ("t,logsnr\n0,5\n0.5,0,9\n1,-5\n", "data row 2 has 3 field\\(s\\), the header 2"),   # not read as (0.5, 0)
    ("t,logsnr\n0,5\n0.5\n1,-5\n", "data row 2 has 1 field\\(s\\), the header 2"),
])
def test_bad_tables_are_refused(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(UsageError, match=match):
        schedules.build("table", path=str(path))


def test_missing_table_file(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        schedules.build("table", path=str(tmp_path / "nope.csv"))
