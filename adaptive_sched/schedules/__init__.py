"""Noise schedules as densities over logSNR: `build(name, **params)`, `names()`, `describe()`.

Every schedule has logsnr(t), t_of(logsnr), density(logsnr), log_density(logsnr), sample(n, ...),
and the window parameters logsnr_min, logsnr_max (exact truncation, never a clamp).
"""
from __future__ import annotations

import difflib
import inspect
from typing import Callable

from adaptive_sched.config import suggest
from adaptive_sched.errors import UsageError
from adaptive_sched.schedules.base import DEFAULT_LOGSNR_MAX, DEFAULT_LOGSNR_MIN, Schedule
from adaptive_sched.schedules.fixed import (EDM, Cauchy, Cosine, Flow, Laplace, Linear, Logistic, LogitNormal,
                                            Normal, Uniform)
from adaptive_sched.schedules.binned import BinnedAdaptiveSchedule
from adaptive_sched.schedules.learned import LearnedSchedule
from adaptive_sched.schedules.polynomial import Polynomial
from adaptive_sched.schedules.table import Table, read_table, write_table

SCHEDULES: dict[str, Callable[..., Schedule]] = {
    cls.name: cls for cls in (Cosine, Laplace, Cauchy, Normal, EDM, LogitNormal, Logistic, Flow, Linear, Uniform, Polynomial, Table,
                                       LearnedSchedule, BinnedAdaptiveSchedule)
}


def names() -> list[str]:
    """Registered schedule names."""
    return list(SCHEDULES)


def parameters(name: str) -> dict[str, object]:
    """Keyword parameters of schedule `name` with their defaults (inspect.Parameter.empty when required)."""
    factory = lookup(name)
    sig = inspect.signature(factory)
    return {p.name: p.default for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("t", "logsnr")}


def lookup(name: str) -> Callable[..., Schedule]:
    """The factory for `name`, or UsageError listing the valid names."""
    try:
        return SCHEDULES[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(SCHEDULES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown schedule {name!r}{hint}; choose one of: {', '.join(SCHEDULES)}") from None


def build(name: str, **params) -> Schedule:
    """Build schedule `name` with keyword parameters; unknown parameters raise UsageError listing valid ones."""
    factory = lookup(name)
    valid = parameters(name)
    unknown = [k for k in params if k not in valid]
    if unknown:
        raise UsageError(f"schedule {name!r} has no parameter {unknown[0]!r}{suggest(unknown[0], list(valid))}; "
                         f"its parameters are: {', '.join(valid)}")
    return factory(**params)


OBJECTIVE_SCHEDULES = ("learned",)    # the schedules that take [learned] objective (adaptive_binned's is fixed)


def is_learned(schedule) -> bool:
    """True for schedules with trainable parameters (they expose logsnr_and_slope)."""
    return hasattr(schedule, "logsnr_and_slope")


def describe() -> list[tuple[str, str, dict]]:
    """(name, one-line description, parameters with defaults) for every registered schedule."""
    rows = []
    for name, factory in SCHEDULES.items():
        doc = (inspect.getdoc(factory) or "").splitlines()[0]
        rows.append((name, doc, parameters(name)))
    return rows


__all__ = ["Schedule", "SCHEDULES", "build", "names", "parameters", "describe", "lookup", "Table", "read_table",
           "write_table", "LearnedSchedule", "is_learned", "DEFAULT_LOGSNR_MIN", "DEFAULT_LOGSNR_MAX"]
