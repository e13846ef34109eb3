"""`bench --profile DIR`: where the time of one training step goes (torch.profiler), beside bench's timing.

For each measurement it profiles a few more train_steps and writes DIR/<mode>-<schedule>-b<batch>.txt, the
profiler's op tables (by device time on a GPU, by CPU time), and adds to the JSON line, per step:
  profile_aten_ops    dispatcher ops issued from the host (eager work outside any compiled graph, plus the
                      extern kernels a compiled graph calls): the launch overhead a step pays;
  profile_kernels     device kernels and copies launched (CUDA only; not the profiler's annotation ranges,
                      which span whole regions on the GPU timeline);
  profile_gpu_busy_ms their summed duration (kernels on one stream do not overlap; on several it is an upper
                      bound); against profile_step_ms (wall time under the profiler, a little above step_ms) it
                      says whether the step is bound by the GPU or by the host.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from adaptive_sched.atomic import atomic_write_text

if TYPE_CHECKING:
    from adaptive_sched.run_build import Run


def is_host_op(event) -> bool:
    """An aten op called from outside any other aten op (not one that an op dispatches internally)."""
    parent = event.cpu_parent
    return event.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::"))


def is_device_work(event) -> bool:
    """A kernel or copy on the GPU, not a user annotation (record_function ranges mirrored onto the GPU timeline)."""
    from torch.autograd import DeviceType
    return event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)


def take_steps(run: Run, steps, running, mark_step: bool = False) -> None:
    """train_step for each step number in `steps`; with CUDA graphs (`mark_step`) each begins a new iteration."""
    import torch
    from adaptive_sched.train import train_step
    for step in steps:
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        train_step(run, step, running)


def profile_steps(run: Run, steps: int, path: Path, mark_step: bool = False) -> dict:
    """Profile `steps` train_steps of `run` (CPU ops, and CUDA kernels on a GPU); write the op tables to `path`;
    return the per-step summary fields (see the module docstring)."""
    import time
    from torch.profiler import ProfilerActivity, profile, record_function
    from adaptive_sched.compiling import sync
    from adaptive_sched.train import new_running
    cuda = run.device.type == "cuda"
    running = new_running(run.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(run.device)
    with profile(activities=activities) as prof:
        began = time.perf_counter()
        for step in range(steps):
            with record_function("train_step"):
                take_steps(run, [10_000 + step], running, mark_step)
        sync(run.device)
        wall = time.perf_counter() - began
    events = prof.events()
    kernels = [e for e in events if is_device_work(e)]
    fields = {"profile_steps": steps, "profile_step_ms": round(1e3 * wall / steps, 3),
              "profile_aten_ops": round(sum(map(is_host_op, events)) / steps, 1)}
    if cuda:
        busy_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / steps
        fields.update(profile_kernels=round(len(kernels) / steps, 1), profile_gpu_busy_ms=round(busy_ms, 3))
    table = prof.key_averages()
    header = (f"{steps} profiled training steps; per step: " + ", ".join(f"{k[8:]} {v}" for k, v in fields.items()
                                                                         if k != "profile_steps"))
    text = [header, ""]
    if cuda:
        text += ["== by device time", table.table(sort_by="self_device_time_total", row_limit=30), ""]
    text += ["== by CPU time", table.table(sort_by="self_cpu_time_total", row_limit=30)]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(text) + "\n")
    return fields
