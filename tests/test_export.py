"""export: a run's schedule as tables; a new export to a path replaces only an earlier export there, and leaves no
file of the earlier one (a class table, a sidecar) that disagrees with it."""
import json

import numpy as np
import pytest
import torch

from adaptive_sched import schedules
from adaptive_sched.cli import main
from adaptive_sched.errors import UsageError
from adaptive_sched.export import export
from adaptive_sched.schedules.table import ClassTable, Table, write_class_table
from test_class_schedules import fake_run


def class_run(tmp_path, name: str, classes: int):
    """A run whose schedule is a `classes`-class table: class k is Laplace(μ = k, b = 1) on [-9, 11]."""
    t = np.linspace(0, 1, 201)
    tables = {k: (t, schedules.build("laplace", mu=float(k), b=1.0, logsnr_min=-9.0, logsnr_max=11.0).logsnr(
        torch.tensor(t)).numpy()) for k in range(classes)}
    write_class_table(tmp_path / f"{name}.table.csv", tables)
    return fake_run(tmp_path / name, {"name": "table", "path": str(tmp_path / f"{name}.table.csv")},
                    schedule_num_classes=classes, class_weights=[1.0] * classes)


def files(folder, stem="s"):
    return sorted(p.name for p in folder.glob(f"{stem}.*"))


def test_a_new_export_to_the_same_path_removes_the_earlier_ones_class_tables_and_sidecar(tmp_path):
    """The class tables (and a JSON export's lack of a sidecar) of the earlier export were left beside the new one:
    FILE.classes.csv still reloaded as the old run's 3-class schedule next to a 2-class or unconditional FILE.csv."""
    out = tmp_path / "out"
    out.mkdir()
    three, two = class_run(tmp_path, "three", 3), class_run(tmp_path, "two", 2)
    plain = fake_run(tmp_path / "plain", {"name": "laplace", "mu": 1.0, "logsnr_min": -10.0, "logsnr_max": 10.0})
    export(three, out / "s.csv", points=11)
    assert files(out) == ["s.class0.csv", "s.class1.csv", "s.class2.csv", "s.classes.csv", "s.csv", "s.csv.json"]

    export(two, out / "s.csv", points=11)                       # fewer classes: s.class2.csv was left
    assert files(out) == ["s.class0.csv", "s.class1.csv", "s.classes.csv", "s.csv", "s.csv.json"]
    assert schedules.build("table", path=str(out / "s.classes.csv")).num_classes == 2
    assert json.loads((out / "s.csv.json").read_text())["source_run"].endswith("two")

    export(three, out / "s.csv", points=11)
    export(plain, out / "s.csv", points=11)                     # unconditional: no class table may remain
    assert files(out) == ["s.csv", "s.csv.json"]
    meta = json.loads((out / "s.csv.json").read_text())
    assert meta["schedule"] == "laplace" and "num_classes" not in meta and "files" not in meta
    table = schedules.build("table", path=str(out / "s.csv"))
    assert isinstance(table, Table) and not isinstance(table, ClassTable)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    reference = schedules.build("laplace", mu=1.0, logsnr_min=-10.0, logsnr_max=10.0)
    np.testing.assert_allclose(table.logsnr(t).numpy(), reference.logsnr(t).numpy(), atol=1e-12)

    export(three, out / "s.csv", points=11)
    export(three, out / "s.csv", points=11, fmt="json")         # JSON into s.csv: the CSV export's files go
    assert files(out) == ["s.csv"]
    data = json.loads((out / "s.csv").read_text())
    assert len(data["classes"]) == 3 and len(data["logsnr"]) == 11


