"""Search spaces of `adaptive-sched sweep`: per-schedule parameter ranges in code, overridable from TOML.

A sweep TOML file is a run config (see adaptive_sched.config) plus an optional [sweep] section:
    [sweep]
    trials = 30
    metric = "eval_eps_mse"        # any eval_* column of metrics.csv; lower is better
    pruner = "median"              # median | hyperband | none (the default with a target)
    target = 0.05                  # optional: a second objective, steps to target (see below)
    tune = ["lr"]                  # also tune these: lr (log-uniform), weighting (categorical)
    [sweep.space]                  # override or add ranges; keys are the schedule's parameters, lr, weighting
    b = { low = 0.2, high = 2, log = true }
    weighting = { choices = ["schedule", "min-snr"] }
A parameter set in [schedule] (or by --schedule-param) is fixed and left out of the default space.
`target` (or --target-value) makes the study multi-objective: the metric at the budget and the first eval step at
which the metric is <= target (steps + eval.every when not reached within the budget), both minimised; Optuna
cannot prune such trials, so pruner must be none or left out (see adaptive_sched.sweep_pareto).
The schedule and weighting registries (torch) are imported where used, so the CLI's parser stays light.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from adaptive_sched import config as cfg
from adaptive_sched.errors import UsageError


@dataclass(frozen=True)
class Dim:
    """One tuned parameter: a float range (uniform, or log-uniform when `log`) or a tuple of choices."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial, name: str):
        """Draw this parameter for an Optuna trial."""
        if self.choices:
            return trial.suggest_categorical(name, list(self.choices))
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def describe(self) -> str:
        """'[0.1, 4] log' or '{a, b}'."""
        if self.choices:
            return "{" + ", ".join(map(str, self.choices)) + "}"
        return f"[{self.low:g}, {self.high:g}]" + (" log" if self.log else "")

    def to_dict(self) -> dict:
        """The TOML/JSON form, as written in [sweep.space]."""
        return {"choices": list(self.choices)} if self.choices else {"low": self.low, "high": self.high,
                                                                     "log": self.log}


# Ranges in λ = logSNR units: locations in [−4, 4], widths log-uniform over about a decade and a half.
# edm and logit_normal are normals in their native units (λ = −2 ln σ, λ = −2 logit t), so their ranges are
# the normal's halved.
SPACES: dict[str, dict[str, Dim]] = {
    "laplace": {"mu": Dim(-4.0, 4.0), "b": Dim(0.1, 4.0, log=True)},
    "cauchy": {"mu": Dim(-4.0, 4.0), "gamma": Dim(0.1, 4.0, log=True)},
    "cosine": {"shift": Dim(-4.0, 4.0), "scale": Dim(0.25, 4.0, log=True)},
    "normal": {"mean": Dim(-4.0, 4.0), "std": Dim(0.2, 4.0, log=True)},
    "edm": {"p_mean": Dim(-2.0, 2.0), "p_std": Dim(0.1, 2.0, log=True)},
    "logit_normal": {"m": Dim(-2.0, 2.0), "s": Dim(0.1, 2.0, log=True)},
    "logistic": {"mu": Dim(-4.0, 4.0), "scale": Dim(0.1, 4.0, log=True)},
}
# Optional extras (`tune`): the learning rate and the loss weighting.
EXTRAS: dict[str, Dim] = {
    "lr": Dim(1e-4, 1e-2, log=True),
    "weighting": Dim(choices=("schedule", "eps", "v", "min-snr", "soft-min-snr", "sigmoid", "edm")),
}
SWEEP_KEYS = ("trials", "metric", "pruner", "target", "tune", "space")
DIM_KEYS = ("low", "high", "log", "choices")


def sweepable() -> list[str]:
    """Schedules that have a search space."""
    return list(SPACES)


def parse_dim(key: str, spec, default: Dim | None = None) -> Dim:
    """A [sweep.space] entry ({low, high, log} or {choices}) over `default`; bad entries raise UsageError."""
    if not isinstance(spec, dict):
        raise UsageError(f"[sweep.space] {key} must be a table such as {{ low = 0.1, high = 4, log = true }} "
                         f"or {{ choices = [...] }}, got {spec!r}")
    for name in spec:
        if name not in DIM_KEYS:
            raise UsageError(f"unknown key {name!r} in [sweep.space] {key}{cfg.suggest(name, list(DIM_KEYS))}; "
                             f"valid keys: {', '.join(DIM_KEYS)}")
    if key == "weighting" or "choices" in spec:
        from adaptive_sched import weighting
        choices = spec.get("choices", list(default.choices) if default else [])
        if key != "weighting" or set(spec) - {"choices"} or not isinstance(choices, list) or not choices:
            raise UsageError(f"[sweep.space] {key}: only weighting takes choices, as a non-empty list of names")
        for name in choices:
            weighting.build(name)                       # unknown weighting → UsageError with a suggestion
        return Dim(choices=tuple(choices))
    merged = {**(default.to_dict() if default else {"log": False}), **spec}
    low, high, log = merged.get("low"), merged.get("high"), merged.get("log")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high))
    if not numbers or not isinstance(log, bool) or not low < high or (log and low <= 0):
        raise UsageError(f"[sweep.space] {key} needs finite numbers low < high (low > 0 when log = true), "
                         f"got {spec!r}")
    return Dim(float(low), float(high), log)


