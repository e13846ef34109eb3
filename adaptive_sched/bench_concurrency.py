"""`bench --concurrent K,...`: K bench worker processes on one device, timed over the same moment.

Each worker is `python -m adaptive_sched.bench ... --barrier DIR --barrier-n K`: after warm-up it waits at a
file barrier so the timed windows overlap; the aggregate img/s is all images over the union of the windows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from adaptive_sched import config as cfg

if TYPE_CHECKING:
    import torch


def wait_barrier(folder: str, n: int, timeout: float = 900.0) -> None:
    """Mark this process ready in `folder`, then wait until `n` processes are, or `timeout` s have passed."""
    Path(folder, f"ready-{os.getpid()}").touch()
    end = time.monotonic() + timeout
    while len(list(Path(folder).glob("ready-*"))) < n and time.monotonic() < end:
        time.sleep(0.005)


def bench_concurrent(args: argparse.Namespace, base: cfg.RunConfig, device: torch.device, peak_n: int,
                     emit: Callable[[dict], None]) -> None:
    """Aggregate eager img/s of K bench processes (seeds seed .. seed+K-1) timing at the same time, for each K."""
    from adaptive_sched import bench
    from adaptive_sched.jobs import child_env
    env = child_env()
    for k in bench.parse_list(args.concurrent, int):
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "config.toml").write_text(cfg.dumps_toml(base.to_dict()))
            Path(folder, "barrier").mkdir()
            procs = [subprocess.Popen(
                [sys.executable, "-m", "adaptive_sched.bench", "--config", str(Path(folder, "config.toml")),
                 "--seed", str(base.train.seed + i), "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--repeats", str(args.repeats), "--modes", "eager", "--no-sample", "--peak-n", "0", "--quiet",
                 "--barrier", str(Path(folder, "barrier")), "--barrier-n", str(k)],
                stdout=subprocess.PIPE, text=True, env=env) for i in range(k)]
            outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(f"{sum(bool(p.returncode) for p in procs)} of {k} bench workers failed (see stderr)")
        rows = [json.loads(out.splitlines()[-1]) for out in outs]
        images = sum(r["batch_size"] * r["steps"] * r["repeats"] for r in rows)
        agg = round(images / (max(r["t_end"] for r in rows) - min(r["t_start"] for r in rows)), 1)
        peak = bench.matmul_peak(device, peak_n) if peak_n > 0 else None
        drop = {"seed", "step_ms", "img_s", "step_ms_windows", "loss", "skipped_steps", "t_start", "t_end",
                "peak_mem_mb"}
        emit({**{key: v for key, v in rows[0].items() if key not in drop}, "measure": "concurrent", "workers": k,
              "img_s": agg, "img_s_sum": round(sum(r["img_s"] for r in rows), 1),
              "img_s_each": [r["img_s"] for r in rows], "step_ms_each": [r["step_ms"] for r in rows],
              "peak_mem_mb_each": [r["peak_mem_mb"] for r in rows], "peak_flops": peak and round(peak),
              "mfu": bench.mfu(rows[0]["flops_per_image"] * agg, peak)})
