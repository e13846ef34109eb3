"""Run configuration: one typed dataclass per component, TOML files that override defaults, a TOML writer.

TOML layout (every section optional):
    [data]      name, data_dir, pad, resize, n, dim, seed
    [schedule]  name, logsnr_min, logsnr_max, the schedule's own parameters (e.g. b = 0.5), and
                curriculum = { b = "0.3:1.5:cosine" } to move parameters over training
    [weighting] name, and the weighting's own parameters (e.g. gamma = 5)
    [learned]   objective, lr, weight_decay, freeze_steps, weight_like, smoothness (learned schedules only)
    [model]     name, and the model's own parameters (e.g. channels = [32, 64])
    [train]     steps, batch_size, lr, ...  (see TrainConfig)
    [eval]      every, n, ...               (see EvalConfig)
"""
from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from adaptive_sched.errors import UsageError


@dataclass
class DataConfig:
    """Which data, where from, and how images are shaped (0 means "the loader's default")."""

    name: str = "gmm"
    data_dir: str = ""
    pad: int = 0
    resize: int = 0
    n: int = 0
    dim: int = 0
    seed: int = 0


@dataclass
class ScheduleConfig:
    """The training schedule: a registered name, its window and its own parameters."""

    name: str = "cosine"
    logsnr_min: float = -20.0
    logsnr_max: float = 20.0
    params: dict = field(default_factory=dict)
    curriculum: dict = field(default_factory=dict)   # {param: "START:END[:SHAPE]"} (adaptive_sched.curriculum)


@dataclass
class LearnedConfig:
    """How a learned schedule trains (used only when [schedule] name = "learned")."""

    objective: str = "variance"     # variance | cvdm (see adaptive_sched.losses)
    lr: float = 1e-3                # the schedule's own parameter group
    weight_decay: float = 0.0
    freeze_steps: int = 0           # the schedule stays at its init for this many steps
    weight_like: str = "laplace"    # `schedule` weighting with the variance objective = this schedule's weighting
    smoothness: float = 0.0         # cvdm: weight of E[(d²λ/dt²)²]/(λ_max − λ_min)²
    condition: str = "none"         # none | class (λ(t, y) per class label) | stats:K (K quantile bins of each
                                    # example's pixel standard deviation, MuLAN-style input conditioning)


