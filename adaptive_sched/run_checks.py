"""Checks before a run starts: settings that cannot work, and run directories that cannot be resumed as asked.

Each raises UsageError with a one-line message; none touches the device.
"""
from __future__ import annotations

import math
from pathlib import Path

from adaptive_sched import config as cfg, data, models, samplers
from adaptive_sched.conditioning import SAMPLE_LABELS, check_guidance
from adaptive_sched.errors import UsageError
from adaptive_sched.generate import sampling_grid
from adaptive_sched.losses import check_objective
from adaptive_sched.runlog import CsvLog

# config keys that may change between a run and its resumption
RESUMABLE_CHANGES = {("train", "steps"), ("train", "log_every"), ("train", "checkpoint_every"), ("eval", "every"),
                     ("train", "device"), ("train", "compile"), ("train", "channels_last"), ("train", "compile_mode")}

CONDITIONAL_ONLY = {("train", "p_uncond"), ("eval", "sample_labels")}    # keys only a conditional run reads


def validate(config: cfg.RunConfig) -> None:
    """Refuse impossible settings before any work is done (the batch size against the data: check_batch_size)."""
    t, e = config.train, config.eval
    data.check_spec(config.data.name)
    if config.data.data_dir and config.data.name not in data.DATA_DIR_SETS:
        raise UsageError(f"data_dir applies to {', '.join(data.DATA_DIR_SETS)} only (where to find its files); "
                         f"{config.data.name!r} does not read it (drop --data-dir / [data] data_dir)")
    models.check_options(config.model.name, config.model.params)
    for name, value in (("lr", t.lr), ("weight_decay", t.weight_decay), ("grad_clip", t.grad_clip)):
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"{name} must be a finite number >= 0, got {value}")
    if not 0 <= t.seed < 2 ** 31:
        raise UsageError(f"seed must be in 0..2^31-1, got {t.seed}")
    if not 0 <= config.data.seed < 2 ** 31:
        raise UsageError(f"[data] seed must be in 0..2^31-1, got {config.data.seed}")
    if t.warmup < 0 or t.max_nonfinite < 1:
        raise UsageError(f"warmup must be >= 0 and max_nonfinite >= 1, got {t.warmup} and {t.max_nonfinite}")
    if not (e.logsnr_lo < e.logsnr_hi or (e.logsnr_lo == e.logsnr_hi and e.logsnr_points == 1)):
        raise UsageError(f"[eval] logsnr_lo must be below logsnr_hi (or equal, with logsnr_points = 1), got "
                         f"{e.logsnr_lo} and {e.logsnr_hi}")
    learned = config.learned
    for name, value in (("lr", learned.lr), ("weight_decay", learned.weight_decay),
                        ("smoothness", learned.smoothness), ("freeze_steps", learned.freeze_steps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise UsageError(f"[learned] {name} must be a finite number >= 0, got {value!r}")
    if e.n < 1 or e.sample_n < 0 or e.logsnr_points < 1 or e.sample_steps < 1:
        raise UsageError("[eval] n and logsnr_points must be >= 1, sample_n >= 0, sample_steps >= 1")
    if e.bpd_n < 0 or e.bpd_points < 1 or e.bpd_bins == 1 or e.bpd_bins < 0 or e.kid_subsets < 1:
        raise UsageError("[eval] bpd_n must be >= 0, bpd_points >= 1, bpd_bins 0 (continuous) or >= 2, kid_subsets >= 1")
    check_objective(config.learned.objective)       # before the learned schedule's initial fit
    if e.sampler not in samplers.names():
        raise UsageError(f"unknown sampler {e.sampler!r}; choose one of: {', '.join(samplers.names())}")
    sampling_grid(e.grid, e.sample_steps, e.sample_logsnr_min, e.sample_logsnr_max)   # refuse a bad grid now
    if t.steps <= 0:
        raise UsageError(f"steps must be > 0, got {t.steps}")
    if t.steps >= 2 ** 32:                         # the per-step seed mixes (seed << 32) + step
        raise UsageError(f"steps must be < 2^32 (the per-step seeds would repeat), got {t.steps}")
    if t.batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {t.batch_size}")
    if t.lr <= 0 or t.log_every <= 0 or t.checkpoint_every <= 0 or config.eval.every <= 0:
        raise UsageError("lr, log_every, checkpoint_every and eval.every must be > 0")
    if not 0 <= t.ema_decay < 1:
        raise UsageError(f"ema_decay must be in [0, 1), got {t.ema_decay}")
    if not (math.isfinite(t.p_uncond) and 0 <= t.p_uncond < 1):
        raise UsageError(f"p_uncond must be in [0, 1), got {t.p_uncond}")
    check_guidance(e.guidance, t.conditional, t.p_uncond)
    if e.sample_labels not in SAMPLE_LABELS:
        raise UsageError(f"[eval] sample_labels must be one of {', '.join(SAMPLE_LABELS)}, got {e.sample_labels!r}")
    if t.compile_mode not in cfg.COMPILE_MODES:
        raise UsageError(f"[train] compile_mode must be one of {', '.join(cfg.COMPILE_MODES)}, got {t.compile_mode!r}")
    if t.compile_mode != "default" and not t.compile:
        raise UsageError(f"[train] compile_mode {t.compile_mode!r} needs compile = true (train --compile)")


def ineffective_settings(config: cfg.RunConfig) -> list[str]:
    """One line per setting a config file gives a non-default value that this run would not use (train warns with
    them: a resolved config.toml reused with another schedule keeps its [learned] keys, so they are not refused)."""
    learned, defaults, t = config.learned, cfg.LearnedConfig(), config.train
    name = config.schedule.name
    only_learned = ("objective", "lr", "weight_decay", "freeze_steps", "smoothness")   # (condition: refused if unused)
    lines = [f"[learned] {key} = {getattr(learned, key)!r} has no effect with schedule {name!r}"
             for key in only_learned if name != "learned" and getattr(learned, key) != getattr(defaults, key)]
    if name == "learned" and learned.objective != "cvdm" and learned.smoothness != defaults.smoothness:
        lines.append(f"[learned] smoothness = {learned.smoothness!r} has no effect with objective "
                     f"{learned.objective!r} (only cvdm has the penalty)")
    weighs_like = config.weighting.name == "schedule" and (
        name == "adaptive_binned" or (name == "learned" and learned.objective in ("variance", "adaptive")))
    if learned.weight_like != defaults.weight_like and not weighs_like:
        lines.append(f"[learned] weight_like = {learned.weight_like!r} has no effect here (it sets the weighting of "
                     f"a learned schedule's variance or adaptive objective, or of adaptive_binned, when [weighting] "
                     f"name = \"schedule\")")
    if not t.conditional:
        lines += [f"[{section}] {key} = {value!r} has no effect without [train] conditional = true"
                  for section, key, value, default in (("train", "p_uncond", t.p_uncond, cfg.TrainConfig.p_uncond),
                                                       ("eval", "sample_labels", config.eval.sample_labels,
                                                        cfg.EvalConfig.sample_labels)) if value != default]
    return lines


ABSOLUTE_WEIGHTINGS = ("elbo", "sigmoid", "like")     # c = w/p: the objective ∫w·ℓ dλ, wherever p draws λ


def unsampled_window(config: cfg.RunConfig) -> list[str]:
    """A warning line (run_build.build prints it, for train, compare and sweep alike) when an absolute weighting
    meets a fixed schedule that never draws the ends of the window:
    t comes from the midpoints of 2^24 bins (schedules.base.uniform_t), so λ stays within λ(1 − 2^-25)..λ(2^-25),
    and ∫w·ℓ dλ loses what w puts beyond (elbo under Laplace(0.5) on unit-Gaussian data: 55%)."""
    import torch
    from adaptive_sched import schedules
    from adaptive_sched.run_build import build_schedule
    if config.weighting.name not in ABSOLUTE_WEIGHTINGS or schedules.is_learned(schedules.lookup(
            config.schedule.name)) or config.schedule.name in ("adaptive_binned", "table"):
        return []
    schedule, edge = build_schedule(config.schedule), 2.0 ** -25
    lo, hi = schedule.logsnr(torch.tensor([1 - edge, edge], dtype=torch.float64)).tolist()
    low, high = float(schedule.logsnr_min), float(schedule.logsnr_max)   # (linear, polynomial: their own support)
    if lo - low < 1 and high - hi < 1:
        return []
    return [f"weighting {config.weighting.name!r} with schedule {config.schedule.name!r}: λ is only ever drawn in "
            f"[{lo:.3g}, {hi:.3g}] of the window [{low:.4g}, {high:.4g}], so the objective ∫w·ℓ dλ "
            f"loses what w weights beyond; pair an absolute weighting with a heavy-tailed schedule (cosine, cauchy, "
            f"learned)"]


_WARNED: set[str] = set()      # the warning lines this process has printed (warn_once)


def warn_once(lines: list[str]) -> None:
    """Print each line as `warning: ...` on stderr, once per process: compare and sweep build many runs of a config."""
    import sys
    for line in lines:
        if line not in _WARNED:
            _WARNED.add(line)
            print(f"warning: {line}", file=sys.stderr)


def check_batch_size(config: cfg.RunConfig, n_train: int) -> None:
    """batch_size in 1..n_train (the training set size)."""
    if not 0 < config.train.batch_size <= n_train:
        raise UsageError(f"batch_size must be in 1..{n_train} (the training set size), got {config.train.batch_size}")


def check_image_options(config: cfg.RunConfig, shape: tuple[int, ...]) -> None:
    """[train] channels_last and [eval] clip_x0 need (C, H, W) images in [-1, 1], not vectors."""
    for on, name in ((config.train.channels_last, "channels_last"), (config.eval.clip_x0, "clip_x0")):
        if on and len(shape) != 3:
            raise UsageError(f"{name} applies to images; data {config.data.name!r} is {len(shape)}-D vectors, "
                             f"not (C, H, W) images")


def check_features(config: cfg.RunConfig, shape: tuple[int, ...]) -> None:
    """[eval] features other than auto and none (a feature network file) need (C, H, W) images."""
    spec = config.eval.features
    if spec not in ("auto", "none") and len(shape) != 3:
        raise UsageError(f"[eval] features {spec!r} applies to images; data {config.data.name!r} is {len(shape)}-D "
                         f"vectors (use features = \"auto\" or \"none\")")


def check_metric_logged(config: cfg.RunConfig, metric: str) -> None:
    """UsageError when the runs of `config` would never log the eval metric `metric` (checked before any run); a
    guided metric (eval_fid@w1.5) needs what its unguided name needs."""
    e, name, metric = config.eval, config.data.name, metric.split("@")[0]
    if metric in ("eval_fid", "eval_kid") and (e.features == "none" or name in data.VECTOR_SETS):
        raise UsageError(f"metric {metric} needs image data and a feature network ([eval] features), not "
                         f"{name!r} with features {e.features!r}")
    if metric in ("eval_swd", "eval_fid", "eval_kid") and e.sample_n <= 0:
        raise UsageError(f"metric {metric} needs samples at each eval: set [eval] sample_n > 0")
    if metric == "eval_bpd" and e.bpd_n <= 0:
        raise UsageError("metric eval_bpd needs held-out examples at each eval: set [eval] bpd_n > 0")
    if metric == "eval_excess_mse" and name != "gmm":
        raise UsageError("metric eval_excess_mse needs the exact denoiser of data gmm")


def check_bpd_levels(config: cfg.RunConfig, eval_x) -> None:
    """[eval] bpd_bins > 0 needs the held-out examples the VLB scores on that many levels (likelihood.check_levels),
    checked before training rather than at the first eval."""
    from adaptive_sched.likelihood import check_levels
    e = config.eval
    if e.bpd_n > 0 and e.bpd_bins:
        check_levels(eval_x[:e.bpd_n], e.bpd_bins, "[eval] bpd_bins", off="0")


def check_resumable(saved: dict, current: dict) -> None:
    """A resumed run must have the same config as the saved one, except for RESUMABLE_CHANGES (steps only without a
    curriculum) and, between unconditional runs, CONDITIONAL_ONLY; a key the saved run lacks (written by an older
    version) counts as that key's default (cfg.with_defaults)."""
    saved = cfg.with_defaults(saved)
    unconditional = not saved.get("train", {}).get("conditional") and not current.get("train", {}).get("conditional")
    for section in sorted(set(saved) | set(current)):
        keys = set(saved.get(section, {})) | set(current.get(section, {}))
        for key in sorted(keys):
            if unconditional and (section, key) in CONDITIONAL_ONLY:
                continue                               # settings no unconditional run uses
            old, new = saved.get(section, {}).get(key), current.get(section, {}).get(key)
            if (section, key) == ("train", "steps") and old != new and saved.get("schedule", {}).get("curriculum"):
                raise UsageError(f"cannot resume: [train] steps was {old!r} in the saved run, now {new!r}, and its "
                                 f"curriculum ramps over the steps (its parameters would jump); use another --out")
            if (section, key) in RESUMABLE_CHANGES:
                continue
            if old != new:
                raise UsageError(f"cannot resume: [{section}] {key} was {old!r} in the saved run, now {new!r}; "
                                 f"use the same settings or another --out")


def resumed_changes(saved: dict, current: dict) -> list[str]:
    """'[section] key old → new' for each RESUMABLE_CHANGES setting a resume changes (what a resume command that does
    not restate, e.g., --checkpoint-every silently gets: the default)."""
    saved = cfg.with_defaults(saved)
    return [f"[{section}] {key} {saved.get(section, {}).get(key)!r} → {current.get(section, {}).get(key)!r}"
            for section, key in sorted(RESUMABLE_CHANGES)
            if saved.get(section, {}).get(key) != current.get(section, {}).get(key)]


def metrics_gap(out_dir: Path, logged_step: int, start: int) -> str | None:
    """Why a run cannot resume when metrics.csv ends before the checkpoint's last logged row (its rows were lost:
    the run would otherwise go on, or count as finished, with its eval rows missing); None when it covers it."""
    path = out_dir / "metrics.csv"
    rows = CsvLog(path, ["step"]).rows() if path.exists() and path.stat().st_size else []
    last = max((int(float(row["step"])) for row in rows), default=0)
    if last >= logged_step:
        return None
    return (f"cannot resume: {path} ends at step {last}, but the checkpoint (step {start}) was saved after the row "
            f"for step {logged_step}; those rows are lost: train into another --out")


def unresumable(run_dir: Path) -> str | None:
    """Why the checkpoint in run_dir cannot resume (metrics.csv missing or behind it), or None (also when there
    is no checkpoint)."""
    from adaptive_sched import checkpoint
    state = checkpoint.load_training_state(run_dir) if run_dir.is_dir() else None
    if state is None:
        return None
    if not (run_dir / "metrics.csv").exists() and int(state["step"]) > 0:
        return f"{run_dir} holds a checkpoint at step {state['step']} but no metrics.csv"
    return metrics_gap(run_dir, int(state.get("logged_step", 0)), int(state["step"]))


def main(argv: list[str] | None = None) -> int:
    """`python -m adaptive_sched.run_checks --stale RUN_DIR...`: print the run directories whose checkpoint cannot
    resume (experiments/gpu_next.sh retrains them); directories without a checkpoint are passed over."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m adaptive_sched.run_checks", description=main.__doc__)
    parser.add_argument("--stale", nargs="*", default=[], metavar="RUN_DIR")
    for run_dir in parser.parse_args(argv).stale:
        if unresumable(Path(run_dir)) is not None:
            print(run_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
