"""Dynamic schedules: a fixed schedule whose parameters move over training, driven by the step counter.

`--curriculum b=0.3:1.5:cosine` moves laplace's b from 0.3 at step 0 to 1.5 at the last step. With
progress p = step / (steps − 1) ∈ [0, 1], the value is start + (end − start)·g(p) with
    linear      g(p) = p
    cosine      g(p) = (1 − cos πp) / 2                 (slow at both ends)
    sinusoidal  g(p) = sin(πp / 2)                      (fast early, flat late: the ease-out sine of
                                                         Gokmen et al. 2024's sinusoidal curriculum, which
                                                         they apply to discretisation steps, not to p(λ))
The schedule at a step depends only on (step, steps), so a resumed run replays it exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from adaptive_sched.errors import UsageError

SHAPES = {
    "linear": lambda p: p,
    "cosine": lambda p: 0.5 * (1.0 - math.cos(math.pi * p)),
    "sinusoidal": lambda p: math.sin(0.5 * math.pi * p),
}


@dataclass(frozen=True)
class Ramp:
    """One parameter's path: start → end along `shape`."""

    start: float
    end: float
    shape: str = "linear"

    def value(self, progress: float) -> float:
        """start + (end − start)·g(progress), progress clamped to [0, 1]."""
        p = min(1.0, max(0.0, progress))
        return self.start + (self.end - self.start) * SHAPES[self.shape](p)


def parse_ramp(param: str, spec) -> Ramp:
    """'START:END[:SHAPE]' (or a [start, end, shape] list from TOML) → Ramp; bad specs are a UsageError."""
    parts = spec.split(":") if isinstance(spec, str) else list(spec) if isinstance(spec, (list, tuple)) else None
    if parts is None or len(parts) not in (2, 3):
        raise UsageError(f"curriculum {param}={spec!r} must look like START:END or START:END:SHAPE, "
                         f"e.g. {param}=0.3:1.5:cosine")
    try:
        start, end = float(parts[0]), float(parts[1])
    except (TypeError, ValueError):
        raise UsageError(f"curriculum {param}={spec!r}: START and END must be numbers") from None
    if not (math.isfinite(start) and math.isfinite(end)):
        raise UsageError(f"curriculum {param}={spec!r}: START and END must be finite")
    shape = str(parts[2]) if len(parts) == 3 else "linear"
    if shape not in SHAPES:
        raise UsageError(f"curriculum {param}: unknown shape {shape!r}; choose one of: {', '.join(SHAPES)}")
    return Ramp(start, end, shape)


def parse(curriculum: dict) -> dict[str, Ramp]:
    """{param: spec} → {param: Ramp}."""
    if not isinstance(curriculum, dict):
        raise UsageError("[schedule] curriculum must be a table of PARAM = \"START:END[:SHAPE]\"")
    return {param: parse_ramp(param, spec) for param, spec in curriculum.items()}


def progress(step: int, steps: int) -> float:
    """p = step / (steps − 1): 0 at the first step, 1 at the last."""
    return 0.0 if steps <= 1 else step / (steps - 1)


def values_at(ramps: dict[str, Ramp], step: int, steps: int) -> dict[str, float]:
    """Every ramped parameter's value at `step` of `steps`."""
    p = progress(step, steps)
    return {param: ramp.value(p) for param, ramp in ramps.items()}


def validate(name: str, fixed: dict, ramps: dict[str, Ramp], build) -> None:
    """Refuse a curriculum on a learned schedule or an unknown parameter, or on one `fixed` also gives; build both
    ends to check values."""
    from adaptive_sched import schedules
    if not ramps:
        return
    defaults = schedules.parameters(name)
    valid = [k for k in defaults if k not in ("logsnr_min", "logsnr_max")]
    for param in ramps:
        if param not in valid:
            raise UsageError(f"curriculum: {name} has no parameter {param!r}; its parameters: "
                             f"{', '.join(valid) or 'none'}")
        if isinstance(defaults[param], int) and not isinstance(defaults[param], bool):
            raise UsageError(f"curriculum: {name} {param} takes whole numbers, which a ramp passes between; "
                             f"give it a value instead")
        if param in fixed:
            raise UsageError(f"{name} {param} is given both as a value ({fixed[param]!r}) and by a curriculum "
                             f"({ramps[param].start}:{ramps[param].end}:{ramps[param].shape}); the curriculum sets it at every "
                             f"step, so drop one")
    for p in (0.0, 0.5, 1.0):
        build({**fixed, **{k: r.value(p) for k, r in ramps.items()}})
