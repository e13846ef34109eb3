"""Periodic evaluation inside a training run (EMA weights): the fixed-λ-grid loss profile, samples and their
distances to held-out data (sliced Wasserstein, FID/KID), the VLB in bits/dim, and p(λ) of the schedule."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from adaptive_sched.class_schedules import marginal_density, num_classes, per_class_density_rows
from adaptive_sched.conditioning import eval_labels, guidance_suffix
from adaptive_sched.evaluate import eval_grid, loss_profile, sliced_wasserstein, summarize
from adaptive_sched.generate import generate, sampling_grid
from adaptive_sched.runlog import PROFILE_COLUMNS, CsvLog


CLASS_DENSITY_CSV = "schedule_density_by_class.csv"   # conditional schedules: step, class, logsnr, density


def ema_model(run) -> torch.nn.Module:
    """A copy of the model holding the EMA weights (for eval, sampling and the snapshot)."""
    model = copy.deepcopy(run.model)
    run.ema.copy_to(model)
    return model.eval()


def evaluate(run, out_dir: Path, step: int) -> dict[str, float]:
    """Held-out ε-MSE on the fixed λ grid, and sliced Wasserstein distance of samples to held-out data (EMA)."""
    e = run.config.eval
    model = ema_model(run)
    labels = run.eval_data.y if run.num_classes else None          # a conditional model: its conditional loss
    profile = loss_profile(model, run.config.train.target, run.eval_data.x, labels,
                           eval_grid(e.logsnr_lo, e.logsnr_hi, e.logsnr_points), oracle=run.eval_data.oracle)
    log = CsvLog(out_dir / "eval_profile.csv", PROFILE_COLUMNS)
    for k, lam in enumerate(profile["logsnr"].tolist()):
        log.append({"step": step, "logsnr": lam, "eps_mse": float(profile["eps_mse"][k]),
                    "oracle_eps_mse": float(profile["oracle_eps_mse"][k]) if "oracle_eps_mse" in profile else None})
    metrics = summarize(profile)
    log_schedule_density(run, out_dir, step)
    if e.sample_n > 0:
        metrics.update(sample_metrics(run, model))
    if e.bpd_n > 0:
        from adaptive_sched.likelihood import vlb
        bound = vlb(model, run.config.train.target, run.eval_data.x[:e.bpd_n].float(),
                    None if labels is None else labels[:e.bpd_n], n_lambda=e.bpd_points,
                    discrete_bins=e.bpd_bins or None)                  # a conditional model: −log p(x | y)
        metrics["eval_bpd"] = bound["bpd"]
    return metrics


def sample_metrics(run, model) -> dict[str, float]:
    """Sliced Wasserstein (and FID/KID for images) of EMA samples against held-out data, at every guidance scale
    of a conditional run (labels per [eval] sample_labels, same noise); the first scale also gives the unsuffixed
    names."""
    e = run.config.eval
    grid = sampling_grid(e.grid, e.sample_steps, e.sample_logsnr_min, e.sample_logsnr_max)
    n = min(e.sample_n, len(run.eval_data))
    labels = eval_labels(e.sample_labels, run.eval_data.y, n, run.num_classes) if run.num_classes else None
    metrics = {}
    for i, w in enumerate(e.guidance):
        x = generate(model, run.config.train.target, run.train_data.shape, n, grid, e.sampler, seed=777,
                     device=run.device, labels=labels, guidance=w, clip_x0=e.clip_x0)
        scores = {"eval_swd": sliced_wasserstein(x, run.eval_data.x[:n])}
        if run.fid is not None:
            scores.update(run.fid(x.clamp(-1, 1)))      # scored as images: clipped to the pixel range
        if i == 0:
            metrics.update(scores)
        if run.num_classes:
            metrics.update({name + guidance_suffix(w): value for name, value in scores.items()})
    return metrics


def density_grid(lo: float, hi: float, points: int) -> torch.Tensor:
    """points λ values evenly spaced over [lo, hi], the two ends nudged inside by 1e-6·(hi − lo): exactly at an end,
    a learned schedule's density is its floor's 1/(ε·(hi − lo)) (t within sigmoid(−15) ≈ 3e-7 of 0 or 1, where its
    logit window is clamped; a sliver of about 1e-7 in both t and λ), which would plot as a spike."""
    grid = torch.linspace(lo, hi, points, dtype=torch.float64)
    nudge = 1e-6 * (hi - lo)
    grid[0], grid[-1] = lo + nudge, hi - nudge
    return grid


def log_schedule_density(run, out_dir: Path, step: int, points: int = 81) -> None:
    """Append p(λ) of the training schedule on a fixed λ grid to schedule_density.csv (one row per eval)."""
    s = run.config.schedule
    grid = density_grid(s.logsnr_min, s.logsnr_max, points)
    schedule = run.loss.schedule
    conditional = num_classes(schedule) > 0
    weights = run.condition_weights.numpy() if conditional else None
    with torch.no_grad():
        if conditional:                             # the marginal Σ_k w_k p(λ | k), then each class on its own
            density = marginal_density(schedule, grid.to(run.device), weights).cpu()
            by_class = CsvLog(out_dir / CLASS_DENSITY_CSV, ["step", "class", "logsnr", "density"])
            for row in per_class_density_rows(schedule, grid.to(run.device), step, weights):
                by_class.append(row)
        else:
            density = schedule.density(grid.to(run.device)).cpu()
    path = out_dir / "schedule_density.csv"
    columns = ["step"] + [f"{v:.4g}" for v in grid.tolist()]
    log = CsvLog(path, columns)
    log.append({"step": step, **{c: float(d) for c, d in zip(columns[1:], density.tolist())}})
    edges = run.loss_bins.edges.cpu()
    centres = [f"{v:.4g}" for v in (0.5 * (edges[1:] + edges[:-1])).tolist()]
    seen = run.loss_bins.seen.cpu() > 0
    bins_log = CsvLog(out_dir / "loss_bins.csv", ["step"] + centres)
    bins_log.append({"step": step, **{c: (float(v) if ok else None) for c, v, ok in
                                      zip(centres, run.loss_bins.value.cpu().tolist(), seen.tolist())}})
