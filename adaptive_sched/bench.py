"""`adaptive-sched bench`: steady-state speed of the real training step, one JSON line per measurement (issue 6).

Each measurement builds a fresh Run with run_build.build and times train.train_step itself (never a copy): the
FLOPs of one step from FlopCounterMode, W warm-up steps, then `repeats` windows of N steps with a device
synchronise only at window ends; the median window gives step_ms and img_s. MFU is against a matmul peak
measured in the same process (bf16 on CUDA, fp32 on CPU). Eager runs first, so a torch.compile crash that
kills the CUDA context (torch 2.11, batch 512: `misaligned address`) cannot lose the baseline.
`python -m adaptive_sched.bench ...` runs it standalone (the concurrency workers do).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from adaptive_sched import config as cfg
from adaptive_sched.cli import add_run_options, refuse_ignored_options, resolve_config
from adaptive_sched.bench_concurrency import bench_concurrent, wait_barrier
from adaptive_sched.compiling import device_ok, error_line, sync
from adaptive_sched.errors import UsageError
from adaptive_sched.bench_table import is_json_lines
from adaptive_sched.out_paths import replaceable

if TYPE_CHECKING:              # torch and the trainer are imported on first use: `adaptive-sched --help` stays fast
    import torch
    from adaptive_sched.run_build import Run

# mode name -> (torch.compile mode, or None for eager; channels_last weights: the mode sets [train] channels_last)
MODES: dict[str, tuple[str | None, bool]] = {
    "eager": (None, False), "compiled": ("default", False), "reduce-overhead": ("reduce-overhead", False),
    "channels_last": (None, True), "compiled+channels_last": ("default", True),
    "reduce-overhead+channels_last": ("reduce-overhead", True)}
_PEAKS: dict[tuple[str, int], float] = {}          # matmul FLOP/s per (device, size), measured once per process


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (platform.processor() elsewhere)."""
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def matmul_peak(device: torch.device, n: int) -> float:
    """FLOP/s of an n³ matmul, bf16 on CUDA and fp32 on CPU: the best of 3 timed windows."""
    import torch
    if (str(device), n) not in _PEAKS:
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
                for _ in range(2))
        iters, best = (20 if device.type == "cuda" else 2), float("inf")
        a @ b
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                a @ b
            sync(device)
            best = min(best, time.perf_counter() - t0)
        _PEAKS[(str(device), n)] = 2 * n ** 3 * iters / best
    return _PEAKS[(str(device), n)]


def mfu(flop_s: float, peak: float | None) -> float | None:
    """Model FLOP utilisation, achieved / peak FLOP/s, to 4 significant digits (None without a peak)."""
    return float(f"{flop_s / peak:.4g}") if peak else None


def reset_memory(device: torch.device) -> None:
    """Free what is unreferenced and restart the CUDA peak-memory counter (nothing to reset on CPU)."""
    import torch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Peak memory in MiB: CUDA max_memory_allocated since the last reset, else the process's max RSS (Linux)."""
    import torch
    if device.type == "cuda":
        return {"peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1),
                "mem_kind": "cuda_max_allocated"}
    return {"peak_mem_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10, 1),
            "mem_kind": "process_max_rss"}


