"""The training loop: any schedule, target and weighting; one step counter drives LR, EMA, seeds and data order.

Phases: build (data, schedule, loss, model, optimizer: run_build.build) → open the run directory (fresh or
resumed) → loop (no host sync except at log/eval/checkpoint steps) → final snapshot.
Resume is "the same command again with --resume": every random draw at step k comes from a generator
seeded by (seed, k), so a resumed run replays exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from adaptive_sched import checkpoint, config as cfg, distributed, run_artifacts, schedules
from adaptive_sched.atomic import atomic_write_text
from adaptive_sched.compiling import compile_run, cuda_graphs, first_compiled_step
from adaptive_sched.conditioning import drop_labels
from adaptive_sched.errors import UsageError
from adaptive_sched.generate import autocast_for
from adaptive_sched.models import constructor_params, count_parameters, resolve_name
from adaptive_sched.optim import match_state_layout, warmup_lr
from adaptive_sched.out_paths import output_dir
from adaptive_sched.run_build import Run, build, metric_columns, schedule_at
from adaptive_sched.run_eval import CLASS_DENSITY_CSV, ema_model, evaluate
from adaptive_sched.run_checks import check_resumable, metrics_gap, resumed_changes
from adaptive_sched.runlog import PROFILE_COLUMNS, CsvLog, header_of
from adaptive_sched.schedules.table import check_table_source, table_source
from adaptive_sched.seeding import step_generator
from adaptive_sched.step_guard import (all_finite, new_running, optimizer_step_unless, restored_running,
                                       update_running)


def set_learning_rates(run: Run, step: int) -> float:
    """Warmup for the denoiser's group; the schedule's group is frozen for its first freeze_steps."""
    lr = warmup_lr(run.config.train.lr, step, run.config.train.warmup)
    run.optimizer.param_groups[0]["lr"] = lr
    if len(run.optimizer.param_groups) > 1:
        learned = run.config.learned
        run.optimizer.param_groups[1]["lr"] = 0.0 if step < learned.freeze_steps else learned.lr
    return lr


def open_run_dir(run: Run, out_dir: Path, resume: bool) -> tuple[int, dict | None]:
    """Phase 2: create or reopen the run directory (checked by train's output_dir); return (start step, saved
    training state or None)."""
    if run.world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    saved = [out_dir / name for name in (checkpoint.STATE_NAME, checkpoint.PREVIOUS_NAME) if (out_dir / name).exists()]
    state = checkpoint.load_training_state(out_dir) if saved else None
    if saved and state is None:                    # never train over a run whose every checkpoint is unreadable
        held = f"{saved[0].name}, which is not readable: move it" if len(saved) == 1 else \
            f"{saved[0].name} and {saved[1].name}, neither readable: move them"
        raise UsageError(f"{out_dir} holds {held} aside to train from scratch there, or choose another --out")
    if state is not None and not resume:
        raise UsageError(f"{out_dir} already holds a run (checkpoint at step {state['step']}); "
                         f"pass --resume to continue it, or choose another --out")
    if state is None:
        refuse_run_without_checkpoint(out_dir, resume)
    elif int(state["step"]) > run.config.train.steps:
        raise UsageError(f"cannot resume {out_dir}: its checkpoint is at step {state['step']}, beyond [train] steps "
                         f"{run.config.train.steps}; keep steps >= {state['step']}, or choose another --out")
    current = run.config.to_dict()
    if state is not None:
        check_resumable(state["config"], current)
        changes = resumed_changes(state["config"], current)
        if changes and run.world.is_main:
            print(f"note: resuming {out_dir} with {', '.join(changes)}", file=sys.stderr)
        check_table_source(state.get("table_source"), run.loss.schedule, f"cannot resume {out_dir}",
                           "restore the file it trained on, or train into another --out")
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        match_state_layout(run.optimizer)
        run.ema.load_state_dict(state["ema"])
        if "schedule" in state:
            run.loss.schedule.load_state_dict(state["schedule"])
        if "loss_bins" in state:
            run.loss_bins.load_state_dict(state["loss_bins"])
        if "histogram" in state and run.loss.histogram is not None:
            run.loss.histogram.load_state_dict(state["histogram"])
        torch.set_rng_state(state["rng_cpu"])
        if run.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        if state.get("world_size", 1) != run.world.size:
            warnings.warn(f"resuming a run saved with {state.get('world_size', 1)} ranks on {run.world.size}: "
                          f"the per-rank noise differs from an uninterrupted run from here on")
    start = 0 if state is None else int(state["step"])
    if state is not None:
        run.logged_step = int(state.get("logged_step", 0))        # 0: a checkpoint from before the field
        gap = metrics_gap(out_dir, run.logged_step, start) if run.world.is_main else None
        if distributed.rank0_says(gap is not None, run.world):      # rank 0 decides: every rank stops together
            raise UsageError(gap or f"cannot resume {out_dir}: rank 0 found metrics.csv behind the checkpoint")
        latest = out_dir / checkpoint.STATE_NAME
        if run.world.is_main and state["loaded_from"] != checkpoint.STATE_NAME and latest.exists():
            # the damaged latest would become the fallback at the next save, over the readable one resumed from
            os.replace(latest, out_dir / checkpoint.DAMAGED_NAME)
    if not run.world.is_main:
        return start, state
    (out_dir / run_artifacts.DIVERGED).unlink(missing_ok=True)     # this attempt is a retry: it decides anew
    if start == 0:                                 # what a killed earlier attempt left describes no run of this one
        for name in (run_artifacts.FINAL_TABLE, run_artifacts.FINAL_TABLE + ".json", run_artifacts.SAMPLE_PANEL):
            (out_dir / name).unlink(missing_ok=True)
    atomic_write_text(out_dir / "config.toml", cfg.dumps_toml(current))
    from adaptive_sched.eval_features import write_info
    write_info(out_dir, run.fid_info or {})
    for name, columns in (("metrics.csv", metric_columns(run.config)), ("eval_profile.csv", PROFILE_COLUMNS)):
        CsvLog(out_dir / name, columns).truncate_after(start)
    for name in ("schedule_density.csv", "loss_bins.csv", CLASS_DENSITY_CSV):
        if (out_dir / name).exists():
            CsvLog(out_dir / name, header_of(out_dir / name, [])).truncate_after(start)
    return start, state


def refuse_run_without_checkpoint(out_dir: Path, resume: bool) -> None:
    """UsageError when a folder with no checkpoint holds a run that training from step 0 would overwrite: a
    finished one (finished.json: brought back without its checkpoints, it can be neither continued nor retrained
    over), or, without --resume, the metrics of one killed before its first checkpoint; also a metrics.csv that is
    not a run's (a file of the user's)."""
    marker = out_dir / run_artifacts.FINISHED
    if marker.exists():
        raise UsageError(f"{out_dir} holds a finished run ({marker.name}) without its checkpoint: it cannot be "
                         f"continued, and training there would overwrite it; choose another --out")
    metrics = out_dir / "metrics.csv"
    header = header_of(metrics, [])
    if header and header[0] != "step":
        raise UsageError(f"{metrics} is not a run's metrics file (its first line: {','.join(header)[:40]!r}), and "
                         f"training there would overwrite it; choose another --out")
    if not resume and metrics.exists() and CsvLog(metrics, ["step"]).rows():
        raise UsageError(f"{out_dir} holds a run's metrics.csv but no checkpoint (stopped before its first one): "
                         f"pass --resume to train it again from step 0, or choose another --out")


def save(run: Run, out_dir: Path, step: int, running: torch.Tensor) -> None:
    """Write the training state (atomically, keeping the previous one) and the EMA snapshot (rank 0).

    Under DDP every rank first checks that the ranks' weights, schedule parameters and loss histograms are
    identical.
    """
    distributed.assert_identical(list(run.model.parameters()), run.world, "denoiser weights")
    distributed.assert_identical(run.schedule_params, run.world, "learned-schedule parameters")
    if run.loss.histogram is not None:                      # the adaptive objective's target (adaptive_binned: its λ)
        distributed.assert_identical(list(run.loss.histogram.buffers()), run.world, "loss histograms")
    # each rank's own loss sums since the last log row, so that the row after a resume averages the same losses
    running = running if not run.world.enabled else distributed.all_gather_rows(running, run.world)
    if not run.world.is_main:
        return
    state = {"step": step, "logged_step": run.logged_step, "world_size": run.world.size,
             "config": run.config.to_dict(), "model": run.model.state_dict(),
             "optimizer": run.optimizer.state_dict(), "ema": run.ema.state_dict(), "running": running.cpu(),
             "rng_cpu": torch.get_rng_state()}
    if run.device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state()
    learned = schedules.is_learned(run.loss.schedule)
    if learned:
        state["schedule"] = run.loss.schedule.state_dict()
    source = table_source(run.loss.schedule)       # the table file's sha256, checked on resume, export and sampling
    if source is not None:
        state["table_source"] = source
    state["loss_bins"] = run.loss_bins.state_dict()
    if run.loss.histogram is not None:
        state["histogram"] = run.loss.histogram.state_dict()
    checkpoint.save_training_state(out_dir, state)
    save_snapshot(run, out_dir, step)


def save_snapshot(run: Run, out_dir: Path, step: int) -> None:
    """Write ema.pt, the EMA snapshot for sampling and export (rank 0)."""
    learned, source = schedules.is_learned(run.loss.schedule), table_source(run.loss.schedule)
    shape, model_config = tuple(run.train_data.shape), run.config.model
    snapshot = {"kind": "ema", "step": step, "config": run.config.to_dict(), "model": ema_model(run).state_dict(),
                "data_shape": list(shape), "model_name": resolve_name(model_config.name, shape),
                "model_params": constructor_params(model_config.name, shape, model_config.params)}
    if learned:
        snapshot["schedule"] = run.loss.schedule.state_dict()
    if source is not None:
        snapshot["table_source"] = source
    if run.num_classes:
        snapshot["num_classes"] = run.num_classes
    if run.condition.num_classes:
        snapshot["schedule_num_classes"] = run.condition.num_classes
        snapshot["class_weights"] = run.condition_weights.tolist()
    checkpoint.atomic_save(snapshot, out_dir / checkpoint.EMA_NAME)


def train(config: cfg.RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
          on_eval: Callable[[int, dict], None] | None = None) -> dict:
    """Train as configured into `out_dir`; return the last metrics row (step, loss, eval metrics).

    Under torchrun the ranks split each global batch (DDP); rank 0 evaluates, logs and writes files.
    on_eval(step, row) is called (on rank 0) after every eval row is logged and the state saved; an
    exception it raises (e.g. optuna.TrialPruned) stops the run and propagates.
    """
    out_dir = output_dir(out_dir)
    world, device_name = distributed.setup(config.train.device)
    try:
        run = build(config, world, device_name)
        if config.train.compile:
            compile_run(run, config.train.compile_mode)
        start, state = open_run_dir(run, out_dir, resume)
        running = new_running(run.device) if state is None else \
            restored_running(state["running"], world.rank, world.size, run.device)
        last_row = loop(run, out_dir, start, running, progress, on_eval)
        # a run killed after its last checkpoint but before finished.json finishes here: its ema.pt (written after
        # checkpoint.pt) may be the one before, and its plots may be missing
        finishing = world.is_main and (start < config.train.steps or not (out_dir / run_artifacts.FINISHED).exists())
        if finishing and start == config.train.steps:
            save_snapshot(run, out_dir, start)
        moving = schedules.is_learned(run.loss.schedule) or bool(config.schedule.curriculum)
        if finishing and moving:
            from adaptive_sched.plots import schedule_over_training
            schedule_over_training(out_dir / "schedule_density.csv", out_dir / "schedule_density.png",
                                   config.schedule)
        if finishing and run.condition.num_classes:
            from adaptive_sched.plots import per_class_densities
            per_class_densities(out_dir / CLASS_DENSITY_CSV, out_dir / "schedule_density_by_class.png",
                                f"{config.schedule.name}, conditioned on {config.learned.condition}")
        if finishing:
            run_artifacts.mark_finished(out_dir, config.train.steps, schedules.is_learned(run.loss.schedule))
    finally:
        distributed.teardown(world)
    return last_row


def loop(run: Run, out_dir: Path, start: int, running: torch.Tensor, progress: bool,
         on_eval: Callable[[int, dict], None] | None) -> dict:
    """Phase 3: steps start..steps-1; log, evaluate and checkpoint on schedule; return the last metrics row."""
    config, t, main = run.config, run.config.train, run.world.is_main
    metrics = CsvLog(out_dir / "metrics.csv", metric_columns(config)) if main else None
    if start >= t.steps:
        rows = metrics.rows() if main else []
        return {k: (int(v) if k in ("step", "skipped") else float(v)) for k, v in rows[-1].items() if v != ""} \
            if rows else {"step": start}
    from tqdm.auto import tqdm
    bar = tqdm(total=t.steps, initial=start, disable=not (progress and main), unit="step", dynamic_ncols=True,
               desc=f"{config.schedule.name} seed {t.seed}")
    last_row = {}
    tick, tick_step, began = time.perf_counter(), start, time.perf_counter()
    run.model.train()
    graphs = t.compile and cuda_graphs(t.compile_mode, run.device)
    for step in range(start, t.steps):
        if graphs:                                  # each step a new CUDA-graph iteration (its outputs are read
            torch.compiler.cudagraph_mark_step_begin()   # within the step, before the next replay overwrites them)
        lr = first_compiled_step(run, step, running) if step == start and config.train.compile else \
            train_step(run, step, running)
        done = step + 1
        bar.update(1)
        is_log, is_eval = done % t.log_every == 0 or done == t.steps, done % config.eval.every == 0 or done == t.steps
        if is_log or is_eval:
            total, count, skipped, streak = distributed.all_reduce_sum(running, run.world).tolist()  # one sync
            skipped, streak = skipped / run.world.size, streak / run.world.size
            if streak >= t.max_nonfinite:
                if done < t.steps:                  # (a checkpoint at the last step would leave a retry nothing
                    save(run, out_dir, done, running)   # to train, nor its final eval)
                if main:
                    run_artifacts.mark_diverged(out_dir, done, int(streak))
                kept = "the weights in it are the last good ones" if done < t.steps else \
                    "a retry resumes from its last checkpoint"
                raise UsageError(f"training diverged: {int(streak)} non-finite losses in a row by step {done} "
                                 f"(each step was skipped; {out_dir} holds diverged.json, and {kept}); "
                                 f"lower --lr or check the data")
            now = time.perf_counter()
            row = {"step": done, "loss": total / count if count else float("nan"), "lr": lr,
                   "elapsed_s": round(now - began, 3), "skipped": int(skipped),
                   "img_s": round((done - tick_step) * t.batch_size / max(now - tick, 1e-9), 1),
                   **{f"schedule_{k}": v for k, v in run.loss.schedule.params().items()
                      if k in config.schedule.curriculum}}
            if is_eval and main:
                row.update(evaluate(run, out_dir, done))
                run.model.train()
            if main:
                metrics.append(row)
            run.logged_step = done
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_s']:.0f}")
            running[:3].zero_()                         # the streak carries over into the next interval
            distributed.barrier(run.world)              # the other ranks wait for rank 0's eval
            tick, tick_step, last_row = time.perf_counter(), done, row
        is_checkpoint = done % t.checkpoint_every == 0 or done == t.steps
        if is_checkpoint or (is_eval and on_eval is not None):   # a callback may stop the run: save first
            save(run, out_dir, done, running)
        if is_eval and on_eval is not None:
            call_on_eval(run, on_eval, done, last_row)
    bar.close()
    return last_row


def call_on_eval(run: Run, on_eval: Callable[[int, dict], None], step: int, row: dict) -> None:
    """on_eval on rank 0; when it raises, every other rank stops too instead of waiting in a collective."""
    stop = None
    if run.world.is_main:
        try:
            on_eval(step, row)
        except BaseException as err:       # noqa: BLE001 - re-raised below, after the other ranks are told
            stop = err
    if distributed.rank0_says(stop is not None, run.world):
        if stop is not None:
            raise stop
        raise UsageError(f"rank 0 stopped the run at step {step} (its own message says why)")   # one line a rank


def train_step(run: Run, step: int, running: torch.Tensor) -> float:
    """One optimisation step (no host sync on CUDA with fused AdamW): draw a batch and noise from the step's
    generator, take the loss's gradient, step unless non-finite, update EMA and diagnostics; return the lr."""
    t, world = run.config.train, run.world
    gen = step_generator(t.seed, step, run.device)
    idx = torch.randint(len(run.train_data), (t.batch_size,), generator=gen, device=run.device)
    if world.enabled:                              # this rank's share of the global batch, its own noise
        share = t.batch_size // world.size
        idx = idx[world.rank * share:(world.rank + 1) * share]
        gen = step_generator(t.seed, step, run.device, world.rank)
    lr = set_learning_rates(run, step)
    if run.ramps:                                 # a dynamic schedule: its parameters at this step
        run.loss.schedule = schedule_at(run.config.schedule, step, t.steps, run.ramps)
    x0 = run.train_data.x[idx]
    labels = None if run.train_data.y is None else run.train_data.y[idx]
    y = drop_labels(labels, t.p_uncond, run.num_classes, gen) if run.num_classes else None   # CFG label dropout
    cond = run.condition(x0, labels)               # the schedule's condition: the true class (or an input bin)
    with autocast_for(run.device):
        terms = run.loss.terms(run.train_model, x0, y, gen, **({} if cond is None else {"cond": cond}))
        loss = terms.loss.mean() + terms.extra
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    finite = step_is_finite(run, loss)
    stepped = optimizer_step_unless(run.optimizer, finite)
    if stepped is not False:                       # True, or (fused) the device's verdict, which the EMA and the
        on_device = None if stepped is True else stepped    # histogram follow there (a skipped step moves neither)
        eps_mse = terms.eps_mse.detach()
        run.ema.update(run.model, step, on_device)
        run.loss_bins.update(terms.logsnr.detach(), eps_mse if on_device is None else
                             torch.where(on_device, eps_mse, torch.full_like(eps_mse, math.nan)))
    update_running(running, terms.loss.mean().detach().float(), finite)
    return lr


