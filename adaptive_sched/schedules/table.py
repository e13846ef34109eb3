"""A schedule given as a table of (t, λ) points, piecewise-linear in t (the learned-schedule export format).

Between grid points t_i < t_{i+1}, λ(t) is linear, so the density is piecewise constant in λ:
p(λ) = (t_{i+1} − t_i) / (λ_i − λ_{i+1}) on [λ_{i+1}, λ_i]. Exact at the grid points, monotone between.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch

from adaptive_sched.diffusion import alpha_sigma
from adaptive_sched.errors import UsageError
from adaptive_sched.schedules.base import Schedule

REQUIRED_COLUMNS = ("t", "logsnr")


def read_csv_rows(path: Path) -> tuple[list[str], list[dict]]:
    """(header, rows as dicts) of a CSV whose '#' lines are comments (the table and grid file formats)."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(row for row in handle if not row.startswith("#"))
        return list(reader.fieldnames or []), list(reader)


def read_table(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate columns t and logsnr from a CSV; raise UsageError naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"table file not found: {path} (write one with `adaptive-sched export RUN_DIR --out FILE.csv`)")
    try:
        fields, rows = read_csv_rows(path)
        missing = [c for c in REQUIRED_COLUMNS if c not in fields]
        if missing:
            raise UsageError(f"table {path} lacks column(s) {', '.join(missing)}; it needs columns t,logsnr")
        rows = [(row["t"], row["logsnr"]) for row in rows]
        values = np.array(rows, dtype=np.float64)
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        if isinstance(err, UsageError):
            raise
        raise UsageError(f"table {path} is not a numeric CSV with columns t,logsnr ({err})") from None
    if values.ndim != 2 or len(values) < 2:
        raise UsageError(f"table {path} needs at least 2 rows of t,logsnr")
    return validate_table(values[:, 0], values[:, 1], str(path))


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
    """λ(t) piecewise-linear through a table (t_i, λ_i); `path` is a CSV with columns t,logsnr."""

    name = "table"

    def __init__(self, path: str | None = None, logsnr_min: float | None = None, logsnr_max: float | None = None,
                 *, t: np.ndarray | None = None, logsnr: np.ndarray | None = None):
        if path is None and t is None:
            raise UsageError("table needs path=FILE.csv (columns t,logsnr)")
        if path is not None and not isinstance(path, (str, Path)):
            raise UsageError(f"table path must be a file name, got {path!r}")
        self.path = None if path is None else str(path)
        t_np, lam_np = read_table(path) if path is not None else validate_table(t, logsnr)
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


def write_table(path: str | Path, t: np.ndarray, logsnr: np.ndarray, density: np.ndarray | None = None,
                extra: dict | None = None) -> None:
    """Write a table CSV with columns t, logsnr, density, alpha, sigma (+extra), atomically.

    `density` defaults to the piecewise-constant density of the table itself.
    """
    t, logsnr = validate_table(t, logsnr)
    lam = torch.from_numpy(logsnr)
    if density is None:
        density = Table(t=t, logsnr=logsnr).density(lam).numpy()
    alpha, sigma = alpha_sigma(lam)
    columns = {"t": t, "logsnr": logsnr, "density": np.asarray(density, dtype=np.float64),
               "alpha": alpha.numpy(), "sigma": sigma.numpy()}
    columns.update(extra or {})
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(list(columns))
        for i in range(len(t)):
            writer.writerow([repr(float(columns[k][i])) for k in columns])
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