def count_flops(run: Run, step: int = 0) -> int:
    """FLOPs (matmuls, convolutions, attention) of one real training step: forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode
    from adaptive_sched.train import new_running, train_step
    with FlopCounterMode(display=False) as counter:
        train_step(run, step, new_running(run.device))
    return int(counter.get_total_flops())


def time_windows(run: Run, args: argparse.Namespace, mark_step: bool, bar) -> dict:
    """Warm up, then time `repeats` windows of `steps` train_steps; the device syncs only around windows."""
    from adaptive_sched.bench_profile import take_steps
    from adaptive_sched.train import new_running
    running, steps = new_running(run.device), itertools.count(1)      # step 0 was the FLOP count

    def window(n: int) -> float:
        sync(run.device)
        t0 = time.perf_counter()
        take_steps(run, itertools.islice(steps, n), running, mark_step)
        sync(run.device)                                # asynchronous errors of compiled steps surface here
        elapsed = time.perf_counter() - t0
        bar.update(n)
        return elapsed

    window(args.warmup)
    if args.barrier:
        wait_barrier(args.barrier, args.barrier_n)      # a --concurrent worker: start timing together
    began = time.time()
    times = [window(args.steps) for _ in range(args.repeats)]
    ended = time.time()
    total, count, skipped, _ = running.tolist()          # after the timing: the one host read
    step_s = statistics.median(times) / args.steps
    return {"step_ms": round(1e3 * step_s, 3), "img_s": round(run.config.train.batch_size / step_s, 1),
            "step_ms_windows": [round(1e3 * t / args.steps, 3) for t in times], "loss": total / max(count, 1),
            "skipped_steps": int(skipped), "t_start": began, "t_end": ended}


def common_fields(run: Run, measure: str, mode: str) -> dict:
    """The fields every JSON line carries: when, where, what was measured."""
    import torch
    from adaptive_sched.models import count_parameters
    c, model = run.config, run.model
    row = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_name(run.device),
           "device_type": run.device.type, "torch": torch.__version__, "measure": measure, "mode": mode,
           "data": c.data.name, "shape": list(run.train_data.shape), "schedule": c.schedule.name,
           "batch_size": c.train.batch_size, "seed": c.train.seed, "model": type(model).__name__,
           "params": count_parameters(model), "compile_failed": False}
    from adaptive_sched.schedules import OBJECTIVE_SCHEDULES
    if c.schedule.name in OBJECTIVE_SCHEDULES:       # what the learned schedule's parameters minimise
        row["objective"] = c.learned.objective
    return {**row, "threads": torch.get_num_threads()} if run.device.type == "cpu" else row


def measure_train(config: cfg.RunConfig, mode: str, args: argparse.Namespace,
                  peak_n: int) -> tuple[dict, Run | None, str | None]:
    """One training measurement: (row, run, None), or (partial row, None, error line) if the compiled path failed."""
    from tqdm.auto import tqdm
    from adaptive_sched.bench_profile import profile_steps
    from adaptive_sched.compiling import compile_run, cuda_graphs
    from adaptive_sched.run_build import build
    compile_mode, channels_last = MODES[mode]
    run = build(dataclasses.replace(config, train=dataclasses.replace(config.train, channels_last=channels_last)))
    reset_memory(run.device)
    flops = count_flops(run) // config.train.batch_size
    row = {**common_fields(run, "train", mode), "flops_per_image": flops, "steps": args.steps,
           "warmup": args.warmup, "repeats": args.repeats}
    bar = tqdm(total=args.warmup + args.steps * args.repeats, desc=f"bench {mode} {config.schedule.name}",
               unit="step", file=sys.stderr, disable=args.quiet, leave=False)
    try:
        if compile_mode is not None:
            compile_run(run, compile_mode)
            row["compiled_loss"] = "parts" if isinstance(run.loss.core_fn, functools.partial) else "whole"
        mark_step = cuda_graphs(compile_mode, run.device)
        row.update(time_windows(run, args, mark_step, bar))
        if args.profile:
            path = Path(args.profile) / f"{mode}-{config.schedule.name}-b{config.train.batch_size}.txt"
            row.update(profile_steps(run, args.profile_steps, path, mark_step), profile_file=str(path))
    except Exception as err:               # noqa: BLE001 - any failure of the compiled path falls back to eager
        if compile_mode is None:
            raise
        return row, None, error_line(err)      # not the exception: its traceback would keep the run alive
    finally:
        bar.close()
    row.update(peak_memory(run.device))
    peak = matmul_peak(run.device, peak_n) if peak_n > 0 else None
    row.update(peak_flops=peak and round(peak), mfu=mfu(flops * row["img_s"], peak))
    return row, run, None


def measure_sample(run: Run, mode: str, args: argparse.Namespace) -> dict:
    """sample_img_s of `sample_steps`-step DDIM from the run's EMA model (compiled in the compiled modes)."""
    import torch
    from adaptive_sched.generate import generate, sampling_grid
    from adaptive_sched.train import ema_model
    model = ema_model(run)
    e, t = run.config.eval, run.config.train
    grid = sampling_grid(e.grid, args.sample_steps, e.sample_logsnr_min, e.sample_logsnr_max)
    n = args.sample_n or t.batch_size
    row = {**common_fields(run, "sample", mode), "sampler": "ddim", "sample_steps": args.sample_steps,
           "sample_n": n, "repeats": args.repeats}

    def once(net) -> float:
        sync(run.device)
        t0 = time.perf_counter()
        generate(net, t.target, run.train_data.shape, n, grid, "ddim", seed=t.seed, device=run.device, batch_size=n)
        sync(run.device)
        return time.perf_counter() - t0

    def timed(net) -> float:
        once(net)                                                  # warm-up (and compilation)
        return statistics.median(once(net) for _ in range(args.repeats))

    reset_memory(run.device)
    median = None
    if MODES[mode][0] is not None:
        try:
            median = timed(torch.compile(model, mode=MODES[mode][0]))
        except Exception as err:           # noqa: BLE001
            print(f"warning: compiled sampling failed, falling back to eager: {error_line(err)}", file=sys.stderr)
            row.update(compile_failed=True, compile_error=error_line(err), fallback="eager")
            torch._dynamo.reset()
            if not device_ok(run.device):
                return row
    median = median or timed(model)
    return {**row, "sample_s": round(median, 4), "sample_img_s": round(n / median, 1), **peak_memory(run.device)}