def build_space(schedule: str, tune: list[str] | tuple = (), overrides: dict | None = None,
                fixed: dict | None = None, curriculum: dict | None = None) -> dict[str, Dim]:
    """The search space of `schedule`: its default ranges minus `fixed` params, plus `tune` extras and overrides.

    With a curriculum in the base config, "P.start" and "P.end" (quoted TOML keys in [sweep.space]) tune the
    START and END of parameter P's ramp; P then leaves the plain space (its value is the ramp's).
    """
    ramped = set(curriculum or {})
    fixed = {**(fixed or {}), **{p: None for p in ramped}}
    from adaptive_sched import schedules
    schedules.lookup(schedule)                          # an unknown name gets the registry's suggestion
    if schedule not in SPACES and not overrides:
        raise UsageError(f"schedule {schedule!r} has no search space in code; give its ranges in [sweep.space], "
                         f"or sweep one of: {', '.join(SPACES)}")
    space = {k: v for k, v in SPACES.get(schedule, {}).items() if k not in (fixed or {})}
    for param in sorted(ramped):                        # a ramped parameter: tune its START and END
        if param in SPACES.get(schedule, {}):
            space[f"{param}.start"] = space[f"{param}.end"] = SPACES[schedule][param]
    for name in tune:
        if name not in EXTRAS:
            raise UsageError(f"cannot tune {name!r}{cfg.suggest(str(name), list(EXTRAS))}; "
                             f"extras: {', '.join(EXTRAS)}")
        space[name] = EXTRAS[name]
    valid = [k for k in schedules.parameters(schedule)] + list(EXTRAS) + \
        [f"{p}.{end}" for p in sorted(ramped) for end in ("start", "end")]
    for key, spec in (overrides or {}).items():
        if key not in valid:
            raise UsageError(f"unknown key {key!r} in [sweep.space]{cfg.suggest(key, valid)}; "
                             f"the {schedule} schedule's keys: {', '.join(valid)}")
        if key in (fixed or {}):
            raise UsageError(f"{key} is fixed by [schedule] or --schedule-param and also has a range in "
                             f"[sweep.space]; drop one of them")
        default = SPACES.get(schedule, {}).get(key.split(".")[0], EXTRAS.get(key))
        space[key] = parse_dim(key, spec, space.get(key, default))
    if not space:
        raise UsageError(f"nothing to tune: every parameter of {schedule} is fixed by [schedule] or --schedule-param")
    check_endpoints(schedule, space, {k: v for k, v in fixed.items() if k not in ramped})
    return space


def check_endpoints(schedule: str, space: dict[str, Dim], fixed: dict) -> None:
    """Refuse ranges whose ends the schedule rejects (e.g. b = 0) before any trial runs."""
    from adaptive_sched import schedules
    for key, dim in space.items():
        if key in EXTRAS or dim.choices:
            continue
        for value in (dim.low, dim.high):
            try:
                schedules.build(schedule, **{**fixed, key.split(".")[0]: value})
            except UsageError as err:
                raise UsageError(f"[sweep.space] {key} = {value:g} is not a valid {schedule} parameter: {err}") \
                    from None


def describe(space: dict[str, Dim]) -> str:
    """'mu∈[-4, 4], b∈[0.1, 4] log'."""
    return ", ".join(f"{k}∈{d.describe()}" for k, d in space.items())


# A best value this close to a bound (a fraction of the range, in log space for a log-uniform one) may sit where the
# range cut the search short. 0.1, not 0.05: the digits Laplace study's best b = 0.124 in [0.1, 4] log is 5.8% in.
EDGE = 0.1


