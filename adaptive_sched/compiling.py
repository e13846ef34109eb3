"""torch.compile for a training run: the denoiser's forward and, for a learned schedule, λ_φ(t) with its slope.

Compiling only the denoiser left a learned schedule's ~270 small eager ops per step (forward and backward of
the monotone network) outside the graph: on an H200 at batch 512 the compiled step went from 21.8 ms (cosine)
to 27.6 ms (learned), +26%, against +1.7% in eager (results/bench/2026-11-26-NVIDIA-H200.jsonl); those ops are
the likely cause (the profiled bench checks). Compiling `logsnr_and_slope` fuses them; the hooks of the
variance objective stay on its eager outputs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adaptive_sched.train import Run


def compile_run(run: Run, mode: str = "default") -> None:
    """Make train_step call torch.compile'd functions: the model's forward (as `run.train_model`) and the
    learned schedule's `logsnr_and_slope` (as `run.loss.schedule_fn`). Compilation itself happens on first use."""
    import torch
    # a function, not the module: train_step tests `run.train_model or run.model`, which a compiled module fails
    run.train_model = torch.compile(run.model.forward, mode=mode)
    if run.loss.learned and hasattr(run.loss.schedule, "logsnr_and_slope"):
        run.loss.schedule_fn = torch.compile(run.loss.schedule.logsnr_and_slope, mode=mode)


def uncompile_run(run: Run) -> None:
    """Back to the eager functions (after a compiled step failed)."""
    run.train_model = None
    run.loss.schedule_fn = None
