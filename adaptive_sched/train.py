"""The training loop: any schedule, target and weighting; one step counter drives LR, EMA, seeds and data order.

Phases: build (data, schedule, loss, model, optimizer) → open the run directory (fresh or resumed) →
loop (no host sync except at log/eval/checkpoint steps) → final snapshot.
Resume is "the same command again with --resume": every random draw at step k comes from a generator
seeded by (seed, k), so a resumed run replays exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from adaptive_sched import (checkpoint, config as cfg, curriculum, data as datasets, distributed, run_artifacts,
                            schedules, weighting)
from adaptive_sched.compiling import compile_run, cuda_graphs, first_compiled_step
from adaptive_sched.conditioning import (GUIDED_METRICS, ScheduleCondition, condition_frequencies,
                                         drop_labels, guidance_suffix, parse_condition)
from adaptive_sched.errors import UsageError
from adaptive_sched.generate import autocast_for
from adaptive_sched.losses import DiffusionLoss
from adaptive_sched.models import build_model, constructor_params, count_parameters, resolve_name
from adaptive_sched.optim import EMA, build_optimizer, match_state_layout, warmup_lr
from adaptive_sched.schedules.binned import LossHistogram
from adaptive_sched.run_eval import CLASS_DENSITY_CSV, ema_model, evaluate
from adaptive_sched.run_checks import check_image_options, check_resumable, metrics_gap, validate
from adaptive_sched.runlog import METRIC_COLUMNS, PROFILE_COLUMNS, CsvLog
from adaptive_sched.seeding import step_generator
from adaptive_sched.step_guard import all_finite, new_running, optimizer_step_unless, update_running


def resolve_device(name: str) -> torch.device:
    """'auto' → CUDA when present, else CPU; an unavailable CUDA request is a UsageError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UsageError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def load_data(data_config: cfg.DataConfig, split: str) -> datasets.Dataset:
    """Load a split as configured (0/'' mean the loader's defaults)."""
    d = data_config
    return datasets.load(d.name, split, data_dir=d.data_dir or None, pad=d.pad, resize=d.resize or None,
                         n=d.n or None, dim=d.dim or None, seed=d.seed)


def build_schedule(schedule_config: cfg.ScheduleConfig, step: int = 0, steps: int = 1, num_conditions: int = 0):
    """The training schedule from its config, with any curriculum's parameter values at `step` of `steps`;
    `num_conditions` > 0 builds a learned schedule λ(t, c) conditioned on that many classes or bins."""
    s = schedule_config
    if num_conditions:
        return conditional_schedule(s, num_conditions)
    ramps = curriculum.parse(s.curriculum)
    if ramps and schedules.is_learned(schedules.lookup(s.name)):      # the class tells; no need to build (and fit) it
        raise UsageError(f"a curriculum moves a fixed schedule's parameters; {s.name!r} learns its own, so drop --curriculum")

    curriculum.validate(s.name, s.params, ramps, lambda params: schedule_at(
        cfg.ScheduleConfig(s.name, s.logsnr_min, s.logsnr_max, params), 0, 1))
    return schedule_at(s, step, steps, ramps)


def conditional_schedule(schedule_config: cfg.ScheduleConfig, num_conditions: int):
    """A learned schedule with `num_conditions` classes, or a multi-class table with exactly that many."""
    s = schedule_config
    if s.curriculum:
        raise UsageError("[learned] condition and a curriculum do not combine; drop one of them")
    if s.name == "learned":
        return schedules.build(s.name, logsnr_min=s.logsnr_min, logsnr_max=s.logsnr_max,
                               **{**s.params, "num_classes": num_conditions})
    schedule = schedules.build(s.name, logsnr_min=s.logsnr_min, logsnr_max=s.logsnr_max, **s.params)
    if getattr(schedule, "num_classes", 0) != num_conditions:
        raise UsageError(f"[learned] condition needs a schedule conditioned on {num_conditions} classes: the learned "
                         f"schedule, or a table with a class column; {s.name!r} has "
                         f"{getattr(schedule, 'num_classes', 0)}")
    return schedule