def test_export_replaces_an_earlier_export_but_no_other_file(tmp_path, capsys):
    """--out naming a run's metrics.csv (or a table export does not own) overwrote it with the schedule."""
    run = fake_run(tmp_path / "run", {"name": "laplace", "mu": 1.0, "logsnr_min": -10.0, "logsnr_max": 10.0})
    metrics = run / "metrics.csv"
    metrics.write_text("step,loss\n1,0.5\n")
    assert main(["export", str(run), "--out", str(metrics)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {metrics} already exists and is not an earlier export: remove it or choose another " \
                  f"name\n"
    assert metrics.read_text() == "step,loss\n1,0.5\n" and not (run / "metrics.csv.json").exists()
    for fmt in ("csv", "json"):                                 # an earlier export of either format is replaced
        path = tmp_path / f"e.{fmt}"
        export(run, path, points=5)
        export(run, path, points=7)
        rows = path.read_text().splitlines() if fmt == "csv" else json.loads(path.read_text())["t"]
        assert len(rows) == 7 + (fmt == "csv")
    mine = tmp_path / "c.class0.csv"                            # a file of the name a class table would take
    mine.write_text("mine\n")
    with pytest.raises(UsageError, match="c.class0.csv already exists and is not part of an earlier export"):
        export(class_run(tmp_path, "three", 3), tmp_path / "c.csv", points=5)
    assert mine.read_text() == "mine\n" and not (tmp_path / "c.csv").exists()


def test_an_exports_sidecar_is_not_an_export_to_replace(tmp_path):
    """--out FILE.csv.json would have put a JSON export over the sidecar of FILE.csv, which then lost its provenance."""
    run = fake_run(tmp_path / "run", {"name": "laplace", "mu": 1.0, "logsnr_min": -10.0, "logsnr_max": 10.0})
    export(run, tmp_path / "s.csv", points=5)
    sidecar = (tmp_path / "s.csv.json").read_text()
    with pytest.raises(UsageError, match="s.csv.json already exists and is not an earlier export"):
        export(run, tmp_path / "s.csv.json", points=5)
    assert (tmp_path / "s.csv.json").read_text() == sidecar


def test_a_json_export_reloads_as_the_same_table_as_the_csv_export(tmp_path):
    """`table` read only CSV: a JSON export (export --format json) was refused with "data row 1 has 2 field(s), the
    header 1". It now reloads to the CSV export's schedule, at and between the points."""
    run = fake_run(tmp_path / "run", {"name": "cosine", "shift": 1.0, "logsnr_min": -12.0, "logsnr_max": 14.0})
    from_csv = schedules.build("table", path=str(export(run, tmp_path / "s.csv", points=101)))
    from_json = schedules.build("table", path=str(export(run, tmp_path / "s.json", points=101)))
    source = schedules.build("cosine", shift=1.0, logsnr_min=-12.0, logsnr_max=14.0)
    knots = torch.linspace(0, 1, 101, dtype=torch.float64)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    lam = torch.linspace(-13, 15, 57, dtype=torch.float64)
    np.testing.assert_allclose(from_json.logsnr(knots).numpy(), source.logsnr(knots).numpy(), atol=1e-12)
    for method, x in (("logsnr", t), ("t_of", lam), ("density", lam)):
        np.testing.assert_array_equal(getattr(from_json, method)(x).numpy(), getattr(from_csv, method)(x).numpy())
    assert (from_json.logsnr_min, from_json.logsnr_max) == (-12.0, 14.0)


def test_a_conditional_json_export_reloads_as_its_marginal_like_its_csv(tmp_path):
    run = class_run(tmp_path, "cond", 2)
    marginal_csv = schedules.build("table", path=str(export(run, tmp_path / "m.csv", points=41)))
    marginal_json = schedules.build("table", path=str(export(run, tmp_path / "m.json", points=41)))
    assert isinstance(marginal_json, Table) and not isinstance(marginal_json, ClassTable)
    t = torch.linspace(0, 1, 201, dtype=torch.float64)
    np.testing.assert_array_equal(marginal_json.logsnr(t).numpy(), marginal_csv.logsnr(t).numpy())


@pytest.mark.parametrize("text,message", [
    ('{"t": [0, 1]}', "without array.* logsnr"), ('{"t": [0, 0.5, 1], "logsnr": [3, 1]}', "differ in length"),
    ('{"t": [0, 1], ', "neither a CSV nor valid JSON"), ('{"t": [0, 1], "logsnr": [1, 2]}', "strictly decreasing"),
    ('{"t": [0, 1], "logsnr": ["high", 2]}', "not a numeric"),
])
def test_a_table_file_that_is_broken_json_is_a_one_line_usage_error(tmp_path, text, message):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(UsageError, match=message) as err:
        schedules.build("table", path=str(tmp_path / "bad.json"))
    assert "\n" not in str(err.value)


def test_alphas_cumprod_follows_diffusers_convention():
    """diffusers' DDPM/DDIM schedulers index alphas_cumprod[k] = ᾱ((k + 1)/K), k = 0 the least noisy step, built as
    Π_{j≤k}(1 − β_j) with β_j = 1 − ᾱ((j + 1)/K)/ᾱ(j/K) (betas_for_alpha_bar). For the cosine schedule (Nichol &
    Dhariwal's ᾱ(t) = cos²(πt/2), offset s = 0) on a window wide enough that truncation is below 1e-12 here."""
    from adaptive_sched.export import alphas_cumprod
    K = 1000
    got = alphas_cumprod(schedules.build("cosine", logsnr_min=-60.0, logsnr_max=60.0), K)
    abar = lambda t: np.cos(np.pi * t / 2) ** 2          # noqa: E731
    betas = 1 - abar(np.arange(1, K + 1) / K) / abar(np.arange(K) / K)
    want = np.cumprod(1 - betas)                                          # (K,): index 0 = one step from clean
    np.testing.assert_allclose(got[:-1], want[:-1], rtol=1e-9, atol=1e-15)
    assert got[-1] == pytest.approx(1 / (1 + np.exp(60.0)), rel=1e-9)   # ᾱ(1) is the window's end, sigmoid(λ_min)
    linear = alphas_cumprod(schedules.build("linear"), K)               # DDPM's β in continuous time: g((k + 1)/K)
    k1 = np.arange(1, K + 1) / K
    np.testing.assert_allclose(linear, np.exp(-(0.1 * k1 + 0.5 * 19.9 * k1 ** 2)), rtol=1e-6)


def test_a_discrete_schedule_is_refused_with_a_message_that_says_why(tmp_path, capsys):
    """polynomial with levels is a step function of t: export wrote nothing, but said only "table: logsnr must be
    strictly decreasing in t (not monotone)", naming neither the schedule nor the reason."""
    run = fake_run(tmp_path / "run", {"name": "polynomial", "levels": 10})
    assert main(["export", str(run), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the polynomial schedule's λ(t) is not strictly decreasing") and \
        "discrete schedule (polynomial with levels) cannot be exported" in err and err.count("\n") == 1
    assert not (tmp_path / "p.csv").exists()
