"""Phase 1 of training: a run's objects (data, schedule, loss, model, optimizer, EMA) built from its config.

`build(config)` returns a `Run`; the loop in `train` receives it and builds nothing itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adaptive_sched import config as cfg, curriculum, data as datasets, distributed, schedules, weighting
from adaptive_sched.conditioning import (GUIDED_METRICS, ScheduleCondition, check_class_labels, condition_frequencies,
                                         guidance_suffix, parse_condition)
from adaptive_sched.errors import UsageError
from adaptive_sched.losses import DiffusionLoss
from adaptive_sched.models import build_model
from adaptive_sched.optim import EMA, build_optimizer
from adaptive_sched.run_checks import (check_batch_size, check_bpd_levels, check_features, check_image_options,
                                       unsampled_window, validate, warn_once)
from adaptive_sched.runlog import METRIC_COLUMNS
from adaptive_sched.schedules.binned import LossHistogram
from adaptive_sched.schedules.table import check_window


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
    `num_conditions` > 0 builds a learned schedule λ(t, c) conditioned on that many classes or bins. A table must
    fit in the window (table.check_window: the window would clip it)."""
    s = schedule_config
    if num_conditions:
        schedule = conditional_schedule(s, num_conditions)
    else:
        ramps = curriculum.parse(s.curriculum)
        if ramps and schedules.is_learned(schedules.lookup(s.name)):   # the class tells; no need to build (and fit) it
            raise UsageError(f"a curriculum moves a fixed schedule's parameters; {s.name!r} learns its own, so drop "
                             f"--curriculum")
        curriculum.validate(s.name, s.params, ramps, lambda params: schedule_at(
            cfg.ScheduleConfig(s.name, s.logsnr_min, s.logsnr_max, params), 0, 1))
        schedule = schedule_at(s, step, steps, ramps)
    check_window(schedule, s.logsnr_min, s.logsnr_max)
    return schedule


def check_table_condition(schedule, condition: str) -> None:
    """UsageError when a table holding several classes' schedules would train a run whose schedule sees no
    condition ([learned] condition = "none"): its λ(t, y) needs each example's class."""
    from adaptive_sched.class_schedules import num_classes
    k = num_classes(schedule)
    if k and condition == "none" and schedules.is_learned(schedule):
        raise UsageError(f"a learned schedule's classes come from [learned] condition (\"class\" or \"stats:K\", "
                         f"--schedule-condition), not from num_classes = {k}")
    if k and condition == "none":
        raise UsageError(f"the table holds {k} classes' schedules: set [learned] condition = \"class\" to train "
                         f"with them, or train on the marginal table (an export's FILE.csv beside FILE.classes.csv)")


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
    validate(config)                               # the config alone, before any data is loaded
    if world.is_main:
        warn_once(unsampled_window(config))       # (train, compare and sweep all build their runs here)
    train_data = load_data(config.data, "train")
    check_batch_size(config, len(train_data))
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
    if num_classes or condition.kind == "class":
        check_class_labels(train_data.y, eval_data.y, train_data.num_classes)
    schedule = build_schedule(config.schedule, 0, config.train.steps, condition.num_classes)
    check_table_condition(schedule, condition.kind)
    loss = build_loss(config, schedule)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model.name, train_data.shape, num_classes, **config.model.params).to(device)
    check_image_options(config, train_data.shape)
    check_features(config, train_data.shape)
    check_bpd_levels(config, eval_data.x)
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
    s = config.schedule
    # `like`'s reference schedule over the run's window (it defaults to ±20: beyond that it weighted w = 0)
    window = {k: v for k, v in (("logsnr_min", s.logsnr_min), ("logsnr_max", s.logsnr_max))
              if v != getattr(cfg.ScheduleConfig, k)}
    if learned and w.name == "schedule" and (config.learned.objective in ("variance", "adaptive")
                                             or config.schedule.name == "adaptive_binned"):
        return weighting.build("like", schedule=config.learned.weight_like, target=config.train.target, **window)
    if w.name == "like":
        return weighting.build("like", **{**window, **w.params})
    return weighting.build(w.name, **w.params)