def schedule_at(schedule_config: cfg.ScheduleConfig, step: int, steps: int, ramps: dict | None = None):
    """The (fixed) schedule with its curriculum parameters at `step` of `steps` (no validation); `ramps` is the
    parsed curriculum when the caller already has it."""
    s = schedule_config
    ramps = curriculum.parse(s.curriculum) if ramps is None else ramps
    params = {**s.params, **curriculum.values_at(ramps, step, steps)}
    return schedules.build(s.name, logsnr_min=s.logsnr_min, logsnr_max=s.logsnr_max, **params)


def metric_columns(config: cfg.RunConfig) -> list[str]:
    """metrics.csv's columns: the standard ones, schedule_<param> for every curriculum parameter, and
    eval_swd/fid/kid@w<scale> for every guidance scale of a conditional run."""
    guided = [f"{name}{guidance_suffix(w)}" for w in config.eval.guidance for name in GUIDED_METRICS] \
        if config.train.conditional else []
    return METRIC_COLUMNS + [f"schedule_{p}" for p in config.schedule.curriculum] + guided


@dataclass
class Run:
    """The built objects of one training run."""

    config: cfg.RunConfig
    device: torch.device
    train_data: datasets.Dataset
    eval_data: datasets.Dataset
    loss: DiffusionLoss
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA
    loss_bins: LossHistogram     # per-λ-bin EMA of the ε-MSE seen in training (a diagnostic)
    world: distributed.World = distributed.World()
    train_model: torch.nn.Module | None = None   # what the step calls: the model, or its DDP wrapper (set by build)
    fid: object | None = None                    # FidEvaluator for image data (rank 0), see eval_features
    fid_info: dict | None = None
    ramps: dict | None = None                    # the parsed curriculum ({} for a static schedule)
    num_classes: int = 0                         # the denoiser's classes (0: unconditional); index K = null class
    condition: ScheduleCondition = field(default_factory=lambda: ScheduleCondition("none"))   # what λ(t, c) sees
    condition_weights: torch.Tensor | None = None  # (K,) training frequency of each condition (conditional only)
    logged_step: int = 0                         # the step of metrics.csv's last row (saved with each checkpoint)

    @property
    def schedule_params(self) -> list[torch.nn.Parameter]:
        return list(self.loss.schedule.parameters()) if schedules.is_learned(self.loss.schedule) else []


def build(config: cfg.RunConfig, world: distributed.World = distributed.World(), device_name: str | None = None) -> Run:
    """Phase 1: data, schedule, loss, model, optimizer and EMA, all on the run's device (DDP when world > 1)."""
    device = resolve_device(device_name or config.train.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True      # fixed shapes every step: let cuDNN pick its fastest kernels
    train_data = load_data(config.data, "train")
    validate(config, len(train_data))
    if config.train.batch_size % world.size:
        raise UsageError(f"batch_size {config.train.batch_size} must split evenly across {world.size} ranks")
    if world.enabled and config.train.compile and config.train.compile_mode == "reduce-overhead":
        raise UsageError("compile_mode 'reduce-overhead' (CUDA graphs) is for one process: under torchrun use "
                         "compile_mode 'default'")
    eval_data = load_data(config.data, "test")
    n_eval = min(config.eval.n, len(eval_data))
    eval_data = datasets.Dataset(eval_data.name, eval_data.x[:n_eval],
                                 None if eval_data.y is None else eval_data.y[:n_eval], eval_data.num_classes,
                                 eval_data.oracle)
    num_classes = denoiser_classes(config, train_data)
    condition = parse_condition(config.learned.condition, train_data.x, train_data.y, train_data.num_classes)
    schedule = build_schedule(config.schedule, 0, config.train.steps, condition.num_classes)
    loss = build_loss(config, schedule)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model.name, train_data.shape, num_classes, **config.model.params).to(device)
    check_image_options(config, train_data.shape)
    if config.train.channels_last:                 # before the optimizer and EMA take the parameters
        model.to(memory_format=torch.channels_last)
    groups = [{"params": list(model.parameters()), "weight_decay": config.train.weight_decay}]
    if schedules.is_learned(schedule):
        schedule.to(device)
        if loss.histogram is not None:
            loss.histogram.to(device)
        if list(schedule.parameters()):
            groups.append({"params": list(schedule.parameters()), "weight_decay": config.learned.weight_decay})
    optimizer = build_optimizer(config.train.optimizer, groups, config.train.lr, config.train.weight_decay,
                                device.type)
    s = config.schedule
    loss_bins = LossHistogram(s.logsnr_min, s.logsnr_max, bins=80, decay=0.99, floor=0.0).to(device)
    fid, fid_info = None, {}
    if world.is_main:
        from adaptive_sched.eval_features import build_evaluator
        fid, fid_info = build_evaluator(config.eval, config.data, train_data, eval_data, device)
    train_model = model
    if world.enabled:
        ids = [device.index] if device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return Run(config, device, train_data.to(device), eval_data.to(device), loss, model, optimizer,
               EMA(model, config.train.ema_decay), loss_bins, world, train_model, fid, fid_info,
               curriculum.parse(config.schedule.curriculum), num_classes, condition,
               condition_frequencies(condition(train_data.x, train_data.y), condition.num_classes)
               if condition.num_classes else None)