def schedule_names(args: argparse.Namespace, base: cfg.RunConfig) -> list[str]:
    """The schedules the bench measures: --compare-schedules, else the run's own."""
    return list(dict.fromkeys(parse_list(args.compare_schedules))) if args.compare_schedules else [base.schedule.name]


def with_schedule(base: cfg.RunConfig, name: str, args: argparse.Namespace) -> cfg.RunConfig:
    """The bench config for schedule `name` (its parameters kept when it is the --schedule itself)."""
    config = cfg.from_dict({"schedule": {"name": name}}, copy.deepcopy(base))
    config.train.steps = args.warmup + 1 + args.steps * args.repeats
    return config


def bench_modes(args: argparse.Namespace, base: cfg.RunConfig, device: torch.device, peak_n: int,
                emit: Callable[[dict], None]) -> None:
    """Training in every mode x schedule (eager first), sampling once per mode, with speedup and overhead_pct."""
    import torch
    from adaptive_sched import schedules
    names = schedule_names(args, base)
    for name in names:
        schedules.lookup(name)                         # refuse an unknown name before any work
    eager: dict[str, dict] = {}
    for mode in args.modes:
        rows: dict[str, dict] = {}
        for name in names:
            run = None                                 # free the previous run before building the next
            row, run, err = measure_train(with_schedule(base, name, args), mode, args, peak_n)
            if err is not None:
                print(f"warning: {mode} failed, falling back to eager: {err}", file=sys.stderr)
                row.update({k: v for k, v in eager[name].items() if k not in row},
                           compile_failed=True, compile_error=err, fallback="eager")
                torch._dynamo.reset()
            eager.setdefault(name, row)
            if mode != "eager":
                row["speedup"] = round(eager[name]["step_ms"] / row["step_ms"], 4)
            if name != names[0]:
                row.update(baseline_schedule=names[0],
                           overhead_pct=round(100 * (row["step_ms"] / rows[names[0]]["step_ms"] - 1), 2))
            rows[name] = row
            emit(row)
            if err is not None and not device_ok(device):
                print("warning: the device is unusable after that failure; skipping the remaining measurements "
                      "(run them in a fresh process)", file=sys.stderr)
                return
        if args.sample and run is not None:
            emit(measure_sample(run, mode, args))
        del run


def parse_list(text: str, kind: type = str) -> list:
    """'a,b,c' -> [a, b, c], each converted by `kind`; UsageError on an empty item or a bad number."""
    items = [s.strip() for s in str(text).split(",")]
    try:
        if not all(items):
            raise ValueError("empty item")
        return [kind(s) for s in items]
    except ValueError:
        raise UsageError(f"expected a comma-separated list, got {text!r}") from None


