"""Class-conditional schedules p(λ | k), k = 0..K−1: labels, the marginal mixture, per-class medians.

A conditional schedule has `num_classes` = K > 0 and takes y (None, an int label, or an int64 tensor shaped
like its argument) in logsnr, t_of, log_density, density and sample. With class weights w_k (Σ w_k = 1) the
marginal is the mixture
    p_marg(λ) = Σ_k w_k p(λ | k),   t_marg(λ) = P(Λ > λ) = Σ_k w_k t(λ | k)   (its survival function),
and the median of class k is λ(0.5 | k). Everything here is a pure function of a schedule and arrays.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from adaptive_sched.bisection import bisect_decreasing
from adaptive_sched.errors import UsageError

F64 = torch.float64


def num_classes(schedule) -> int:
    """K of a conditional schedule, 0 for an unconditional one (which has no such attribute)."""
    return int(getattr(schedule, "num_classes", 0))


def check_label(y, classes: int, shape: tuple | None = None):
    """y as the protocol allows it: None, an int in 0..K−1, or an integer tensor of `shape` with values in 0..K−1.

    Returns None, a Python int, or the tensor; anything else (and any y for K = 0) is a UsageError.
    """
    if y is None:
        return None
    if classes < 1:
        raise UsageError("a class label y was given to an unconditional schedule (num_classes = 0)")
    if isinstance(y, torch.Tensor):
        if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
            raise UsageError(f"class labels must be an int64 tensor, got dtype {y.dtype}")
        if shape is not None and tuple(y.shape) != tuple(shape):
            raise UsageError(f"class labels have shape {tuple(y.shape)}, expected {tuple(shape)} (one per value)")
        # value check on CPU only: on CUDA it would cost a host sync every training step, and an index outside
        # 0..K−1 fails there anyway (a device-side assert in the gather), never silently; not while torch.compile
        # traces (DiffusionLoss checks the labels eagerly before its compiled core)
        if y.numel() and y.device.type == "cpu" and not torch.compiler.is_compiling() and \
                (int(y.min()) < 0 or int(y.max()) >= classes):
            raise UsageError(f"class labels must lie in 0..{classes - 1}, got values in "
                             f"{int(y.min())}..{int(y.max())}")
        return y
    if isinstance(y, (int, np.integer)) and not isinstance(y, (bool, np.bool_)):
        if not 0 <= int(y) < classes:
            raise UsageError(f"class label {int(y)} is outside 0..{classes - 1}")
        return int(y)
    raise UsageError(f"a class label must be None, an int or an int64 tensor, got {type(y).__name__}")


def class_weights(classes: int, weights=None) -> np.ndarray:
    """w (K,) float64 summing to 1: uniform by default, else `weights` (finite, >= 0, not all 0) normalised."""
    if classes < 1:
        raise UsageError("class weights need a conditional schedule (num_classes >= 1)")
    if weights is None:
        return np.full(classes, 1.0 / classes)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(w) != classes or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise UsageError(f"class weights must be {classes} finite numbers >= 0, not all 0; got {list(w)}")
    return w / w.sum()


def _classes_of(schedule, weights) -> tuple[int, np.ndarray]:
    """(K, normalised w) of a conditional schedule; UsageError for an unconditional one."""
    k = num_classes(schedule)
    if k < 1:
        raise UsageError(f"{getattr(schedule, 'name', 'schedule')} is not class-conditional (num_classes = 0)")
    return k, class_weights(k, weights)


@torch.no_grad()
def marginal_survival(schedule, logsnr, weights=None) -> torch.Tensor:
    """t_marg(λ) = Σ_k w_k t(λ | k), the mixture's survival function P(Λ > λ); float64, λ's shape."""
    k, w = _classes_of(schedule, weights)
    lam = torch.as_tensor(logsnr, dtype=F64)
    return weighted_sum(w, per_class(schedule.t_of, lam, k))


def weighted_sum(w: np.ndarray, curves) -> torch.Tensor:
    """Σ_k w_k curve_k, accumulated in class order (the mixture of per-class survival functions or densities)."""
    return sum(float(w_k) * curve for w_k, curve in zip(w, curves))


def per_class(method, x: torch.Tensor, k: int, elements: int = 1 << 16):
    """method(x, c).to(float64) for c = 0..K−1, in that order, computed a block of classes per call: x repeated
    for each class of the block with labels shaped like it (the protocol's tensor y), at most ~`elements` values
    a call. One call per class made the marginal's bisection (64 halvings around a per-class bisection) slow."""
    block = max(1, elements // max(1, x.numel()))
    for first in range(0, k, block):
        labels = torch.arange(first, min(k, first + block)).view(-1, *([1] * x.dim()))
        xs = x.expand(len(labels), *x.shape).contiguous()
        yield from method(xs, labels.expand(xs.shape).to(x.device)).to(F64)


class Marginal:
    """The marginal Σ_k w_k p(λ | k) as a schedule for `grids.quantile_grid`: t(λ) = t_marg(λ) exactly, and
    λ(t) by bisection on it (64 halvings), so its quantiles carry no table's interpolation error."""

    def __init__(self, schedule, weights=None):
        self.schedule, self.weights = schedule, weights
        self.logsnr_min, self.logsnr_max = float(schedule.logsnr_min), float(schedule.logsnr_max)

    def t_of(self, logsnr) -> torch.Tensor:
        return marginal_survival(self.schedule, logsnr, self.weights)

    @torch.no_grad()
    def logsnr(self, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=F64)
        return bisect_decreasing(self.t_of, t, torch.full_like(t, self.logsnr_min), torch.full_like(t, self.logsnr_max))


@torch.no_grad()
def marginal_density(schedule, logsnr, weights=None) -> torch.Tensor:
    """p_marg(λ) = Σ_k w_k p(λ | k); float64, λ's shape."""
    k, w = _classes_of(schedule, weights)
    lam = torch.as_tensor(logsnr, dtype=F64)
    return weighted_sum(w, per_class(schedule.density, lam, k))


def distinct_points(points: np.ndarray, tol: float) -> np.ndarray:
    """The sorted points with each run of neighbours closer than `tol` kept as its first point, and the largest
    point always kept (so both ends of a sorted window stay exact)."""
    x = np.unique(points)
    kept = [x[0]]
    for value in x[1:-1]:
        if value - kept[-1] > tol and x[-1] - value > tol:
            kept.append(value)
    return np.array(kept + [x[-1]]) if len(x) > 1 else x


def marginal_table(schedule, logsnr_grid, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """(t increasing 0 → 1, λ decreasing) of the marginal at the grid's points inside the schedule's window
    plus both window ends: t = t_marg(λ), exact at those points (piecewise linear between them).

    A stretch of λ where no class has mass leaves t_marg flat (λ(t) jumps): a UsageError naming it. Points closer
    than 1e-9 of the window are one point (two classes' knots a rounding error apart gave a zero-width "gap").
    """
    lo, hi = float(schedule.logsnr_min), float(schedule.logsnr_max)
    lam = np.asarray(logsnr_grid, dtype=np.float64).reshape(-1)
    lam = distinct_points(np.concatenate([lam[(lam > lo) & (lam < hi)], [lo, hi]]), 1e-9 * (hi - lo))[::-1].copy()
    t = marginal_survival(schedule, torch.from_numpy(lam), weights).numpy()
    t[0], t[-1] = 0.0, 1.0
    flat = np.flatnonzero(np.diff(t) <= 0)
    if len(flat):
        i = int(flat[0])
        raise UsageError(f"the classes put no mass on λ in [{lam[i + 1]:.6g}, {lam[i]:.6g}]: the marginal has a gap "
                         f"there and is not a (t, λ) table")
    return t, lam


@torch.no_grad()
def marginal_columns(schedule, points: int, weights=None, resolution: int = 8) -> dict[str, np.ndarray]:
    """The marginal at `points` evenly spaced t: t, λ_marg(t), p_marg(λ_marg(t)).

    λ_marg(t) inverts t_marg on a grid of resolution·points λ values evenly spaced over the window (exact
    there, linear between); the density is the exact mixture at the resulting λ.
    """
    if points < 2:
        raise UsageError(f"--points must be >= 2, got {points}")
    fine = np.linspace(schedule.logsnr_min, schedule.logsnr_max, max(2, resolution * points))
    t_fine, lam_fine = marginal_table(schedule, fine, weights)
    t = np.linspace(0.0, 1.0, points)
    lam = np.interp(t, t_fine, lam_fine)
    lam[0], lam[-1] = lam_fine[0], lam_fine[-1]
    return {"t": t, "logsnr": lam, "density": marginal_density(schedule, torch.from_numpy(lam), weights).numpy()}


@torch.no_grad()
def class_medians(schedule) -> np.ndarray:
    """(K,) float64: the median of p(λ | k) for each class, λ(0.5 | k)."""
    k = num_classes(schedule)
    if k < 1:
        raise UsageError(f"{getattr(schedule, 'name', 'schedule')} is not class-conditional (num_classes = 0)")
    half = torch.tensor([0.5], dtype=F64)
    return np.array([float(schedule.logsnr(half, c)[0]) for c in range(k)])


def median_spread(medians) -> dict[str, float]:
    """How far the class medians lie apart: range = max − min, std = their standard deviation (ddof 0)."""
    m = np.asarray(medians, dtype=np.float64)
    return {"range": float(m.max() - m.min()), "std": float(m.std())}


def median_of_density(logsnr, density) -> float:
    """The median of a density tabulated on an increasing λ grid (trapezoid CDF, normalised over the grid)."""
    lam, p = np.asarray(logsnr, dtype=np.float64), np.asarray(density, dtype=np.float64)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (p[1:] + p[:-1]) * np.diff(lam))])
    if not cdf[-1] > 0:
        return math.nan
    return float(np.interp(0.5, cdf / cdf[-1], lam))


@torch.no_grad()
def per_class_density_rows(schedule, logsnr_grid, step: int, weights=None) -> list[dict]:
    """Rows {step, class, logsnr, density} for a long-format CSV: p(λ | k) for k = 0..K−1 on the grid, then
    class "all" = the marginal Σ_k w_k p(λ | k)."""
    k, w = _classes_of(schedule, weights)
    lam = torch.as_tensor(logsnr_grid, dtype=F64).reshape(-1)
    densities = list(per_class(schedule.density, lam, k))
    curves = [*enumerate(densities), ("all", weighted_sum(w, densities))]      # the marginal from the same curves
    return [{"step": int(step), "class": c, "logsnr": float(x), "density": float(p)}
            for c, dens in curves for x, p in zip(lam.tolist(), dens.tolist())]