def denoiser_classes(config: cfg.RunConfig, train_data: datasets.Dataset) -> int:
    """The number of classes of a conditional denoiser ([train] conditional), 0 otherwise; refuses unlabelled data."""
    if not config.train.conditional:
        return 0
    if train_data.y is None or train_data.num_classes < 1:
        raise UsageError(f"[train] conditional needs class labels, and dataset {config.data.name!r} has none; use "
                         f"digits, mnist5k, fashion-mnist, cifar10 or an npz file with a y array")
    return train_data.num_classes


def build_loss(config: cfg.RunConfig, schedule) -> DiffusionLoss:
    """The run's loss over `schedule`: its target, weighting, schedule objective and smoothness."""
    return DiffusionLoss(schedule, config.train.target, build_weighting(config, schedules.is_learned(schedule)),
                         config.learned.objective, config.learned.smoothness)


def build_weighting(config: cfg.RunConfig, learned: bool):
    """The configured weighting; with a learned schedule and the variance objective, `schedule` means
    the effective weighting of [learned] weight_like (default laplace) for this target."""
    w = config.weighting
    if learned and w.name == "schedule" and (config.learned.objective in ("variance", "adaptive")
                                             or config.schedule.name == "adaptive_binned"):
        return weighting.build("like", schedule=config.learned.weight_like, target=config.train.target)
    return weighting.build(w.name, **w.params)


def set_learning_rates(run: Run, step: int) -> float:
    """Warmup for the denoiser's group; the schedule's group is frozen for its first freeze_steps."""
    lr = warmup_lr(run.config.train.lr, step, run.config.train.warmup)
    run.optimizer.param_groups[0]["lr"] = lr
    if len(run.optimizer.param_groups) > 1:
        learned = run.config.learned
        run.optimizer.param_groups[1]["lr"] = 0.0 if step < learned.freeze_steps else learned.lr
    return lr