def refuse_ignored_bench_options(args: argparse.Namespace, base: cfg.RunConfig) -> None:
    """UsageError naming the options given on the command line that this bench would not use. (--sample-steps and
    --sample-n with --no-sample are let by: experiments/gpu_steps.sh appends BENCH_ARGS to every bench call.)"""
    concurrent = ("--modes", "--compile", "--channels-last", "--compare-schedules", "--sample", "--sample-steps",
                  "--sample-n", "--profile", "--profile-steps")
    groups = [(concurrent if args.concurrent else (), "with --concurrent (its workers time eager training only)"),
              (("--profile-steps",) if not args.profile else (), "without --profile"),
              (("--compile", "--channels-last") if args.modes else (), "with --modes (name those modes there)"),
              (("--checkpoint-every", "--eval-every", "--log-every"), "in bench (it saves, evaluates and logs "
                                                                      "nothing)")]
    for flags, why in groups:
        given = [flag for flag in flags if getattr(args, flag[2:].replace("-", "_")) not in (None, False)]
        if given:
            raise UsageError(f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect {why}")
    set_by = [flag for flag in ("--schedule", "--schedule-param", "--curriculum") if getattr(args, flag[2:].replace(
        "-", "_"))]
    if set_by and args.compare_schedules and base.schedule.name not in parse_list(args.compare_schedules):
        what = f"--schedule {args.schedule} is" if args.schedule else f"{', '.join(set_by)} set schedule " \
            f"{base.schedule.name!r}, which is"
        raise UsageError(f"{what} not among --compare-schedules {args.compare_schedules}, which are what bench "
                         f"measures: add it there or drop {', '.join(set_by)}")


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad bench settings in one line; resolve the modes (eager always, and first) and the defaults of the
    sampling and profiling options (None until then: refuse_ignored_bench_options tells given from default)."""
    args.sample = args.sample is not False
    args.sample_steps = 50 if args.sample_steps is None else args.sample_steps
    args.sample_n = 0 if args.sample_n is None else args.sample_n
    args.profile_steps = 5 if args.profile_steps is None else args.profile_steps
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.sample_steps < 1 or args.sample_n < 0 \
            or args.profile_steps < 1:
        raise UsageError("--steps, --repeats, --sample-steps and --profile-steps must be >= 1; --warmup and "
                         "--sample-n >= 0")
    modes = parse_list(args.modes) if args.modes else ["eager"] + ["compiled"] * args.compile + \
        ["channels_last"] * args.channels_last + ["compiled+channels_last"] * (args.compile and args.channels_last)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise UsageError(f"unknown mode {unknown[0]!r}; choose from: {', '.join(MODES)}")
    args.modes = ["eager"] + [m for m in dict.fromkeys(modes) if m != "eager"]
    if args.peak_n is not None and args.peak_n < 0:
        raise UsageError(f"--peak-n must be >= 0 (0: skip the FLOP/s peak), got {args.peak_n}")
    if args.concurrent and min(parse_list(args.concurrent, int)) < 1:
        raise UsageError("--concurrent takes worker counts >= 1, e.g. 1,2,4,8")


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the bench: JSON lines on stdout (and appended to --out); progress and warnings on stderr."""
    from adaptive_sched.run_build import resolve_device
    base = resolve_config(args)
    device = resolve_device(base.train.device)
    base.train.device = str(device)
    refuse_ignored_bench_options(args, base)
    check_args(args)
    refuse_ignored_options(args, base, schedule_names(args, base))
    if any(MODES[mode][1] for mode in args.modes):         # refuse a channels_last mode for vectors before any row
        from adaptive_sched.run_checks import check_image_options
        from adaptive_sched.run_build import load_data
        check_image_options(dataclasses.replace(base, train=dataclasses.replace(base.train, channels_last=True)),
                            load_data(base.data, "train").shape)
    out = Path(args.out) if args.out else None
    if out is not None:                           # before any measurement: a bad --out would lose them all
        replaceable(out, is_json_lines, "a file of bench JSON lines (bench appends to one)")
    if args.profile:                              # made once every option is checked: a refused bench makes nothing
        try:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"--profile {args.profile}: cannot make that folder ({err.strerror})") from None

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if out is not None:
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")

    peak_n = args.peak_n if args.peak_n is not None else (8192 if device.type == "cuda" else 2048)
    try:
        (bench_concurrent if args.concurrent else bench_modes)(args, base, device, peak_n, emit)
    finally:                                   # a failed worker must not keep the others waiting at the barrier
        if args.barrier:
            Path(args.barrier, f"ready-{os.getpid()}").touch()
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `bench` (train's run options, plus the timing options) to the CLI's subparsers."""
    p = subparsers.add_parser("bench", help="time the training step and sampling; one JSON line per measurement")
    add_run_options(p)
    p.set_defaults(steps=20, func=cmd_bench)             # --steps: timed steps per window
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    p.add_argument("--repeats", type=int, default=5, help="timed windows of --steps steps; the median is reported")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="also measure torch.compile(model), falling back to eager if it fails")
    p.add_argument("--channels-last", action="store_true", help="also measure channels_last weights")
    p.add_argument("--modes", help=f"comma-separated (eager is always measured first): {', '.join(MODES)}")
    p.add_argument("--compare-schedules", metavar="A,B,..", help="measure each schedule, e.g. cosine,learned; "
                                                                 "overhead_pct is against the first")
    p.add_argument("--sample", action=argparse.BooleanOptionalAction, help="measure DDIM sampling (default: yes)")
    p.add_argument("--sample-steps", type=int, help="DDIM steps of the sampling measurement (default 50)")
    p.add_argument("--sample-n", type=int, help="images per sampling call (default: the batch size)")
    p.add_argument("--concurrent", metavar="K,..", help="aggregate eager img/s of K processes at once, e.g. 1,2,4,8")
    p.add_argument("--peak-n", type=int, help="matmul size of the FLOP/s peak (default 8192 CUDA, 2048 CPU; 0: skip)")
    p.add_argument("--profile", metavar="DIR", help="also profile each training measurement (torch.profiler): "
                                                    "op tables in DIR, per-step ops, kernels and GPU-busy time")
    p.add_argument("--profile-steps", type=int, help="steps profiled per measurement (default 5)")
    p.add_argument("--out", help="also append the JSON lines to this FILE.jsonl (new, or of JSON lines; its folder "
                                 "must exist)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--barrier", help=argparse.SUPPRESS)
    p.add_argument("--barrier-n", type=int, default=1, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m adaptive_sched.bench ARGS` = `adaptive-sched bench ARGS` (the concurrency workers use it)."""
    from adaptive_sched.cli import main as cli_main
    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
