"""torch.compile for a training run: the loss's `core` compiled whole, i.e. a learned schedule's λ_φ(t) and slope,
the weighting, the denoiser's forward and the variance objective's gradient hooks in one graph (and one backward).

Compiling the denoiser alone left a learned schedule's ~270 small eager ops per step outside the graph (+26% step
time against cosine on an H200 at batch 512, against +1.7% eager); compiling the schedule network separately cut
that to +4.3% (results/bench/2026-11-26-NVIDIA-H200.jsonl), the rest being host work around two compiled graphs
(their calls and backward nodes, -log(-slope), the weighting, the hooks). One graph for all of it removes most of
that (on a CPU-bound tiny model: the learned step's extra host time from ~0.7 ms to ~0.25 ms). The randomness
(t or λ, ε) is drawn eagerly from the step's generator first, so compiled and eager steps draw the same numbers.
A torch that cannot trace the hooks (probed once: `traces_intermediate_hooks`) gets the schedule and denoiser parts
compiled separately, with the hooks registered eagerly between them, where they see the whole gradient; a loss
without hooks (fixed schedules, the adaptive and cvdm objectives) is compiled whole on any torch.

`train` with `[train] compile = true` (`--compile`) takes its first step through `first_compiled_step`: a
compilation error there sends the run back to eager with a warning (torch 2.11 crashed compiling our U-Net at
batch 512 on an H100); a device error that poisons the CUDA context stops it with a one-line message instead.
"""
from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING

from adaptive_sched.errors import UsageError

if TYPE_CHECKING:
    import torch
    from adaptive_sched.run_build import Run


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA only; CPU work is done when the call returns)."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_ok(device: torch.device) -> bool:
    """Whether the device still works (a sticky CUDA error poisons the whole process)."""
    import torch
    try:
        sync(device)
        return bool(torch.ones(1, device=device).sum() == 1)
    except Exception:          # noqa: BLE001 - whatever the error, the device is unusable
        return False


def error_line(err: BaseException) -> str:
    """`Type: first line` of the innermost cause of an exception."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [s.strip() for s in str(err).splitlines() if s.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def traces_intermediate_hooks() -> bool:
    """Whether this torch compiles a gradient hook on an intermediate tensor into the graph (torch 2.13 does).
    Older ones break the graph there (or refuse), and a hook registered after the break would miss the gradient
    that flows inside the compiled graph: a silently wrong variance objective. Probed once per torch.compile."""
    import torch
    return probe_hooks(torch.compile)


@functools.lru_cache(maxsize=None)
def probe_hooks(compile_fn) -> bool:
    """traces_intermediate_hooks for one torch.compile (a test may replace it), with the aot_eager backend."""
    import torch

    def probe(x):
        y = x * 2.0
        factor = y.detach() + 1.0
        y.register_hook(lambda grad: grad * factor)
        return (y * y).sum()

    x = torch.ones(3, requires_grad=True)
    try:
        compile_fn(probe, backend="aot_eager", fullgraph=True)(x).backward()
    except Exception:                              # noqa: BLE001 - unsupported, in whatever way
        return False
    return bool(torch.equal(x.grad, torch.full((3,), 24.0)))     # dy = 2y·(y + 1) = 12, dx = 2·dy


def cuda_graphs(mode: str | None, device: torch.device) -> bool:
    """Whether torch.compile's `mode` replays CUDA graphs on `device`; each training step must then begin a new
    graph iteration (torch.compiler.cudagraph_mark_step_begin) before it reads the previous step's outputs."""
    return mode == "reduce-overhead" and device.type == "cuda"


def compile_run(run: Run, mode: str = "default") -> None:
    """Make train_step call a torch.compile'd `run.loss.core` (as `run.loss.core_fn`): whole, unless the loss uses the
    variance hooks and torch cannot trace them; then its schedule and denoiser parts are compiled separately with the
    hooks between them, eager. With hooks also in parts under DDP, whose forward breaks the graph: the hooks must
    not depend on where dynamo resumes (with nested graph breaks a whole core's λ would feed the noise inside the
    first graph, out of the hooks' reach). Without hooks a graph break is harmless. Compiled on first use."""
    import torch
    whole = not run.loss.uses_gradient_hooks or (traces_intermediate_hooks() and not run.world.enabled and
                                                 not getattr(torch._dynamo.config, "nested_graph_breaks", False))
    torch._dynamo.reset()      # one run per process at a time: a fresh cache, never dynamo's recompile limit
    if whole:
        run.loss.core_fn = torch.compile(run.loss.core, mode=mode)
    else:
        parts = (torch.compile(run.loss.schedule_part, mode=mode), torch.compile(run.loss.denoiser_part, mode=mode))
        run.loss.core_fn = functools.partial(run.loss.core, parts=parts)


def uncompile_run(run: Run) -> None:
    """Back to the eager loss (after a compiled step failed)."""
    run.loss.core_fn = None


def first_compiled_step(run: Run, step: int, running: torch.Tensor) -> float:
    """train_step(run, step, running) with the run compiled, then a device sync so that an asynchronous kernel
    error surfaces here. If the step failed (compiling, forward or the lazily compiled backward) and the device
    still works: warn, go eager and take the same step again (its noise comes from its own generator; the one
    thing the step changed before backward, an `adaptive` loss histogram, is restored first). If the device is
    broken: UsageError (the run resumes from its last checkpoint)."""
    from adaptive_sched.train import train_step
    histogram = run.loss.histogram
    saved = None if histogram is None else {k: v.clone() for k, v in histogram.state_dict().items()}
    try:
        lr = train_step(run, step, running)
    except UsageError:
        raise
    except Exception as err:                       # noqa: BLE001 - any failure of the compiled path
        if not device_ok(run.device):
            raise broken_device(run, err) from None
        print(f"warning: torch.compile failed, training eagerly: {error_line(err)}", file=sys.stderr)
        uncompile_run(run)
        run.optimizer.zero_grad(set_to_none=True)
        if saved is not None:
            histogram.load_state_dict(saved)
        return train_step(run, step, running)
    try:
        sync(run.device)                           # the step was taken: an error now is the device's, not retaken
    except Exception as err:                       # noqa: BLE001
        raise broken_device(run, err) from None
    return lr


def broken_device(run: Run, err: BaseException) -> UsageError:
    """The one-line error for a compiled step that left the device unusable."""
    return UsageError(f"the compiled step broke the {run.device.type} device ({error_line(err)}); run again "
                      f"without compile (`compile = false`): the run resumes from its last checkpoint")
