"""Sampling grids: increasing λ grids λ_0 < … < λ_N for the samplers, by method, and grid CSV files.

Methods (all return N + 1 float64 points with λ_0 = lo and λ_N = hi, the sampling window's ends):
  cosine   : the default grid, λ_i = λ_cos(1 − i/N) of the cosine schedule truncated to [lo, hi].
  karras   : EDM's ρ-spaced noise levels (Karras et al. 2022, eq. 5) between σ_max = e^{−lo/2} and σ_min = e^{−hi/2}.
  quantile : equal-mass quantiles of a training density p(λ) restricted to the window (see `quantile_grid`);
             `class_grid` does the same for one class k of a class-conditional schedule, p(λ | k).
  ays      : Align Your Steps (Sabour, Fidler & Kreis 2024): minimise a Monte Carlo KLUB (see `klub`, `ays_grid`).
A grid file is a CSV with a `logsnr` column (rows noisiest first; `#` lines are comments), written by
`write_grid` with the extra columns alpha, sigma (VP) and edm_sigma = σ/α = e^{−λ/2}, and read by `read_grid`;
its JSON sidecar PATH.json records the CSV's sha256, and read_grid refuses a CSV that does not match it.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
from pathlib import Path
from typing import Callable

import torch

from adaptive_sched.atomic import atomic_open, atomic_write_json
from adaptive_sched.class_schedules import check_label
from adaptive_sched.diffusion import alpha_sigma
from adaptive_sched.errors import UsageError
from adaptive_sched.out_paths import output_file, read_json_dict, sidecar_path
from adaptive_sched.schedules.table import read_csv_rows

F64 = torch.float64
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (x (N, ...), λ (N,)) -> x̂0 (N, ...)
# (x (N, ...), λ (N,), y (N,) class labels) -> x̂0 (N, ...): a class-conditional denoiser (ays_grid with labels)
LabelledDenoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _pin(grid: torch.Tensor, lo: float, hi: float, what: str) -> torch.Tensor:
    """Set the ends to exactly lo and hi; UsageError unless finite and strictly increasing."""
    grid = grid.to(F64).clone()
    grid[0], grid[-1] = lo, hi
    if not (torch.isfinite(grid).all() and (grid[1:] > grid[:-1]).all()):
        raise UsageError(f"the {what} grid is not strictly increasing in [{lo}, {hi}] (repeated points); "
                         f"use fewer steps or another method")
    return grid


def _check(steps: int, lo: float, hi: float) -> None:
    """UsageError unless steps >= 1 and lo < hi are finite."""
    if not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps must be an integer >= 1, got {steps!r}")
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise UsageError(f"the sampling window needs finite logsnr_min < logsnr_max, got [{lo}, {hi}]")


def cosine_grid(steps: int, lo: float, hi: float) -> torch.Tensor:
    """λ_i = λ_cos(1 − i/N), the cosine schedule truncated to [lo, hi]: uniform in t (Hang & Gu's sampling grid)."""
    from adaptive_sched.generate import sampling_grid   # deferred: generate reads grid files through this module
    _check(steps, lo, hi)
    return _pin(sampling_grid("cosine", steps, lo, hi), lo, hi, "cosine")


def karras_grid(steps: int, lo: float, hi: float, rho: float = 7.0) -> torch.Tensor:
    """σ_i = (σ_max^{1/ρ} + (i/N)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, λ_i = −2 log σ_i: the polynomial law with c = 1."""
    from adaptive_sched.generate import sampling_grid
    _check(steps, lo, hi)
    grid = sampling_grid("polynomial", steps, lo, hi, c=1.0, rho=rho, sigma_min=math.exp(-hi / 2),
                         sigma_max=math.exp(-lo / 2))
    return _pin(grid, lo, hi, "karras")


def quantile_grid(schedule, steps: int, lo: float, hi: float, y: int | None = None) -> torch.Tensor:
    """Equal training mass per step inside the window: λ_i = λ(t_lo + (i/N)(t_hi − t_lo)), t_x = schedule.t_of(x).

    This is λ_i = schedule.logsnr(1 − i/N) for the training density conditioned on [lo, hi]: when the
    training window is wider, the mass outside the sampling window is dropped (clipping instead would stack
    points on the ends); when it is narrower, the interior points stay where training put mass and the ends
    are pinned to lo and hi, because the sampler must start at λ_0 = lo (pure noise) and finish at hi.
    With a class label y (a conditional schedule), the same for class y's own schedule λ(t | y).
    """
    _check(steps, lo, hi)
    args = () if y is None else (y,)
    with torch.no_grad():
        t_lo, t_hi = schedule.t_of(torch.tensor([lo, hi], dtype=F64), *args).to(F64).tolist()
        if not t_lo > t_hi:
            which = "training schedule" if y is None else f"training schedule of class {y}"
            raise UsageError(f"the {which} puts no mass in the sampling window [{lo}, {hi}]")
        t = t_lo + torch.arange(steps + 1, dtype=F64) / steps * (t_hi - t_lo)
        return _pin(schedule.logsnr(t, *args).to(F64), lo, hi, "quantile" if y is None else f"class {y}")


def class_grid(schedule, k: int, steps: int, logsnr_min: float, logsnr_max: float) -> torch.Tensor:
    """(steps + 1,) float64 increasing λ grid for class k of a conditional schedule: uniform in class k's own t
    between t(logsnr_max | k) and t(logsnr_min | k), ends pinned to the window (`quantile_grid` of p(λ | k))."""
    k = check_label(k, int(getattr(schedule, "num_classes", 0)))
    if k is None:
        raise UsageError("class_grid needs a class label k, got None")
    return quantile_grid(schedule, steps, float(logsnr_min), float(logsnr_max), y=k)


def loglinear_interp(grid: torch.Tensor, steps: int) -> torch.Tensor:
    """Resample a grid to steps + 1 points, linear in λ (= log-linear in σ) against the normalised index (AYS)."""
    from adaptive_sched.schedules.table import interp
    xs = torch.linspace(0, 1, len(grid), dtype=F64)
    return interp(torch.linspace(0, 1, steps + 1, dtype=F64), xs, grid.to(F64))


def klub(denoise: Denoiser, x0: torch.Tensor, lam_a: torch.Tensor, lam_b: torch.Tensor,
         generator: torch.Generator) -> torch.Tensor:
    """Monte Carlo KLUB of first-order steps λ_a → λ_b (elementwise over M intervals), common random numbers:

        KLUB(λ_a, λ_b) = ½ ∫_{λ_a}^{λ_b} e^{λ} E‖D(x_λ, λ) − D(x_{λ_a}, λ_a)‖² dλ
                       = ½ e^{λ_a}(e^{h} − 1) · E_{λ ∝ e^{λ} on [λ_a, λ_b]} ‖D(x_λ, λ) − D(x_{λ_a}, λ_a)‖²

    with h = λ_b − λ_a and D the x̂0 denoiser. This is Girsanov's KL between the reverse VE SDE dy = −2s∇log p ds + √(2s) dw̄ (y = x/α, s = e^{−λ/2}) and its
    linearisation with the denoiser frozen at the interval's start, ∫ ‖ΔD‖²/s³ ds, written in λ. The pair
    (x_{λ_a}, x_λ) is drawn from the true path law, i.e. the forward process: y_a = x0 + s_a ε and the
    Brownian bridge y_λ = x0 + s(r ε + √(1 − r²) z), r = s/s_a; x = α·y. Returns (M,) float64, summed over
    features and averaged over the n rows of x0 (the same x0, ε, z and quantile v for every interval).
    """
    n, m = x0.shape[0], lam_a.shape[0]
    lam_a, lam_b = lam_a.to(F64).cpu(), lam_b.to(F64).cpu()
    eps = torch.randn(x0.shape, generator=generator, dtype=F64).to(x0.device)           # (n, ...)
    z = torch.randn(x0.shape, generator=generator, dtype=F64).to(x0.device)
    v = (torch.arange(n, dtype=F64) + torch.rand(n, generator=generator, dtype=F64)) / n  # stratified (n,)
    h = lam_b - lam_a                                                                    # (M,)
    lam = lam_a[:, None] + torch.log1p(v[None, :] * torch.expm1(h[:, None]))             # (M, n), ∝ e^λ
    r = torch.exp((lam_a[:, None] - lam) / 2)                                            # s/s_a, (M, n)
    shape = (m, n) + (1,) * (x0.ndim - 1)
    x0_64 = x0.to(F64)[None]
    s_a = torch.exp(-lam_a / 2).reshape((m,) + (1,) * x0.ndim).to(x0.device)
    s = torch.exp(-lam / 2).reshape(shape).to(x0.device)
    rr = r.reshape(shape).to(x0.device)
    y_a = x0_64 + s_a * eps[None]                                                        # (M, n, ...)
    y = x0_64 + s * (rr * eps[None] + torch.sqrt(1 - rr * rr) * z[None])
    alpha_a = alpha_sigma(lam_a)[0].reshape(s_a.shape).to(x0.device)
    alpha = alpha_sigma(lam)[0].reshape(shape).to(x0.device)
    flat = lambda t: t.reshape((m * n,) + tuple(x0.shape[1:])).to(x0.dtype)               # noqa: E731
    lam_rows = lam_a[:, None].expand(m, n).reshape(-1)
    same_start = bool((lam_a == lam_a[0]).all())
    if same_start:            # one start for all intervals: evaluate D(x_{λ_a}) once
        d_a = denoise((alpha_a[:1] * y_a[:1])[0].to(x0.dtype), lam_rows[:n].to(x0.device, x0.dtype))
        d_a = d_a.to(F64)[None].expand((m,) + tuple(x0.shape))
    else:
        d_a = denoise(flat(alpha_a * y_a), lam_rows.to(x0.device, x0.dtype)).to(F64).reshape((m,) + tuple(x0.shape))
    d = denoise(flat(alpha * y), lam.reshape(-1).to(x0.device, x0.dtype)).to(F64).reshape((m,) + tuple(x0.shape))
    sq = (d - d_a).pow(2).reshape(m, n, -1).sum(-1).mean(1).cpu()                       # (M,)
    return 0.5 * torch.exp(lam_a) * torch.expm1(h) * sq


def klub_total(denoise: Denoiser, x0: torch.Tensor, grid: torch.Tensor, generator: torch.Generator) -> float:
    """Σ_i KLUB(λ_i, λ_{i+1}) over a grid (fresh draws): the AYS objective."""
    grid = grid.to(F64)
    return float(klub(denoise, x0, grid[:-1], grid[1:], generator).sum())


def _refine(denoise: Denoiser, x0: torch.Tensor, grid: torch.Tensor, sweeps: int, candidates: int,
            generator: torch.Generator) -> torch.Tensor:
    """Coordinate descent: each interior λ_i moves to the best of `candidates` points (and itself) in a bracket
    inside (λ_{i−1}, λ_{i+1}) by KLUB(λ_{i−1}, λ) + KLUB(λ, λ_{i+1}); the bracket halves every sweep."""
    grid = grid.clone()
    for sweep in range(sweeps):
        for i in range(1, len(grid) - 1):
            left, right, here = grid[i - 1].item(), grid[i + 1].item(), grid[i].item()
            half = 0.5 * (right - left) * 0.5 ** sweep
            a, b = max(left, here - half), min(right, here + half)
            frac = torch.arange(1, candidates + 1, dtype=F64) / (candidates + 1)
            cand = torch.cat([torch.tensor([here], dtype=F64), a + frac * (b - a)])
            cand = cand[(cand > left) & (cand < right)]
            ones = torch.ones_like(cand)
            cost = (klub(denoise, x0, left * ones, cand, generator)
                    + klub(denoise, x0, cand, right * ones, generator))
            grid[i] = cand[int(torch.argmin(cost))]
    return grid


def ays_stages(steps: int, coarse_steps: int) -> list[int]:
    """AYS's step counts stage by stage: min(steps, coarse_steps), doubled until `steps` (the last one capped)."""
    stages = [min(steps, coarse_steps)]
    while stages[-1] < steps:
        stages.append(min(2 * stages[-1], steps))
    return stages


@torch.no_grad()
def ays_grid(denoise: Denoiser | LabelledDenoiser, x0: torch.Tensor, steps: int, lo: float, hi: float, *,
             coarse_steps: int = 10, sweeps: int = 3, candidates: int = 12, samples: int = 64, seed: int = 0,
             init: torch.Tensor | None = None, memo: dict | None = None,
             labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Align Your Steps: minimise Σ_i KLUB(λ_i, λ_{i+1}) (see `klub`) by coarse-to-fine coordinate descent.

    Start from `init` or the cosine grid at min(steps, coarse_steps) steps; refine (`sweeps` sweeps of
    `_refine`); while fewer than `steps`, double the step count by log-linear interpolation and refine again.
    Each interior point of a sweep costs (3·candidates + 4)·samples denoiser rows in 3 batched calls, on
    `samples` rows of x0 drawn afresh (seeded). Returns (grid, info) with the settings and KLUB estimates.

    `memo` (a dict the caller keeps for one denoiser and one x0): the state after every stage is stored, and a
    later call whose stages begin with stored ones (10 → 20 after 10, with the default coarse_steps) resumes
    from there; the grid and info are bit for bit those of a call without it.

    `labels` (len(x0),): the class of each row of x0, for a class-conditional `denoise(x, λ, y)`: every denoiser
    row is given the label of the x0 row it was noised from (the KLUB's expectation over the data's (x0, y)).
    """
    _check(steps, lo, hi)
    for name, value in (("coarse_steps", coarse_steps), ("candidates", candidates), ("samples", samples)):
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"ays {name} must be an integer >= 1, got {value!r}")
    if not isinstance(sweeps, int) or sweeps < 0:
        raise UsageError(f"ays sweeps must be an integer >= 0, got {sweeps!r}")
    if labels is not None and len(labels) != len(x0):
        raise UsageError(f"ays labels: {len(labels)} labels for {len(x0)} rows")
    gen = torch.Generator().manual_seed(seed)

    def rows() -> tuple[torch.Tensor, Denoiser]:
        """`samples` rows of x0, without replacement when there are enough, and the denoiser for them."""
        idx = torch.randperm(len(x0), generator=gen)[:samples] if len(x0) >= samples else \
            torch.randint(len(x0), (samples,), generator=gen)
        idx = idx.to(x0.device)
        if labels is None:
            return x0[idx], denoise
        y = labels.to(x0.device)[idx]                                                     # (samples,)

        def labelled(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
            if len(x) % len(y):
                raise UsageError(f"ays labels: {len(x)} denoiser rows are no whole number of tiles of {len(y)} rows")
            return denoise(x, lam, y.repeat(len(x) // len(y)))          # klub's rows: tiles of the x0 rows, in order
        return x0[idx], labelled

    plan = ays_stages(steps, coarse_steps)
    key = (lo, hi, coarse_steps, sweeps, candidates, samples, seed)
    if memo is None or init is not None:
        memo = {}
    done = max((k for k in range(1, len(plan) + 1) if (key, tuple(plan[:k])) in memo), default=0)
    if done:
        grid, state, held, start = memo[(key, tuple(plan[:done]))]
        gen.set_state(state)
    else:
        n = plan[0]
        grid = cosine_grid(n, lo, hi) if init is None else loglinear_interp(torch.as_tensor(init, dtype=F64), n)
        grid = _pin(grid, lo, hi, "initial")
        held = rows()                               # the KLUB reports use the same rows and draws (seed + 1)
        start = klub_total(held[1], held[0], grid, torch.Generator().manual_seed(seed + 1))
    for k in range(done, len(plan)):
        if k:
            grid = loglinear_interp(grid, plan[k])
        x, denoise_rows = rows()
        grid = _pin(_refine(denoise_rows, x, grid, sweeps, candidates, gen), lo, hi, "ays")
        memo[(key, tuple(plan[:k + 1]))] = (grid, gen.get_state(), held, start)
    final = klub_total(held[1], held[0], grid, torch.Generator().manual_seed(seed + 1))
    cosine = klub_total(held[1], held[0], cosine_grid(steps, lo, hi), torch.Generator().manual_seed(seed + 1))
    info = {"coarse_steps": coarse_steps, "stages": plan, "sweeps": sweeps, "candidates": candidates,
            "samples": samples, "seed": seed, "sampler_step": "first order (DDIM), denoiser frozen per interval",
            "klub_initial_coarse": start, "klub_final": final, "klub_cosine": cosine}
    return grid, info


def write_grid(path: str | Path, grid: torch.Tensor, meta: dict) -> Path:
    """Write step, logsnr, alpha, sigma, edm_sigma as CSV (exact float reprs) and meta as PATH.json, each atomically:
    the JSON first, with the CSV's sha256, so a write interrupted between the two leaves a pair read_grid refuses."""
    path, grid = Path(path), grid.to(F64)
    if path.suffix.lower() != ".csv":
        raise UsageError(f"--out must end in .csv, got {path.name}")
    output_file(path)
    alpha, sigma = alpha_sigma(grid)
    text = io.StringIO(newline="")
    out = csv.writer(text)
    out.writerow(["step", "logsnr", "alpha", "sigma", "edm_sigma"])
    for i, (lam, a, s) in enumerate(zip(grid.tolist(), alpha.tolist(), sigma.tolist())):
        out.writerow([i, repr(lam), repr(a), repr(s), repr(math.exp(-lam / 2))])
    data = text.getvalue().encode("utf-8")
    atomic_write_json(sidecar_path(path), {**meta, "points": len(grid), "csv_sha256": hashlib.sha256(data).hexdigest()})
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return path


def is_grid_file(path: Path) -> bool:
    """Whether `path` is a grid written by write_grid: its sidecar PATH.json names the method and the run."""
    meta = read_json_dict(sidecar_path(path)) or {}
    return "method" in meta and "run_dir" in meta


def check_sidecar(path: Path) -> None:
    """UsageError when PATH.json records a sha256 of the grid CSV (write_grid) that the CSV does not have: the
    provenance describes another grid (a write interrupted between the two files, or an edited CSV)."""
    recorded = (read_json_dict(sidecar_path(path)) or {}).get("csv_sha256")
    if recorded is not None and recorded != hashlib.sha256(path.read_bytes()).hexdigest():
        raise UsageError(f"grid file {path} does not match its sidecar {sidecar_path(path).name} (an interrupted "
                         f"write or an edited file): write the grid again, or delete the sidecar to use it as is")


def read_grid(path: str | Path, steps: int | None, lo: float, hi: float) -> torch.Tensor:
    """λ grid from a CSV's `logsnr` column: finite, strictly increasing, inside [lo, hi], and steps + 1 points
    (steps=None takes the file's own count; a different explicit count is an error, never a silent resample)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"grid file not found: {path} (write one with `adaptive-sched sampling-grid RUN_DIR`)")
    try:
        fields, rows = read_csv_rows(path)
        if "logsnr" not in fields:
            raise UsageError(f"grid file {path} lacks a logsnr column")
        values = [float(row["logsnr"]) for row in rows]
    except UsageError:
        raise
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        raise UsageError(f"grid file {path}: logsnr is not numeric ({err})".replace("\n", " ")) from None
    check_sidecar(path)
    grid = torch.tensor(values, dtype=F64)
    if len(grid) < 2:
        raise UsageError(f"grid file {path} needs at least 2 points, has {len(grid)}")
    if not torch.isfinite(grid).all():
        raise UsageError(f"grid file {path} holds NaN or infinite logsnr values")
    if not (grid[1:] > grid[:-1]).all():
        raise UsageError(f"grid file {path}: logsnr must be strictly increasing (noisiest first)")
    if grid[0] < lo or grid[-1] > hi:
        raise UsageError(f"grid file {path} spans [{grid[0].item():.6g}, {grid[-1].item():.6g}], outside the "
                         f"sampling window [{lo:.6g}, {hi:.6g}]")
    if steps is not None and steps != len(grid) - 1:
        raise UsageError(f"grid file {path} has {len(grid)} points ({len(grid) - 1} steps) but {steps} steps were "
                         f"asked; leave the step count unset or set it to {len(grid) - 1}")
    return grid
