"""A schedule given as a table of (t, λ) points, piecewise-linear in t (the learned-schedule export format).

Between grid points t_i < t_{i+1}, λ(t) is linear, so the density is piecewise constant in λ:
p(λ) = (t_{i+1} − t_i) / (λ_i − λ_{i+1}) on [λ_{i+1}, λ_i]. Exact at the grid points, monotone between.

A CSV with a `class` column is a multi-class table (long format: class,t,logsnr[,density,...], classes
0..K−1 and optionally `all` for the marginal); `Table(path=...)` then returns a `ClassTable`, one Table per
class, following the conditional-schedule protocol of adaptive_sched.class_schedules.

A table read from a file keeps the sha256 of the bytes it parsed (`sha256`); a run records it (`table_source`) and
refuses to go on, or to report its schedule, once the file has changed (`check_table_source`). In a run, the window
[schedule] logsnr_min/logsnr_max must hold the table's λ range (`check_window`): a narrower one would clip it.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from adaptive_sched.atomic import atomic_open
from adaptive_sched.class_schedules import check_label, class_weights, marginal_table
from adaptive_sched.diffusion import alpha_sigma
from adaptive_sched.errors import UsageError
from adaptive_sched.schedules.base import Schedule, as_float_tensor, uniform_t

REQUIRED_COLUMNS = ("t", "logsnr")
CLASS_COLUMN = "class"
MARGINAL = "all"


def read_csv_rows(path: Path, data: bytes | None = None) -> tuple[list[str], list[dict]]:
    """(header, rows as dicts) of a CSV whose '#' lines are comments (the table and grid file formats); a row with
    more or fewer fields than the header is a UsageError (never read as shifted or partial values). `data`: the
    file's bytes, when the caller has read them (decoded as open() would)."""
    with (path.open(newline="") if data is None else io.TextIOWrapper(io.BytesIO(data), newline="")) as handle:
        reader = csv.DictReader(row for row in handle if not row.startswith("#"))
        rows = list(reader)
    fields = list(reader.fieldnames or [])
    for number, row in enumerate(rows, 1):
        if None in row or None in row.values():
            count = len(fields) + len(row.get(None, [])) - sum(v is None for v in row.values())
            raise UsageError(f"{path}: data row {number} has {count} field(s), the header {len(fields)}")
    return fields, rows


def _table_rows(path: Path, columns: tuple[str, ...]) -> tuple[list[dict], str]:
    """(rows, sha256 of the bytes read) of table CSV `path`, which must exist and have `columns`; UsageError
    otherwise."""
    if not path.is_file():
        raise UsageError(f"table file not found: {path} (write one with `adaptive-sched export RUN_DIR --out FILE.csv`)")
    data = path.read_bytes()
    if data.lstrip()[:1] == b"{":                  # `export --format json`: the same columns, as JSON arrays
        return _json_rows(path, data, columns), hashlib.sha256(data).hexdigest()
    try:
        fields, rows = read_csv_rows(path, data)
    except UnicodeDecodeError as err:
        raise UsageError(f"table {path} is not a text CSV ({err})") from None
    missing = [c for c in columns if c not in fields]
    if missing:
        raise UsageError(f"table {path} lacks column(s) {', '.join(missing)}; it needs columns {','.join(columns)}")
    return rows, hashlib.sha256(data).hexdigest()


def _json_rows(path: Path, data: bytes, columns: tuple[str, ...]) -> list[dict]:
    """Rows {column: value} of a JSON export (an object whose `columns` are equal-length arrays; a conditional run's
    JSON holds its marginal there, as its FILE.csv does); UsageError when it is not one."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"table {path} is neither a CSV nor valid JSON ({err})".replace("\n", " ")) from None
    missing = [c for c in columns if not isinstance(obj, dict) or not isinstance(obj.get(c), list)]
    if missing:
        raise UsageError(f"table {path} is JSON without array(s) {', '.join(missing)}; it needs {','.join(columns)} "
                         f"(an `export --format json` file, or a CSV)")
    lengths = {len(obj[c]) for c in columns}
    if len(lengths) != 1:
        raise UsageError(f"table {path}: the JSON arrays {', '.join(columns)} differ in length")
    return [{c: obj[c][i] for c in columns} for i in range(lengths.pop())]


def _numeric(path: Path, rows: list[dict], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Columns t and logsnr of `rows` as float64, validated by `validate_table`."""
    try:
        values = np.array([(row["t"], row["logsnr"]) for row in rows], dtype=np.float64)
    except (ValueError, TypeError) as err:
        raise UsageError(f"table {path} is not a numeric CSV with columns t,logsnr ({err})") from None
    if values.ndim != 2 or len(values) < 2:
        raise UsageError(f"{where} needs at least 2 rows of t,logsnr")
    return validate_table(values[:, 0], values[:, 1], where)


