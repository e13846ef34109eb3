"""How large cvdm's smoothness penalty is against its data term, and whether its learned schedule depends on the seed.

For a compare config's cvdm row, at the schedule's initialisation and a fresh denoiser, over BATCHES batches:
  ‖∇φ data‖  = ‖∇φ mean_i c(λ_φ(t_i))·ℓ_i‖         (the training loss; what cvdm learns from)
  ‖∇φ penalty‖ = ‖∇φ smoothness·mean_i (d²λ/dt²(t_i))²/(λ_max − λ_min)²‖   (at the batch's own t_i)
and, with --runs, the largest |λ_seed(t) − λ_seed0(t)| between the seeds' exported schedules (schedule_final.csv).

Usage: python experiments/cvdm_penalty.py experiments/fashion_mnist_cpu.toml --label learned-cvdm
                                          [--runs results/fashion-mnist-cpu/runs/learned-cvdm] [--batches 50]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from adaptive_sched import compare, config as cfg
from adaptive_sched.losses import DiffusionLoss
from adaptive_sched.models import build_model
from adaptive_sched.train import build_schedule, build_weighting, load_data, step_generator


def row_config(path: str, label: str) -> cfg.RunConfig:
    """The run config (seed 0's) of the compare row called `label`."""
    plan = compare.parse(path)
    rows = [e for e in plan.entries if compare.run_label(e) == label]
    if not rows:
        sys.exit(f"error: no compare row labelled {label!r} in {path}")
    return compare.run_config(plan.base, rows[0], plan.seeds[0])


def gradient_norms(config: cfg.RunConfig, batches: int) -> tuple[np.ndarray, np.ndarray]:
    """(‖∇φ data‖, ‖∇φ penalty‖) per batch at initialisation."""
    data = load_data(config.data, "train")
    schedule = build_schedule(config.schedule, 0, config.train.steps)
    loss = DiffusionLoss(schedule, config.train.target, build_weighting(config, True), config.learned.objective,
                         config.learned.smoothness)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model.name, data.shape, 0, **config.model.params)
    params = list(schedule.parameters())
    norms = []
    for step in range(batches):
        gen = step_generator(config.train.seed, step, torch.device("cpu"))
        x0 = data.x[torch.randint(len(data), (config.train.batch_size,), generator=gen)]
        terms = loss.terms(model, x0, None, gen)
        pair = []
        for part in (terms.loss.mean(), terms.extra):
            if not isinstance(part, torch.Tensor):     # no penalty (smoothness 0, or not cvdm)
                pair.append(0.0)
                continue
            grads = torch.autograd.grad(part, params, retain_graph=True, allow_unused=True)
            pair.append(float(torch.sqrt(sum((g.square().sum() for g in grads if g is not None), torch.zeros(())))))
        norms.append(pair)
    return np.array(norms)[:, 0], np.array(norms)[:, 1]


def seed_spread(runs: Path) -> str:
    """max over t of |λ_seed(t) − λ_first(t)| for each seed's schedule_final.csv under `runs`."""
    tables = {d.name: pd.read_csv(d / "schedule_final.csv") for d in sorted(runs.iterdir())
              if (d / "schedule_final.csv").is_file()}
    if len(tables) < 2:
        return f"{runs}: fewer than two finished seeds"
    first, *rest = tables
    inner = slice(1, -1)                           # the pinned endpoints agree by construction
    return ", ".join(f"{name} vs {first}: {np.abs(tables[name].logsnr.values[inner] - tables[first].logsnr.values[inner]).max():.2e}"
                     for name in rest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--label", default="learned-cvdm")
    parser.add_argument("--runs", type=Path)
    parser.add_argument("--batches", type=int, default=50)
    args = parser.parse_args()
    config = row_config(args.config, args.label)
    data, penalty = gradient_norms(config, args.batches)
    ratio = penalty / data
    print(f"{args.label}: smoothness {config.learned.smoothness}, {args.batches} batches of {config.train.batch_size}")
    print(f"  |grad data|    median {np.median(data):.3g}  max {data.max():.3g}")
    print(f"  |grad penalty| median {np.median(penalty):.3g}  max {penalty.max():.3g}")
    print(f"  penalty/data   min {ratio.min():.3g}  median {np.median(ratio):.3g}  max {ratio.max():.3g}")
    if args.runs:
        print(f"  max |λ(t) difference| between seeds: {seed_spread(args.runs)}")


if __name__ == "__main__":
    main()
