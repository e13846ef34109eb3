"""How large cvdm's smoothness penalty is against its data term, and whether its learned schedule depends on the seed.

For each run folder (one seed of a cvdm run), over BATCHES training batches, with the run's final denoiser and
schedule (its checkpoint.pt; without one, the run's config at initialisation):
  ‖∇φ data‖    = ‖∇φ mean_i c(λ_φ(t_i))·ℓ_i‖                                (the training loss: what cvdm learns from)
  ‖∇φ penalty‖ = ‖∇φ smoothness·mean_i (d²λ/dt²(t_i))²/(λ_max − λ_min)²‖      (at the batch's own t_i)
then the largest |λ(t) − λ_first(t)| between the runs' exported schedules (schedule_final.csv).
At initialisation an ε-target U-Net (zero output layer) has no data gradient at all: its loss ‖ε‖² ignores λ.

Usage: python experiments/cvdm_penalty.py RUN_DIR [RUN_DIR ...] [--batches 50]
  e.g. python experiments/cvdm_penalty.py results/cvdm-smoothness-cpu/runs/cvdm-1e-3/seed*
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from adaptive_sched import config as cfg
from adaptive_sched.checkpoint import load_training_state
from adaptive_sched.errors import UsageError
from adaptive_sched.models import build_model
from adaptive_sched.seeding import step_generator
from adaptive_sched.run_build import build_loss, build_schedule, load_data


def gradient_norms(run_dir: Path, batches: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(‖∇φ data‖, ‖∇φ penalty‖) per batch, and where they were taken (the checkpoint's step, or initialisation)."""
    state = load_training_state(run_dir)
    config = cfg.from_dict(state["config"]) if state else cfg.load_toml(run_dir / "config.toml")
    if config.learned.objective != "cvdm":
        raise UsageError(f"{run_dir} is not a cvdm run (objective {config.learned.objective!r})")
    data = load_data(config.data, "train")
    schedule = build_schedule(config.schedule, 0, config.train.steps)
    loss = build_loss(config, schedule)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model.name, data.shape, 0, **config.model.params)
    if state:
        model.load_state_dict(state["model"])
        schedule.load_state_dict(state["schedule"])
    params = list(schedule.parameters())
    norms = []
    for batch in range(batches):
        gen = step_generator(config.train.seed + 1000, batch, torch.device("cpu"))
        x0 = data.x[torch.randint(len(data), (config.train.batch_size,), generator=gen)]
        terms = loss.terms(model, x0, None, gen)
        pair = []
        for part in (terms.loss.mean(), terms.extra):
            if not isinstance(part, torch.Tensor):     # smoothness 0: no penalty
                pair.append(0.0)
                continue
            grads = [g for g in torch.autograd.grad(part, params, retain_graph=True, allow_unused=True)
                     if g is not None]
            pair.append(float(torch.sqrt(sum(g.square().sum() for g in grads))) if grads else 0.0)
        norms.append(pair)
    where = f"step {state['step']}" if state else "initialisation"
    return np.array(norms)[:, 0], np.array(norms)[:, 1], f"smoothness {config.learned.smoothness}, at {where}"


def seed_spread(run_dirs: list[Path]) -> str:
    """max over the interior t of |λ_run(t) − λ_first(t)| for each run's schedule_final.csv."""
    tables = {d: pd.read_csv(d / "schedule_final.csv") for d in run_dirs if (d / "schedule_final.csv").is_file()}
    if len(tables) < 2:
        return "fewer than two finished runs"
    first, *rest = tables
    inner = slice(1, -1)                           # the pinned endpoints agree by construction
    return ", ".join(f"{d.name} vs {first.name}: "
                     f"{np.abs(tables[d].logsnr.values[inner] - tables[first].logsnr.values[inner]).max():.2e}"
                     for d in rest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--batches", type=int, default=50)
    args = parser.parse_args()
    try:
        for run_dir in args.run_dirs:
            data, penalty, where = gradient_norms(run_dir, args.batches)
            print(f"{run_dir}: {where}, {args.batches} batches")
            line = (f"  |grad data| median {np.median(data):.3g}, |grad penalty| median {np.median(penalty):.3g} "
                    f"(max {penalty.max():.3g}); ")
            if (data > 0).all():
                ratio = penalty / data
                line += (f"penalty/data median {np.median(ratio):.3g} (min {ratio.min():.3g}, "
                         f"max {ratio.max():.3g})")
            else:
                line += "no ratio: the loss has no gradient to φ in some batches (an untrained ε-target U-Net)"
            print(line)
        print(f"max |λ(t) difference| between the runs: {seed_spread(args.run_dirs)}")
    except UsageError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