def read_table(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate columns t and logsnr from a CSV; raise UsageError naming what is wrong."""
    return _read_table(path)[:2]


def _read_table(path: str | Path) -> tuple[np.ndarray, np.ndarray, str]:
    """read_table's (t, λ) and the sha256 of the bytes they were parsed from."""
    path = Path(path)
    rows, digest = _table_rows(path, REQUIRED_COLUMNS)
    return *_numeric(path, rows, f"table {path}"), digest


def has_class_column(path: str | Path) -> bool:
    """True if `path` is a readable CSV whose header (first line that is not a '#' comment) has a class column."""
    try:
        with Path(path).open(newline="") as handle:
            header = next((line for line in handle if not line.startswith("#")), "")
    except (OSError, UnicodeDecodeError):
        return False
    return CLASS_COLUMN in next(csv.reader([header]), [])


def read_class_table(path: str | Path) -> dict:
    """{k: (t, λ)} for classes 0..K−1 (and "all" if present) from a long-format CSV; UsageError naming the file."""
    return _read_class_table(path)[0]


def _read_class_table(path: str | Path) -> tuple[dict, str]:
    """read_class_table's {k: (t, λ)} and the sha256 of the bytes they were parsed from."""
    path = Path(path)
    groups: dict = {}
    rows, digest = _table_rows(path, (CLASS_COLUMN,) + REQUIRED_COLUMNS)
    for row in rows:
        label = (row[CLASS_COLUMN] or "").strip()
        if label != MARGINAL:
            if not (label.isascii() and label.lstrip("+").isdecimal()):
                raise UsageError(f"table {path}: class {label!r} is not an integer 0..K-1 or {MARGINAL!r}")
            label = int(label)
        groups.setdefault(label, []).append(row)
    labels = sorted(k for k in groups if k != MARGINAL)
    if not labels or labels != list(range(len(labels))):
        missing = sorted(set(range(max(labels, default=-1) + 1)) - set(labels))
        raise UsageError(f"table {path}: the classes must be 0..K-1 with none missing; it has "
                         f"{', '.join(map(str, labels)) or 'none'}" + (f" (missing {missing[0]})" if missing else ""))
    return {k: _numeric(path, rows, f"table {path} class {k}") for k, rows in groups.items()}, digest


def validate_table(t: np.ndarray, logsnr: np.ndarray, where: str = "table") -> tuple[np.ndarray, np.ndarray]:
    """Check t strictly increases from 0 to 1 and λ strictly decreases, all finite; return float64 copies."""
    t, logsnr = np.array(t, dtype=np.float64), np.array(logsnr, dtype=np.float64)
    if t.shape != logsnr.shape or t.ndim != 1 or len(t) < 2:
        raise UsageError(f"{where}: t and logsnr must be 1-D of equal length >= 2")
    if not (np.isfinite(t).all() and np.isfinite(logsnr).all()):
        raise UsageError(f"{where}: holds NaN or infinite values")
    if not np.all(np.diff(t) > 0):
        raise UsageError(f"{where}: t must be strictly increasing")
    if abs(t[0]) > 1e-9 or abs(t[-1] - 1) > 1e-9:
        raise UsageError(f"{where}: t must run from 0 to 1, got {t[0]} to {t[-1]}")
    if not np.all(np.diff(logsnr) < 0):
        raise UsageError(f"{where}: logsnr must be strictly decreasing in t (not monotone)")
    t[0], t[-1] = 0.0, 1.0
    return t, logsnr


def interp(x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xs, ys) at x, xs increasing; constant beyond the ends."""
    xs, ys = xs.to(device=x.device, dtype=x.dtype), ys.to(device=x.device, dtype=x.dtype)
    idx = torch.searchsorted(xs, x.contiguous(), right=True).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
    frac = ((x - x0) / (x1 - x0)).clamp(0, 1)
    return y0 + frac * (y1 - y0)


class Table(Schedule):
    """λ(t) piecewise-linear through the (t, λ) table in CSV `path` (columns t,logsnr), or in the arrays t, logsnr of an
    `export --format json` file; a run's window must hold it.

    The window defaults (None) to the table's own λ range; a narrower one given here truncates the table, and a run
    (run_build.build_schedule) refuses a table its [schedule] logsnr_min/logsnr_max would cut.
    """

    name = "table"

    def __new__(cls, path: str | None = None, logsnr_min: float | None = None, logsnr_max: float | None = None,
                *, t: np.ndarray | None = None, logsnr: np.ndarray | None = None):
        """A `ClassTable` instead when `path` is a multi-class CSV (it has a class column)."""
        if cls is Table and isinstance(path, (str, Path)) and has_class_column(path):
            tables, digest = _read_class_table(path)
            return ClassTable(tables, logsnr_min, logsnr_max, path=str(path), sha256=digest)
        return super().__new__(cls)

    def __init__(self, path: str | None = None, logsnr_min: float | None = None, logsnr_max: float | None = None,
                 *, t: np.ndarray | None = None, logsnr: np.ndarray | None = None):
        if path is None and t is None:
            raise UsageError("table needs path=FILE.csv (columns t,logsnr)")
        if path is not None and not isinstance(path, (str, Path)):
            raise UsageError(f"table path must be a file name, got {path!r}")
        self.path = None if path is None else str(path)
        t_np, lam_np, self.sha256 = _read_table(path) if path is not None else (*validate_table(t, logsnr), None)
        self._cache: dict = {}
        self._t = torch.from_numpy(t_np)                 # (M,) increasing
        self._lam = torch.from_numpy(lam_np)             # (M,) decreasing
        self._lam_up, self._t_down = self._lam.flip(0).contiguous(), self._t.flip(0).contiguous()
        self.support = (float(lam_np[-1]), float(lam_np[0]))
        lo = self.support[0] if logsnr_min is None else logsnr_min
        hi = self.support[1] if logsnr_max is None else logsnr_max
        super().__init__(lo, hi)

    def params(self) -> dict:
        return {"path": self.path} if self.path is not None else {"points": len(self._t)}

    def _grid(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A table column on `like`'s device and dtype, copied there once (no copy per training step)."""
        key = (name, like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device=like.device, dtype=like.dtype)
        return self._cache[key]

    def _sf(self, x):  # natural t(λ): mass above λ
        return interp(x, self._grid("_lam_up", x), self._grid("_t_down", x))

    def _cdf(self, x):
        return 1 - self._sf(x)

    def _isf(self, s):
        return interp(s, self._grid("_t", s), self._grid("_lam", s))

    def _icdf(self, u):
        return self._isf(1 - u)

    def _log_pdf(self, x):  # log (t_{i+1} − t_i)/(λ_i − λ_{i+1}) on the segment holding λ
        lam_up, t_down = self._grid("_lam_up", x), self._grid("_t_down", x)
        idx = torch.searchsorted(lam_up, x.contiguous(), right=True).clamp(1, len(lam_up) - 1)
        slope = (t_down[idx - 1] - t_down[idx]) / (lam_up[idx] - lam_up[idx - 1])
        return torch.log(slope)


def _table_columns(t: np.ndarray, logsnr: np.ndarray, density: np.ndarray | None, where: str) -> dict:
    """Validated columns t, logsnr, density, alpha, sigma; the density defaults to the table's own."""
    t, logsnr = validate_table(t, logsnr, where)
    lam = torch.from_numpy(logsnr)
    if density is None:
        density = Table(t=t, logsnr=logsnr).density(lam).numpy()
    alpha, sigma = alpha_sigma(lam)
    return {"t": t, "logsnr": logsnr, "density": np.asarray(density, dtype=np.float64),
            "alpha": alpha.numpy(), "sigma": sigma.numpy()}


def _write_csv(path: str | Path, header: list[str], rows) -> None:
    """Write header and rows atomically (atomic.atomic_open: temp file, fsync, os.replace)."""
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_table(path: str | Path, t: np.ndarray, logsnr: np.ndarray, density: np.ndarray | None = None,
                extra: dict | None = None) -> None:
    """Write a table CSV with columns t, logsnr, density, alpha, sigma (+extra), atomically.

    `density` defaults to the piecewise-constant density of the table itself.
    """
    columns = _table_columns(t, logsnr, density, "table")
    columns.update(extra or {})
    rows = ([repr(float(columns[k][i])) for k in columns] for i in range(len(columns["t"])))
    _write_csv(path, list(columns), rows)


def write_class_table(path: str | Path, tables: dict) -> None:
    """Write a long-format multi-class table CSV (class, t, logsnr, density, alpha, sigma), atomically.

    `tables` maps class k = 0..K−1 (and optionally "all", the marginal) to (t, logsnr) or (t, logsnr, density);
    each density defaults to that table's own. Classes are written in order, then "all".
    """
    labels = sorted(k for k in tables if k != MARGINAL)
    if not labels or labels != list(range(len(labels))):
        raise UsageError(f"write_class_table needs classes 0..K-1 (and optionally {MARGINAL!r}), got {list(tables)}")
    rows = []
    for k in labels + ([MARGINAL] if MARGINAL in tables else []):
        t, logsnr, *density = tables[k]
        columns = _table_columns(t, logsnr, density[0] if density else None, f"class {k} table")
        rows += [[str(k)] + [repr(float(v[i])) for v in columns.values()] for i in range(len(columns["t"]))]
    _write_csv(path, [CLASS_COLUMN, "t", "logsnr", "density", "alpha", "sigma"], rows)


class ClassTable:
    """K per-class tables λ(t | k) and the marginal for y = None: the conditional-schedule protocol over tables.

    `tables` maps k = 0..K−1 (and optionally "all") to (t, λ); each becomes a `Table` truncated to the window.
    Without "all", the marginal is the mixture with `weights` (default uniform), built exactly: t_marg(λ) =
    Σ_k w_k t(λ | k) is piecewise linear between the union of the class tables' knots, so the marginal is the
    table through those knots. A tensor y is served class by class on the rows holding it (one Table call per
    class present, after one torch.unique).
    """

    name = "table"

    def __init__(self, tables: dict, logsnr_min: float | None = None, logsnr_max: float | None = None,
                 weights=None, path: str | None = None, sha256: str | None = None):
        labels = sorted(k for k in tables if k != MARGINAL)
        if not labels or labels != list(range(len(labels))):
            raise UsageError(f"a class table needs classes 0..K-1 (and optionally {MARGINAL!r}), got {list(tables)}")
        self.path, self.sha256, self.num_classes = path, sha256, len(labels)
        self.classes = [Table(t=tables[k][0], logsnr=tables[k][1], logsnr_min=logsnr_min, logsnr_max=logsnr_max)
                        for k in labels]
        self.logsnr_min = min(c.logsnr_min for c in self.classes)
        self.logsnr_max = max(c.logsnr_max for c in self.classes)
        if MARGINAL in tables:
            t, lam = tables[MARGINAL][:2]
            self.class_weights = None
        else:                          # t_of(λ, k) below uses only self.classes and the window just set
            self.class_weights = class_weights(self.num_classes, weights)
            knots = np.concatenate([c._lam.numpy() for c in self.classes])
            t, lam = marginal_table(self, knots, self.class_weights)
        self.marginal = Table(t=t, logsnr=lam, logsnr_min=logsnr_min, logsnr_max=logsnr_max)
        self.logsnr_min, self.logsnr_max = self.marginal.logsnr_min, self.marginal.logsnr_max

    def params(self) -> dict:
        return {"path": self.path, "num_classes": self.num_classes}

    def _by_class(self, method: str, x, y) -> torch.Tensor:
        """Table.<method>(x) of the marginal (y None), of class y (int), or of class y[i] at each x[i]."""
        x = as_float_tensor(x)
        y = check_label(y, self.num_classes, x.shape)
        if y is None:
            return getattr(self.marginal, method)(x)
        if isinstance(y, int):
            return getattr(self.classes[y], method)(x)
        y = y.to(x.device)
        out = torch.empty_like(x)
        for k in torch.unique(y).tolist():
            rows = y == k
            out[rows] = getattr(self.classes[k], method)(x[rows])
        return out

    def logsnr(self, t: torch.Tensor, y=None) -> torch.Tensor:
        """λ(t | y): decreasing in t, piecewise linear through class y's table (the marginal for y = None)."""
        return self._by_class("logsnr", t, y)

    def t_of(self, logsnr: torch.Tensor, y=None) -> torch.Tensor:
        """t(λ | y) = P(Λ > λ | y), the inverse of `logsnr`."""
        return self._by_class("t_of", logsnr, y)

    def log_density(self, logsnr: torch.Tensor, y=None) -> torch.Tensor:
        """log p(λ | y), piecewise constant; −inf outside the class's window."""
        return self._by_class("log_density", logsnr, y)

    def density(self, logsnr: torch.Tensor, y=None) -> torch.Tensor:
        """p(λ | y)."""
        return self._by_class("density", logsnr, y)

    def sample(self, n: int, generator: torch.Generator | None = None, device=None,
               dtype: torch.dtype = torch.float32, y=None) -> torch.Tensor:
        """n draws λ ~ p(λ | y) by inverse transform λ(t | y), t from `uniform_t`; y None, an int, or (n,)."""
        if device is None and generator is not None:
            device = generator.device
        return self.logsnr(uniform_t(n, generator, device), y).to(dtype)

    def __repr__(self) -> str:
        return (f"table(path={self.path!r}, num_classes={self.num_classes}, logsnr_min={self.logsnr_min}, "
                f"logsnr_max={self.logsnr_max})")


def table_span(schedule) -> tuple[float, float] | None:
    """(lowest, highest) λ the table holds, over all its classes for a ClassTable (before any window cut it);
    None for a schedule that is not a table."""
    parts = schedule.classes + [schedule.marginal] if isinstance(schedule, ClassTable) else [schedule]
    if not all(isinstance(part, Table) for part in parts):
        return None
    return min(p.support[0] for p in parts), max(p.support[1] for p in parts)


def check_window(schedule, logsnr_min: float, logsnr_max: float) -> None:
    """UsageError when a table's λ reaches beyond a run's window [logsnr_min, logsnr_max], which would clip it
    (the run would train on another schedule than the file's). Round-off at the ends passes (a relative 1e-6: a
    float32 copy of the window), so an export whose ends sit at its window loads."""
    span = table_span(schedule)
    if span is None:
        return
    low, high = span
    below = low < logsnr_min - 1e-6 * max(1.0, abs(logsnr_min))
    above = high > logsnr_max + 1e-6 * max(1.0, abs(logsnr_max))
    if not (below or above):
        return
    widen = {key: value for key, value, out in (("logsnr_min", math.floor(low), below),
                                                ("logsnr_max", math.ceil(high), above)) if out}
    where = f"table {schedule.path}" if schedule.path else "the table"
    raise UsageError(f"{where} spans logsnr {low!r} to {high!r}, beyond the run's window [{logsnr_min!r}, "
                     f"{logsnr_max!r}], which would clip it: widen the window to hold it ([schedule] "
                     f"{' and '.join(f'{k} = {v}' for k, v in widen.items())} in the config file, or "
                     f"{' '.join(f'--schedule-param {k}={v}' for k, v in widen.items())})")


def table_source(schedule) -> dict | None:
    """{"path", "sha256"} of the file a table was read from (what a run records, see check_table_source); None for a
    schedule that is not a table read from a file."""
    if not isinstance(schedule, (Table, ClassTable)) or getattr(schedule, "sha256", None) is None:
        return None
    return {"path": schedule.path, "sha256": schedule.sha256}


def check_table_source(recorded: dict | None, schedule, what: str, remedy: str) -> None:
    """UsageError when the table file a run recorded (`recorded`, from `table_source`) now holds other bytes than
    the ones `schedule` was built from; `what` starts the message (e.g. "cannot resume RUN"), `remedy` ends it. A
    run saved before runs recorded their table (None) passes."""
    if not recorded:
        return
    now = getattr(schedule, "sha256", None)
    if now != recorded["sha256"]:
        raise UsageError(f"{what}: table {recorded['path']} changed since the run started (sha256 "
                         f"{recorded['sha256'][:12]}... then, {str(now)[:12]}... now); {remedy}")