def edge_warnings(params: dict, space: dict[str, Dim], within: float = EDGE) -> list[str]:
    """'b = 0.124 is at the low edge of its range [0.1, 4] log: widen the range' for each float parameter of a
    trial within `within` of its range's width (in log space for a log-uniform range) of a bound."""
    warnings = []
    for key, dim in space.items():
        value = params.get(key)
        if dim.choices or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        scale = math.log if dim.log else float
        width = scale(dim.high) - scale(dim.low)
        for side, gap in (("low", scale(value) - scale(dim.low)), ("high", scale(dim.high) - scale(value))):
            if gap <= within * width:
                warnings.append(f"{key} = {value:.3g} is at the {side} edge of its range {dim.describe()}: "
                                f"widen the range ([sweep.space] {key})")
    return warnings


def suggest(trial, space: dict[str, Dim]) -> dict:
    """Draw every parameter of `space` for an Optuna trial, in the space's order."""
    return {name: dim.suggest(trial, name) for name, dim in space.items()}


def trial_config(base: cfg.RunConfig, params: dict) -> cfg.RunConfig:
    """`base` with the trial's schedule parameters, and its lr and weighting when tuned."""
    overlay: dict[str, dict] = {"schedule": {k: v for k, v in params.items() if k not in EXTRAS and "." not in k}}
    ramps = {k: v for k, v in params.items() if "." in k}
    if ramps:
        curriculum = dict(base.schedule.curriculum)
        for param in {k.split(".")[0] for k in ramps}:
            spec = str(curriculum[param]).split(":")
            start = ramps.get(f"{param}.start", spec[0])
            end = ramps.get(f"{param}.end", spec[1])
            curriculum[param] = ":".join([str(start), str(end)] + spec[2:])
        overlay["schedule"]["curriculum"] = curriculum
    if "lr" in params:
        overlay["train"] = {"lr": params["lr"]}
    if "weighting" in params:
        overlay["weighting"] = {"name": params["weighting"]}
    return cfg.from_dict(overlay, copy.deepcopy(base))


def schedule_table(config: cfg.RunConfig) -> dict:
    """The [schedule] section of `config` with every default filled in (the full resolved parameter set); a ramped
    parameter is given by its curriculum, not by a value."""
    from adaptive_sched import schedules
    s = config.schedule
    defaults = {k: v for k, v in schedules.parameters(s.name).items()
                if k not in ("logsnr_min", "logsnr_max") and isinstance(v, (int, float, str))}
    fixed = {k: v for k, v in {**defaults, **s.params}.items() if k not in s.curriculum}
    return {"name": s.name, "logsnr_min": s.logsnr_min, "logsnr_max": s.logsnr_max, **fixed,
            **({"curriculum": dict(s.curriculum)} if s.curriculum else {})}


def split_config(raw: dict) -> tuple[dict, dict]:
    """(run config sections, validated [sweep] section) of a parsed sweep TOML file."""
    raw = dict(raw)
    section = raw.pop("sweep", {})
    if not isinstance(section, dict):
        raise UsageError("[sweep] must be a table of keys")
    for key in section:
        if key not in SWEEP_KEYS:
            raise UsageError(f"unknown key {key!r} in [sweep]{cfg.suggest(key, list(SWEEP_KEYS))}; "
                             f"valid keys: {', '.join(SWEEP_KEYS)}")
    if "trials" in section and (not isinstance(section["trials"], int) or section["trials"] < 1):
        raise UsageError(f"[sweep] trials must be an integer >= 1, got {section['trials']!r}")
    for key in ("metric", "pruner"):
        if key in section and not isinstance(section[key], str):
            raise UsageError(f"[sweep] {key} must be a string, got {section[key]!r}")
    target = section.get("target", 0.0)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise UsageError(f"[sweep] target must be a finite number, got {target!r}")
    if not isinstance(section.get("tune", []), list):
        raise UsageError(f"[sweep] tune must be a list such as [\"lr\"], got {section['tune']!r}")
    if not isinstance(section.get("space", {}), dict):
        raise UsageError("[sweep.space] must be a table of parameter ranges")
    return raw, section


def space_to_dict(space: dict[str, Dim]) -> dict:
    """JSON-able form of a space (stored in the study, compared on resume)."""
    return {k: d.to_dict() for k, d in space.items()}


def space_from_dict(raw: dict) -> dict[str, Dim]:
    """Inverse of space_to_dict."""
    return {k: Dim(choices=tuple(d["choices"])) if "choices" in d else Dim(d["low"], d["high"], d["log"])
            for k, d in raw.items()}


__all__ = ["Dim", "SPACES", "EXTRAS", "EDGE", "sweepable", "build_space", "parse_dim", "describe", "edge_warnings",
           "suggest", "trial_config", "schedule_table", "split_config", "space_to_dict", "space_from_dict"]
