"""export: a run's schedule as tables; a new export to a path replaces only an earlier export there, and leaves no
file of the earlier one (a class table, a sidecar) that disagrees with it."""
import json

import numpy as np
import pytest
import torch

from adaptive_sched import checkpoint, config as cfg, schedules
from adaptive_sched.cli import main
from adaptive_sched.errors import UsageError
from adaptive_sched.export import export
from adaptive_sched.schedules.table import ClassTable, Table, write_class_table


def fake_run(run_dir, schedule_config: dict, **extra):
    """An EMA snapshot with a config training `schedule_config` (no network: export reads only the schedule)."""
    run_dir.mkdir()
    config = cfg.from_dict({"schedule": schedule_config})
    snap = {"kind": "ema", "step": 7, "config": config.to_dict(), "model": {}, "data_shape": [2], **extra}
    checkpoint.atomic_save(snap, run_dir / checkpoint.EMA_NAME)
    return run_dir


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