@dataclass
class WeightingConfig:
    """The loss weighting (default: the schedule sets it; see adaptive_sched.weighting)."""

    name: str = "schedule"
    params: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    """The denoiser: 'auto' picks the U-Net for images and the MLP for vectors."""

    name: str = "auto"
    params: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    """The optimisation: one step counter drives LR warmup, EMA, per-step seeds and data order."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    optimizer: str = "adamw"
    target: str = "eps"
    seed: int = 0
    device: str = "auto"
    log_every: int = 50
    checkpoint_every: int = 500
    max_nonfinite: int = 20       # stop after this many non-finite losses in a row (each one is skipped)
    conditional: bool = False     # class-conditional denoiser (labels from the data) for classifier-free guidance
    p_uncond: float = 0.1         # conditional: probability of replacing a label by the null class in training
    compile: bool = False         # torch.compile the loss (learned schedule, weighting, denoiser); eager if it fails
    channels_last: bool = False   # image denoiser's weights in NHWC (cudnn's native layout for bf16 convs)
    compile_mode: str = "default"  # with compile: "default", or "reduce-overhead" (CUDA graphs replay each step's
                                  # kernels without the host launching them; single process only)


@dataclass
class EvalConfig:
    """Periodic evaluation: held-out ε-MSE on a fixed λ grid (the same for every schedule), and sample quality."""

    every: int = 500
    n: int = 1000
    logsnr_points: int = 21
    logsnr_lo: float = -10.0
    logsnr_hi: float = 10.0
    sample_n: int = 1000          # samples drawn at each eval for eval_swd (0: skip)
    sample_logsnr_min: float = -10.0  # sampling window; EDM samples σ in [0.002, 80], i.e. λ in [−8.8, 12.4]
    sample_logsnr_max: float = 12.0
    sampler: str = "ddim"
    sample_steps: int = 50
    grid: str = "cosine"
    clip_x0: bool = False         # clamp x̂0 to the pixel range [-1, 1] at every sampler step (images;
                                  # Ho et al.'s clip_denoised)
    features: str = "auto"        # FID/KID features (images only): auto (a classifier trained on the data's own
                                  # labels, else an autoencoder; cached), none, torchscript:PATH, inception:PATH
    kid_subsets: int = 20
    bpd_n: int = 0                # held-out examples for the VLB in bits/dim at each eval (0: skip)
    bpd_points: int = 16          # stratified λ points per example
    bpd_bins: int = 0             # 0: continuous decoder; 256: 8-bit images (VDM's categorical decoder)
    guidance: list = field(default_factory=lambda: [1.0])   # CFG scales w (conditional runs): samples and
                                  # FID/KID/SWD at each; the first also gives the plain eval_fid/eval_kid/eval_swd
    sample_labels: str = "held_out"   # conditional runs' sample labels: held_out (those of the held-out rows the
                                      # samples are scored against: the same class mix) or balanced (equal counts)


@dataclass
class RunConfig:
    """Everything a training run needs; written resolved into the run directory as config.toml."""

    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    learned: LearnedConfig = field(default_factory=LearnedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        """A plain nested dict; component params are flattened into their section."""
        out = {}
        for f in dataclasses.fields(self):
            section = dataclasses.asdict(getattr(self, f.name))
            params = section.pop("params", {})
            out[f.name] = {**section, **params}
        return out


COMPILE_MODES = ("default", "reduce-overhead")      # [train] compile_mode: torch.compile modes a run may use
SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}
OPEN_SECTIONS = ("schedule", "weighting", "model")   # extra keys are the component's own parameters


def legacy_defaults(saved: dict) -> dict:
    """{(section, key): value} for keys added after `saved` was written whose default is not what that run did:
    conditional evals drew equal class counts until [eval] sample_labels (default held_out) came in on 2026-11-27."""
    return {("eval", "sample_labels"): "balanced"} if saved.get("train", {}).get("conditional") else {}


def with_defaults(saved: dict) -> dict:
    """A config dict written by an older version (to_dict's layout) with the keys it lacks at their defaults, or at
    legacy_defaults' value where the default changed what such a run did."""
    defaults = RunConfig().to_dict()
    for (section, key), value in legacy_defaults(saved).items():
        defaults[section][key] = value
    return {section: {**defaults.get(section, {}), **values} for section, values in saved.items()}


def _section_class(name: str):
    return {"data": DataConfig, "schedule": ScheduleConfig, "weighting": WeightingConfig,
            "learned": LearnedConfig, "model": ModelConfig,
            "train": TrainConfig, "eval": EvalConfig}[name]


def suggest(key: str, valid: list[str]) -> str:
    """' (did you mean X?)' for the closest valid key, or ''."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(section: str, key: str, value, default):
    """Check a TOML value against the type of its default, converting int → float where natural."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list) and all(isinstance(v, float) for v in default):
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        value = [float(v) for v in value] if ok else value
        if not ok:
            raise UsageError(f"[{section}] {key} must be a list of numbers, got {value!r}")
    else:
        ok = True
    if not ok:
        raise UsageError(f"[{section}] {key} must be a {type(default).__name__}, got {value!r}")
    return value


def from_dict(raw: dict, base: RunConfig | None = None) -> RunConfig:
    """Overlay a nested dict (e.g. parsed TOML) on `base`; unknown sections/keys raise UsageError with a suggestion."""
    config = base or RunConfig()
    for section, values in raw.items():
        if section not in SECTIONS:
            raise UsageError(f"unknown config section [{section}]{suggest(section, list(SECTIONS))}; "
                             f"valid sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise UsageError(f"[{section}] must be a table of keys")
        current = getattr(config, section)
        fixed = {f.name: f for f in dataclasses.fields(current) if f.name != "params"}
        updates, params = {}, dict(getattr(current, "params", {}))
        if section in OPEN_SECTIONS and "name" in values and values["name"] != current.name:
            params = {}                      # parameters of a different component do not carry over
        for key, value in values.items():
            if key in fixed:
                updates[key] = _coerce(section, key, value, getattr(current, key))
            elif section in OPEN_SECTIONS:
                params[key] = value
            else:
                raise UsageError(f"unknown key {key!r} in [{section}]{suggest(key, list(fixed))}; "
                                 f"valid keys: {', '.join(fixed)}")
        if section in OPEN_SECTIONS:
            updates["params"] = params
        setattr(config, section, dataclasses.replace(current, **updates))
    return config


def load_toml(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """Read a TOML config file over `base` (defaults when None)."""
    return from_dict(read_toml(path), base)


def read_toml(path: str | Path) -> dict:
    """Parse a TOML file into a dict; a missing or malformed file raises UsageError."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"config file {path} is a folder; give a .toml file (a run's is {path / 'config.toml'})")
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        return read_toml_text(path.read_text())
    except UnicodeDecodeError as err:
        raise UsageError(f"config file {path} is not text: {err}") from None
    except UsageError as err:
        raise UsageError(f"config file {path}: {err}") from None


def read_toml_text(text: str) -> dict:
    """Parse TOML text; malformed text raises UsageError."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"not valid TOML: {err}") from None


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if value == value and abs(value) != float("inf") else ("nan" if value != value else
                                                                                   ("inf" if value > 0 else "-inf"))
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dumps_toml(data: dict) -> str:
    """Write a dict of sections (dicts of scalars, lists and inline tables) as TOML."""
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def parse_assignments(pairs: list[str] | None, flag: str) -> dict:
    """Parse ["k=v", ...] from the CLI; values are read as TOML literals when they parse, else as strings."""
    out = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        out[key.strip()] = value
    return out