def step_is_finite(run: Run, loss: torch.Tensor) -> torch.Tensor:
    """After backward: average φ's gradients over the ranks (DDP averaged the denoiser's), clip the denoiser's, and
    return a 0-d bool tensor: the loss (one process) and every gradient, the denoiser's and φ's, are finite.

    φ's gradients are checked apart from the loss: the variance objective's hooks scale them by 2f, which can
    overflow where the loss does not, and one non-finite step leaves φ's Adam state NaN for good. The denoiser's
    are checked through the clipping norm (computed anyway), or by their own norm without clipping."""
    t, world = run.config.train, run.world
    schedule_grads = [p.grad for p in run.schedule_params if p.grad is not None]
    if world.enabled:
        distributed.all_reduce_mean_(schedule_grads, world)
    if t.grad_clip > 0:
        finite = torch.isfinite(torch.nn.utils.clip_grad_norm_(run.optimizer.param_groups[0]["params"], t.grad_clip))
    else:
        finite = all_finite([p.grad for p in run.model.parameters() if p.grad is not None])
    if schedule_grads:
        finite = finite & all_finite(schedule_grads)
    if not world.enabled:                 # (under DDP each rank's loss is its own: the averaged gradients decide)
        finite = finite & torch.isfinite(loss.detach())
    return finite


def model_summary(run: Run) -> str:
    """One line naming the model and its size."""
    return f"{type(run.model).__name__} with {count_parameters(run.model):,} parameters on {run.device}"
