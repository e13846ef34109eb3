"""The `adaptive-sched` command: train, sample, export, schedules, compare, sweep, sampling-grid, bench.

Bad input exits 2 with one line."""
from __future__ import annotations

import argparse
import inspect
import os
import sys

from adaptive_sched import config as cfg
from adaptive_sched.errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by train (and compare's overrides): each overrides the TOML file when given."""
    p.add_argument("--config", help="TOML file with [data], [schedule], [weighting], [model], [train], [eval]")
    p.add_argument("--data", help="dataset: gmm, checkerboard, swissroll, digits, mnist5k, fashion-mnist, "
                                  "npz:PATH, folder:PATH, cifar10:PATH")
    p.add_argument("--data-dir", help="folder holding dataset files (also $ADAPTIVE_SCHED_DATA)")
    p.add_argument("--schedule", help="training schedule (see `adaptive-sched schedules`)")
    p.add_argument("--schedule-param", action="append", metavar="K=V", help="schedule parameter, repeatable")
    p.add_argument("--curriculum", action="append", metavar="P=START:END[:SHAPE]",
                   help="move schedule parameter P over training (shape linear, cosine or sinusoidal), repeatable")
    p.add_argument("--schedule-objective", help="learned schedules: variance (default), adaptive or cvdm")
    p.add_argument("--target", help="prediction target: eps, x0, v, flow")
    p.add_argument("--weighting", help="loss weighting (default: schedule)")
    p.add_argument("--weighting-param", action="append", metavar="K=V", help="weighting parameter, repeatable")
    p.add_argument("--model", help="denoiser: auto, mlp, unet")
    p.add_argument("--model-param", action="append", metavar="K=V", help="model option, repeatable")
    p.add_argument("--optimizer", help="adamw (default), adam, sgd, or a torch-optimizer name (lamb, ...)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--conditional", action="store_true", default=None,
                   help="class-conditional denoiser with classifier-free guidance (labelled data)")
    p.add_argument("--p-uncond", type=float, help="conditional: label dropout probability (default 0.1)")
    p.add_argument("--schedule-condition", help="learned schedules: none (default), class, or stats:K")


def resolve_config(args: argparse.Namespace) -> cfg.RunConfig:
    """Defaults, then the TOML file, then the CLI flags that were given."""
    config = cfg.load_toml(args.config) if args.config else cfg.RunConfig()
    overlay: dict[str, dict] = {}

    def put(section: str, key: str, value) -> None:
        if value is not None:
            overlay.setdefault(section, {})[key] = value

    put("data", "name", args.data)
    put("data", "data_dir", args.data_dir)
    put("schedule", "name", args.schedule)
    put("weighting", "name", args.weighting)
    put("learned", "objective", args.schedule_objective)
    put("learned", "condition", args.schedule_condition)
    put("train", "conditional", args.conditional)
    put("train", "p_uncond", args.p_uncond)
    put("train", "compile", getattr(args, "train_compile", None))     # train's --compile (bench has its own)
    put("train", "channels_last", getattr(args, "train_channels_last", None))
    put("train", "compile_mode", getattr(args, "train_compile_mode", None))
    if args.curriculum:
        put("schedule", "curriculum", {k: str(v) for k, v in cfg.parse_assignments(args.curriculum,
                                                                                   "--curriculum").items()})
    put("model", "name", args.model)
    for section, pairs, flag in (("schedule", args.schedule_param, "--schedule-param"),
                                 ("weighting", args.weighting_param, "--weighting-param"),
                                 ("model", args.model_param, "--model-param")):
        for key, value in cfg.parse_assignments(pairs, flag).items():
            put(section, key, value)
    for key in ("steps", "batch_size", "lr", "seed", "device", "checkpoint_every", "log_every", "optimizer", "target"):
        put("train", key, getattr(args, key))
    put("eval", "every", args.eval_every)
    return cfg.from_dict(overlay, config)


def refuse_ignored_options(args: argparse.Namespace, config: cfg.RunConfig, schedule_names: list[str]) -> None:
    """UsageError for a run option given on the command line that nothing would use: --schedule-objective when no
    schedule of the command (`schedule_names`) takes one, --p-uncond without --conditional, --schedule-condition
    when no schedule of the command can be conditioned."""
    from adaptive_sched.schedules import OBJECTIVE_SCHEDULES
    if args.schedule_objective is not None and not set(schedule_names) & set(OBJECTIVE_SCHEDULES):
        raise UsageError(f"--schedule-objective applies only to a learned schedule, not "
                         f"{', '.join(map(repr, schedule_names))}")
    if args.p_uncond is not None and not config.train.conditional:
        raise UsageError("--p-uncond applies only to a conditional run (add --conditional)")
    if args.schedule_condition not in (None, "none") and not set(schedule_names) & {"learned", "table"}:
        raise UsageError(f"--schedule-condition applies only to a learned schedule (or a table with a class column), "
                         f"not {', '.join(map(repr, schedule_names))}")


def cmd_train(args) -> int:
    from adaptive_sched.train import train
    config = resolve_config(args)
    refuse_ignored_options(args, config, [config.schedule.name])
    if not args.out:
        raise UsageError("train needs --out DIR (the run directory)")
    from adaptive_sched.run_checks import ineffective_settings, validate
    validate(config)                              # (a setting that is refused needs no warning first)
    if os.environ.get("RANK", "0") == "0":        # (run_build.build warns of an unsampled window, for every command)
        for line in ineffective_settings(config):
            print(f"warning: {line}", file=sys.stderr)
    final = train(config, args.out, resume=args.resume, progress=not args.quiet)
    shown = {k: final[k] for k in ("step", "loss", "eval_eps_mse", "eval_excess_mse", "eval_swd", "eval_fid",
                                   "eval_bpd") if k in final}
    if os.environ.get("RANK", "0") == "0":        # under torchrun, rank 0 speaks for the run
            print("done: " + ", ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    return 0


def cmd_sample(args) -> int:
    from adaptive_sched.sample_run import sample_run
    path = sample_run(args.run_dir, args.n, args.out, sampler=args.sampler, steps=args.sample_steps, grid=args.grid,
                      seed=args.seed, device=args.device, label=args.label, guidance=args.guidance,
                      clip_x0=args.clip_x0)
    print(f"wrote {path}")
    return 0


def cmd_schedules(args) -> int:
    from adaptive_sched import schedules
    for name, doc, params in schedules.describe():
        shown = ", ".join(f"{k}" if v is inspect.Parameter.empty else f"{k}={v}" for k, v in params.items())
        print(f"{name:13s} {shown}\n{'':13s} {doc}")
    return 0


def cmd_compare(args) -> int:
    from adaptive_sched.compare import compare, status
    if args.status:
        given = [flag for flag, value in (("--jobs", args.jobs), ("--time-budget", args.time_budget))
                 if value is not None]
        if given:
            raise UsageError(f"--status only counts finished runs; {', '.join(given)} would not be used")
        done, total = status(args.config_file, args.out)
        print(f"{done} of {total} runs finished" + (" (all)" if done == total else ""))
        return 0
    compare(args.config_file, args.out, progress=not args.quiet, jobs=args.jobs, time_budget=args.time_budget)
    return 0


def cmd_export(args) -> int:
    from adaptive_sched.export import export
    from adaptive_sched.out_paths import read_json_dict, sidecar_path
    path = export(args.run_dir, args.out, points=args.points, fmt=args.format, discrete_steps=args.alphas_cumprod)
    files = (read_json_dict(sidecar_path(path)) or {}).get("files") if path.suffix == ".csv" else None
    extra = f" (the marginal), {', '.join(files['classes'])} and {files['class_table']}" if files else ""
    print(f"wrote {path}{extra}")
    return 0


def make_parser() -> Parser:
    parser = Parser(prog="adaptive-sched", description="Noise schedules for diffusion training over logSNR.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("train", help="train a denoiser with one schedule")
    add_run_options(p)
    p.add_argument("--out", help="run directory (metrics.csv, config.toml, checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--compile", dest="train_compile", action="store_true", default=None,
                   help="torch.compile the loss (a learned schedule's network, the weighting and the denoiser); eager "
                        "with a warning if that fails")
    p.add_argument("--channels-last", dest="train_channels_last", action="store_true", default=None,
                   help="keep the image denoiser's weights in channels_last (NHWC): no cudnn layout transposes")
    p.add_argument("--compile-mode", dest="train_compile_mode", choices=cfg.COMPILE_MODES, default=None,
                   help="with --compile: reduce-overhead replays each step as CUDA graphs (one process only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample from a trained run (EMA weights)")
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--out", required=True, help="FILE.npz or FILE.png (an existing one only if `sample` wrote it)")
    p.add_argument("--sampler", help="ddim, euler, heun, dpmpp-2m (default: the run's [eval] sampler)")
    p.add_argument("--sample-steps", type=int, help="number of sampler steps (default: the run's)")
    p.add_argument("--grid", help="schedule whose λ(t) spaces the sampling grid (default: the run's, cosine), "
                                        "a grid FILE.csv written by sampling-grid, or per-class (each class on "
                                        "its own learned schedule's grid)")
    p.add_argument("--class", dest="label", metavar="K", help="conditional runs: all (default, balanced), none "
                                                                "(unconditional branch) or one class K")
    p.add_argument("--guidance", type=float, metavar="W", help="classifier-free guidance scale (default: the run's "
                                                                 "first [eval] guidance, 1 = conditional)")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                   help="clamp x̂0 to the pixel range [-1, 1] at every step (default: the run's [eval] clip_x0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="write a run's (learned) schedule as a table: t, logsnr, density, alpha, sigma")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="FILE.csv (plus FILE.csv.json provenance) or FILE.json (an existing "
                                                "one only if it is an earlier export, whose other files go)")
    p.add_argument("--points", type=int, default=1001, help="number of t points, endpoints included")
    p.add_argument("--format", choices=["csv", "json"], help="default: from the file suffix")
    p.add_argument("--alphas-cumprod", type=int, metavar="K", help="also write diffusers-style alphas_cumprod "
                                                                   "for K discrete steps into the JSON")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("schedules", help="list the schedules with their parameters and defaults")
    p.set_defaults(func=cmd_schedules)

    p = sub.add_parser("compare", help="train a grid of schedules x seeds from a TOML file; tables and plots")
    p.add_argument("config_file", metavar="CONFIG.toml")
    p.add_argument("--out", required=True, help="output directory (resumable: finished runs are skipped)")
    p.add_argument("--jobs", type=int, help="runs at once as separate processes (default: [compare] jobs, 1)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="start no run after this many seconds (runs going finish; the same command starts the rest)")
    p.add_argument("--status", action="store_true", help="only print how many runs are finished")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compare)

    from adaptive_sched import grid_cli, grid_eval
    from adaptive_sched.bench import add_parser as add_bench_parser   # torch loads only when bench runs
    from adaptive_sched.sweep import add_parser as add_sweep_parser
    grid_cli.add_parser(sub)
    grid_eval.add_parser(sub)
    add_sweep_parser(sub)
    add_bench_parser(sub)
    return parser


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` says the host or the GPU ran out of memory (MemoryError, torch.OutOfMemoryError, or torch's
    CPU allocator refusing), rather than a bug."""
    text = str(err)
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or any(
        sign in text for sign in ("can't allocate memory", "CUDA out of memory", "CUDA error: out of memory",
                                  "CUBLAS_STATUS_ALLOC_FAILED"))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input or out of memory, 130 interrupted)."""
    try:
        args = make_parser().parse_args(argv)
        status = args.func(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        status = 2
    except BrokenPipeError:      # output piped into `head` and the like
        status = 0
    except OSError as err:       # a path the checks before the work could not foresee (permissions, a full disk)
        print(f"error: {err}", file=sys.stderr)
        status = 2
    except (MemoryError, RuntimeError) as err:
        if not out_of_memory(err):
            raise                # anything else is a bug: keep its traceback
        first = (str(err).strip().splitlines() or ["no memory left"])[0]
        print(f"error: out of memory ({first[:200]}): ask for less (a smaller batch_size or model, fewer samples: "
              f"--n, --points, [eval] n / sample_n / bpd_n), or free the device", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; rerun with --resume to continue", file=sys.stderr)
        status = 130
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and argv is None:
        # A torchrun rank: leave without interpreter finalisation, where torch's process-group threads
        # intermittently abort ("terminate called without an active exception") after the work is done.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
