"""PNG pictures of samples (image grids, 2-D scatters); matplotlib is imported only here, when used."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from adaptive_sched.atomic import atomic_open


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """Lay out, write as PNG atomically (a reader never sees half a picture) and close the figure."""
    try:
        fig.tight_layout()
        with atomic_open(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=dpi)
    finally:
        _pyplot().close(fig)


SIGNED_METRICS = ("eval_kid",)         # estimators that can fall below 0 (unbiased MMD²): never on a log axis


def log_axis(metric: str, values) -> bool:
    """A log y-axis for `metric` when every value is > 0 and the metric cannot be ≤ 0 (KID's unbiased estimate can)."""
    return metric.split("@")[0] not in SIGNED_METRICS and len(values) > 0 and all(v > 0 for v in values)


def finish_line_plot(fig, ax, path: str | Path, xlabel: str, ylabel: str, logy: bool = False,
                     legend_size: int = 8) -> None:
    """Label, grid, legend, save as PNG and close: the ending every line plot here shares."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    save_figure(fig, path)


def image_grid(x: torch.Tensor) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] tiled into one (rows·(H+1)+1, cols·(W+1)+1, C) array in [0, 1]."""
    n, c, h, w = x.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1, c), dtype=np.float32)
    imgs = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()   # (N, H, W, C)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = imgs[i]
    return grid


def show_image(ax, grid: np.ndarray) -> None:
    """Draw an image_grid array on `ax` (grayscale for one channel), without axes."""
    gray = grid.shape[2] == 1
    ax.imshow(grid[..., 0] if gray else grid, cmap="gray" if gray else None, vmin=0, vmax=1,
              interpolation="nearest")
    ax.axis("off")


def save_samples_png(x: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Images (N, C, H, W) in [-1, 1] as a square grid; vectors (N, 2) as a scatter; other vectors as histograms."""
    plt = _pyplot()
    x = x.detach().float().cpu()
    path = Path(path)
    if x.ndim == 4:
        grid = image_grid(x)
        fig, ax = plt.subplots(figsize=(max(3, grid.shape[1] / 16), max(3, grid.shape[0] / 16)))
        show_image(ax, grid)
    elif x.ndim == 2 and x.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=2, alpha=0.5)
        ax.set_aspect("equal")
    else:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.hist(x.reshape(len(x), -1)[:, :4].numpy(), bins=60, histtype="step", label=[f"dim {i}" for i in range(
            min(4, x.reshape(len(x), -1).shape[1]))])
        ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    save_figure(fig, path)
    return path


def schedule_over_training(csv_path: str | Path, path: str | Path, schedule_config) -> Path | None:
    """p(λ) snapshots from schedule_density.csv (up to 6 evals, darker = later) against laplace, cauchy, cosine."""
    import csv
    from adaptive_sched import schedules
    rows = list(csv.reader(Path(csv_path).open()))
    if len(rows) < 2:
        return None
    lam = np.array([float(v) for v in rows[0][1:]])
    body = rows[1:]
    picks = sorted(set(np.linspace(0, len(body) - 1, min(6, len(body))).round().astype(int)))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for rank, i in enumerate(picks):
        shade = 0.25 + 0.75 * (rank + 1) / len(picks)
        ax.plot(lam, [float(v) for v in body[i][1:]], color=(0.1, 0.2, 0.6, shade), label=f"{schedule_config.name}, step {body[i][0]}")
    window = dict(logsnr_min=schedule_config.logsnr_min, logsnr_max=schedule_config.logsnr_max)
    grid = torch.tensor(lam, dtype=torch.float64)
    for name, style in (("laplace", ":"), ("cauchy", "--"), ("cosine", "-.")):
        ax.plot(lam, schedules.build(name, **window).density(grid).numpy(), "k" + style, lw=1, label=name)
    finish_line_plot(fig, ax, path, "logSNR λ", "p(λ)", legend_size=7)
    return Path(path)


def per_class_densities(csv_path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    """p(λ | k) per class at the last step of a long-format CSV (step, class, logsnr, density), the marginal
    (class "all") bold, with the spread of the class medians in the title; None if the CSV has no rows."""
    from adaptive_sched.class_schedules import median_of_density, median_spread
    from adaptive_sched.runlog import CsvLog
    rows = CsvLog(csv_path, ["step", "class", "logsnr", "density"]).rows()   # a training log: torn rows dropped
    if not rows:
        return None
    last = max(int(row["step"]) for row in rows)
    curves: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if int(row["step"]) == last:
            curves.setdefault(row["class"], []).append((float(row["logsnr"]), float(row["density"])))
    classes = sorted((k for k in curves if k != "all"), key=int)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    medians = []
    for i, k in enumerate(classes):
        lam, dens = np.array(sorted(curves[k])).T
        medians.append(median_of_density(lam, dens))
        ax.plot(lam, dens, lw=1, color=plt.cm.viridis(i / max(1, len(classes) - 1)),
                label=f"class {k}" if len(classes) <= 12 else None)
    if "all" in curves:
        lam, dens = np.array(sorted(curves["all"])).T
        ax.plot(lam, dens, "k", lw=2.5, label="marginal")
    spread = median_spread(medians) if medians else {"range": float("nan"), "std": float("nan")}
    ax.set_title(f"{title + ', ' if title else ''}step {last}: class medians of λ spread "
                 f"{spread['range']:.3g} (max − min), std {spread['std']:.3g}", fontsize=9)
    finish_line_plot(fig, ax, png_path, "logSNR λ", "p(λ | class)", legend_size=7)
    return Path(png_path)
