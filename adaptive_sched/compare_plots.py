"""Plots of a comparison: metric against step with 95% CI bands, schedule densities p(λ), per-λ loss."""
from __future__ import annotations

from pathlib import Path

import torch

from adaptive_sched.plots import _pyplot, finish_line_plot, log_axis, save_figure


def metric_curves(aggregates, metric: str, path: Path) -> None:
    """Mean metric against step per schedule, shaded ± the 95% CI over seeds; a log y-axis only where log_axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, group in aggregates.groupby("label", sort=False):
        group = group.sort_values("step")
        ax.plot(group["step"], group["mean"], label=label, marker="o", ms=3)
        ax.fill_between(group["step"], group["mean"] - group["ci95"], group["mean"] + group["ci95"], alpha=0.2)
    finish_line_plot(fig, ax, path, "training step", metric, logy=log_axis(metric, list(aggregates["mean"])))


def densities(entries: list[dict], base, path: Path, out: Path | None = None, seed: int = 0) -> None:
    """p(λ) of every compared schedule on the run's window; a learned one as trained (seed `seed`'s run)."""
    from adaptive_sched.class_schedules import marginal_density, num_classes
    from adaptive_sched.compare_config import run_config, run_dir_of, run_label
    from adaptive_sched.run_artifacts import final_schedule
    from adaptive_sched.run_eval import density_grid
    from adaptive_sched.schedules import SCHEDULES, is_learned
    from adaptive_sched.run_build import build_schedule
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    lo, hi = base.schedule.logsnr_min, base.schedule.logsnr_max
    lam = density_grid(lo, hi, 801)
    for entry in entries:
        label = run_label(entry)
        run_dir = None if out is None else run_dir_of(out, entry, seed)
        weights, trained = None, None
        if run_dir is not None and is_learned(SCHEDULES.get(entry["name"])):   # a class: is it trained?
            trained = final_schedule(run_dir)        # from ema.pt, or the table the run exported at its end
        if trained is not None:
            sched, weights, _ = trained
            label += f" (trained, seed {seed})"
            if num_classes(sched):                   # a conditional schedule: its marginal Σ_c w_c p(λ | c)
                label += ", marginal"
        else:
            sched = build_schedule(run_config(base, entry, seed).schedule)
        with torch.no_grad():
            density = sched.density(lam) if weights is None else marginal_density(sched, lam, weights)
            ax.plot(lam.numpy(), density.numpy(), label=label,   # trained ones dashed: a fixed one can lie beneath
                    linestyle="--" if trained is not None else "-")
    finish_line_plot(fig, ax, path, "logSNR λ", "p(λ)")


def class_densities(panels: list[tuple[str, tuple]], path: Path) -> None:
    """One panel per conditional schedule, given as (title, run_artifacts.final_schedule of seed 0's run): p(λ | c)
    of every condition as trained, and the marginal Σ_c w_c p(λ | c) in black."""
    from adaptive_sched.class_schedules import marginal_density, num_classes
    from adaptive_sched.run_eval import density_grid
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, (schedule, weights, step)) in zip(axes.flat, panels):
        lam = density_grid(schedule.logsnr_min, schedule.logsnr_max, 801)
        with torch.no_grad():
            for c in range(num_classes(schedule)):
                ax.plot(lam.numpy(), schedule.density(lam, c).numpy(), lw=1, alpha=0.8, label=f"c = {c}")
            ax.plot(lam.numpy(), marginal_density(schedule, lam, weights).numpy(), color="black",
                    lw=2.2, label="marginal")
        ax.set_title(f"{title} (step {step})", fontsize=9)
        ax.set_xlabel("logSNR λ")
        ax.set_ylabel("p(λ | c)")
        ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)


def loss_profiles(profiles, path: Path) -> None:
    """Held-out ε-MSE against λ at the final eval, mean over seeds (and the exact denoiser's, when known)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    last = profiles[profiles["step"] == profiles.groupby("label")["step"].transform("max")]
    oracle_drawn = False
    for label, group in last.groupby("label", sort=False):
        mean = group.groupby("logsnr")["eps_mse"].mean()
        ax.plot(mean.index, mean.values, label=label, marker=".")
        if not oracle_drawn and group["oracle_eps_mse"].notna().any():
            exact = group.groupby("logsnr")["oracle_eps_mse"].mean()
            ax.plot(exact.index, exact.values, "k--", label="exact denoiser")
            oracle_drawn = True
    finish_line_plot(fig, ax, path, "logSNR λ", "held-out ε-MSE", logy=True)


def sample_grids(entries: list[dict], out: Path, seed: int, n: int, path: Path) -> None:
    """One panel of n samples per schedule (seed `seed`'s EMA weights, the runs' own sampler and grid)."""
    from adaptive_sched.compare_config import run_dir_of, run_label
    from adaptive_sched.conditioning import balanced_labels
    from adaptive_sched.generate import generate, sampling_grid
    from adaptive_sched.plots import image_grid, show_image
    from adaptive_sched.run_artifacts import cached_panel
    from adaptive_sched.sample_run import load_snapshot
    from adaptive_sched.run_build import resolve_device
    device = resolve_device("auto")                  # the GPU when there is one: a U-Net samples slowly on CPU

    def draw(run_dir: Path, label: str):
        config, model, snap = load_snapshot(run_dir, device)
        e = config.eval
        grid = sampling_grid(e.grid, e.sample_steps, e.sample_logsnr_min, e.sample_logsnr_max)
        classes = snap.get("num_classes", 0)          # conditional: balanced classes at the first guidance scale
        labels = balanced_labels(n, classes) if classes else None
        x = generate(model, config.train.target, tuple(snap["data_shape"]), n, grid, e.sampler, seed=0,
                     device=device, labels=labels, guidance=e.guidance[0], clip_x0=e.clip_x0)
        guided = f", w = {e.guidance[0]:g}" if classes else ""
        return image_grid(x), f"{label}\n(step {snap['step']}{guided})"

    panels = []
    for entry in entries:                            # a run without ema.pt shows the panel it cached when drawn
        run_dir = run_dir_of(out, entry, seed)
        panel = cached_panel(run_dir, n, lambda: draw(run_dir, run_label(entry)))
        if panel is not None:
            panels.append(panel[::-1])
    if not panels:
        return
    plt = _pyplot()
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, grid) in zip(axes.flat, panels):
        show_image(ax, grid)
        ax.set_title(title, fontsize=8)
    save_figure(fig, path)