def open_run_dir(run: Run, out_dir: Path, resume: bool) -> tuple[int, dict | None]:
    """Phase 2: create or reopen the run directory; return (start step, saved training state or None)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file, not a run directory")
    if run.world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    state = checkpoint.load_training_state(out_dir) if (out_dir / checkpoint.STATE_NAME).exists() or \
        (out_dir / checkpoint.PREVIOUS_NAME).exists() else None
    if state is not None and not resume:
        raise UsageError(f"{out_dir} already holds a run (checkpoint at step {state['step']}); "
                         f"pass --resume to continue it, or choose another --out")
    current = run.config.to_dict()
    if state is not None:
        check_resumable(state["config"], current)
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
    if not run.world.is_main:
        return start, state
    (out_dir / "config.toml").write_text(cfg.dumps_toml(current))
    from adaptive_sched.eval_features import write_info
    write_info(out_dir, run.fid_info or {})
    for name, columns in (("metrics.csv", metric_columns(run.config)), ("eval_profile.csv", PROFILE_COLUMNS)):
        CsvLog(out_dir / name, columns).truncate_after(start)
    for name in ("schedule_density.csv", "loss_bins.csv", CLASS_DENSITY_CSV):
        if (out_dir / name).exists():
            header = (out_dir / name).read_text().splitlines()[0].split(",")
            CsvLog(out_dir / name, header).truncate_after(start)
    return start, state


def save(run: Run, out_dir: Path, step: int, running: torch.Tensor) -> None:
    """Write the training state (atomically, keeping the previous one) and the EMA snapshot (rank 0).

    Under DDP every rank first checks that the ranks' weights and schedule parameters are identical.
    """
    distributed.assert_identical(list(run.model.parameters()), run.world, "denoiser weights")
    distributed.assert_identical(run.schedule_params, run.world, "learned-schedule parameters")
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
    state["loss_bins"] = run.loss_bins.state_dict()
    if run.loss.histogram is not None:
        state["histogram"] = run.loss.histogram.state_dict()
    checkpoint.save_training_state(out_dir, state)
    shape, model_config = tuple(run.train_data.shape), run.config.model
    snapshot = {"kind": "ema", "step": step, "config": run.config.to_dict(), "model": ema_model(run).state_dict(),
                "data_shape": list(shape), "model_name": resolve_name(model_config.name, shape),
                "model_params": constructor_params(model_config.name, shape, model_config.params)}
    if learned:
        snapshot["schedule"] = run.loss.schedule.state_dict()
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
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file, not a run directory")
    world, device_name = distributed.setup(config.train.device)
    try:
        run = build(config, world, device_name)
        if config.train.compile:
            compile_run(run, config.train.compile_mode)
        start, state = open_run_dir(run, out_dir, resume)
        running = new_running(run.device) if state is None else state["running"].to(run.device)
        if running.numel() == 2:                       # a checkpoint from before the non-finite counters
            running = torch.cat([running, torch.zeros(2, device=run.device)])
        last_row = loop(run, out_dir, start, running, progress, on_eval)
        moving = schedules.is_learned(run.loss.schedule) or bool(config.schedule.curriculum)
        if world.is_main and moving and start < config.train.steps:
            from adaptive_sched.plots import schedule_over_training
            schedule_over_training(out_dir / "schedule_density.csv", out_dir / "schedule_density.png",
                                   config.schedule)
        if world.is_main and run.condition.num_classes and start < config.train.steps:
            from adaptive_sched.plots import per_class_densities
            per_class_densities(out_dir / CLASS_DENSITY_CSV, out_dir / "schedule_density_by_class.png",
                                f"{config.schedule.name}, conditioned on {config.learned.condition}")
        if world.is_main and (start < config.train.steps or not (out_dir / run_artifacts.FINISHED).exists()):
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
                save(run, out_dir, done, running)
                raise UsageError(f"training diverged: {int(streak)} non-finite losses in a row by step {done} "
                                 f"(each step was skipped; the weights in {out_dir} are the last good ones); "
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
        raise RuntimeError(f"rank 0 stopped the run at step {step}")


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
    finite = torch.isfinite(loss.detach())
    if world.enabled:                              # DDP averaged the denoiser's gradients; average φ's here
        grads = [p.grad for p in run.schedule_params if p.grad is not None]
        distributed.all_reduce_mean_(grads, world)
        finite = all_finite([p.grad for p in run.model.parameters() if p.grad is not None] + grads)
    if t.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(run.optimizer.param_groups[0]["params"], t.grad_clip)
        finite = finite & torch.isfinite(norm)
    if optimizer_step_unless(run.optimizer, finite):
        run.ema.update(run.model, step)
        run.loss_bins.update(terms.logsnr.detach(), terms.eps_mse.detach())
    update_running(running, terms.loss.mean().detach().float(), finite)
    return lr


def model_summary(run: Run) -> str:
    """One line naming the model and its size."""
    return f"{type(run.model).__name__} with {count_parameters(run.model):,} parameters on {run.device}"
