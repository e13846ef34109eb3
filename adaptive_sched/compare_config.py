"""A comparison's plan from its TOML file ([compare] read and validated), its runs' labels, folders and configs."""
from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

from adaptive_sched import config as cfg, schedules
from adaptive_sched.diffusion import TARGETS
from adaptive_sched.errors import UsageError

LEARNED_KEYS = {f.name for f in dataclasses.fields(cfg.LearnedConfig)}   # an entry's keys that go to [learned]
COMPARE_KEYS = {"seeds", "metric", "schedules", "targets", "jobs", "reference", "samples"}
RUN_KEYS = {"label", "target"}          # entry keys that are not schedule parameters


def run_label(entry: dict) -> str:
    """A readable label: name(k=v,...) or the entry's own `label`, then " [target]" when the entry sets one."""
    suffix = f" [{entry['target']}]" if "target" in entry else ""
    if "label" in entry:
        return str(entry["label"]) + suffix
    params = {k: v for k, v in entry.items() if k not in ("name", "label", "target")}
    inner = ",".join(f"{k}={v}" for k, v in params.items())
    return (f"{entry['name']}({inner})" if inner else entry["name"]) + suffix


def run_dir_of(out: Path, entry: dict, seed: int) -> Path:
    """DIR/runs/<slug>/seed<k>, the slug being the label with shell-unfriendly characters replaced."""
    slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", run_label(entry)).strip("_")
    if not slug.strip("."):                  # "", "." or "..": would name runs/ itself or its parent
        slug = "_" + slug
    return out / "runs" / slug / f"seed{seed}"


def final_step(base: cfg.RunConfig) -> int:
    """The step a comparison is about: [train] steps (runs recorded past it are refused, compare.check_runs_match)."""
    return base.train.steps


@dataclasses.dataclass
class Plan:
    """A parsed compare file: the base run config, schedule entries, seeds and the [compare] options."""

    base: cfg.RunConfig
    entries: list[dict]
    seeds: list[int]
    metric: str
    jobs: int = 1
    reference: str = ""
    samples: int = 64


def is_int(value) -> bool:
    """True for an integer that is not a bool (TOML's `true` would otherwise read as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def parse(path: str | Path) -> Plan:
    """The compare plan from a TOML file; everything validated up front."""
    raw = cfg.read_toml(path)
    section = raw.pop("compare", None)
    if not isinstance(section, dict):
        raise UsageError(f"{path} has no [compare] section (with seeds and schedules)")
    unknown = set(section) - COMPARE_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise UsageError(f"unknown key {key!r} in [compare]{cfg.suggest(key, sorted(COMPARE_KEYS))}; "
                         f"valid keys: {', '.join(sorted(COMPARE_KEYS))}")
    base = cfg.from_dict(raw)
    seeds = section.get("seeds", [0])
    entries = section.get("schedules", [])
    targets = section.get("targets", [])
    if not isinstance(targets, list) or not all(t in TARGETS for t in targets):
        raise UsageError(f"[compare] targets must be a list drawn from: {', '.join(TARGETS)}")
    if isinstance(entries, list):
        entries = [tuned_entry(e, Path(path)) if isinstance(e, dict) and "best" in e else e for e in entries]
    if targets and isinstance(entries, list):
        entries = [{**e, "target": t} for e in entries if isinstance(e, dict) for t in targets]
    metric = section.get("metric", "eval_eps_mse")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) and "name" in e for e in entries):
        raise UsageError("[compare] schedules must be a non-empty list of tables, each with a name")
    bad = [e["name"] for e in entries if not isinstance(e["name"], str)]
    if bad:
        raise UsageError(f"[compare] a schedule's name must be a string, got {bad[0]!r}")
    if not isinstance(seeds, list) or not seeds or not all(is_int(s) for s in seeds):
        raise UsageError("[compare] seeds must be a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"[compare] seeds lists a seed twice: {seeds}")
    from adaptive_sched.run_build import build_loss, build_schedule, check_table_condition, metric_columns
    from adaptive_sched.run_checks import check_metric_logged, validate
    eval_metrics = [c for c in metric_columns(base) if c.startswith("eval_")]
    if metric not in eval_metrics:
        raise UsageError(f"[compare] metric {metric!r} is not an eval metric; choose one of: "
                         f"{', '.join(eval_metrics)}")
    check_metric_logged(base, metric)
    blank = [e for e in entries if "label" in e and not str(e["label"]).strip()]
    if blank:
        raise UsageError(f"[compare] a schedule's label must not be blank, got {blank[0]['label']!r}")
    dirs = [run_dir_of(Path("."), e, 0) for e in entries]
    if len(set(dirs)) != len(dirs):
        raise UsageError("[compare] two schedules share a label (or its folder name); give one a distinct `label`")
    for entry in entries:             # refuse bad settings, parameters, objectives and weightings before any run
        ignored = sorted((LEARNED_KEYS - {"condition"}) & set(entry))                 # (a table takes a condition)
        if ignored and not schedules.is_learned(schedules.lookup(str(entry["name"]))):
            raise UsageError(f"[compare] entry {run_label(entry)!r} sets {', '.join(ignored)}, which only a learned "
                             f"schedule uses; drop it or use name = \"learned\"")
        if "objective" in entry and entry["name"] not in schedules.OBJECTIVE_SCHEDULES:      # adaptive_binned's is fixed
            raise UsageError(f"[compare] entry {run_label(entry)!r} sets objective, which only name = \"learned\" "
                             f"takes")
        configs = [run_config(base, entry, seed) for seed in seeds]
        for config in configs:
            validate(config)
        schedule = build_schedule(configs[0].schedule)
        check_table_condition(schedule, configs[0].learned.condition)
        build_loss(configs[0], schedule)
    jobs, samples = section.get("jobs", 1), section.get("samples", 64)
    if not is_int(jobs) or jobs < 1:
        raise UsageError(f"[compare] jobs must be an integer >= 1, got {jobs!r}")
    if not is_int(samples) or samples < 0:
        raise UsageError(f"[compare] samples must be an integer >= 0, got {samples!r}")
    labels = [run_label(e) for e in entries]
    reference = section.get("reference", labels[0])
    if reference not in labels:
        raise UsageError(f"[compare] reference {reference!r} is not one of the labels: {', '.join(labels)}")
    return Plan(base, entries, seeds, metric, jobs, reference, samples)


def tuned_entry(entry: dict, config_file: Path) -> dict:
    """An entry `{ best = "DIR/best.json", label = ... }`: the schedule a sweep found (its best.json's compare_entry),
    the entry's own keys on top. The path is taken from the working folder, else from the TOML file's folder."""
    expected = "the path of a sweep's best.json, e.g. best = \"sweep_out/best.json\""
    if not isinstance(entry["best"], str) or not entry["best"].strip():
        raise UsageError(f"[compare] best = {entry['best']!r}: expected {expected}")
    given = Path(entry["best"])
    path = given if given.exists() or given.is_absolute() else config_file.parent / given
    if path.is_dir():
        hint = f" (did you mean {str(given / 'best.json')!r}?)" if (path / "best.json").is_file() else ""
        raise UsageError(f"[compare] best = {str(given)!r} is a folder; expected {expected}{hint}")
    if not path.exists():
        raise UsageError(f"[compare] best = {str(given)!r}: no such file (run the sweep first; its --out folder "
                         f"holds best.json)")
    try:
        found = json.loads(path.read_text()).get("compare_entry")
    except OSError as err:
        raise UsageError(f"[compare] best = {str(given)!r} cannot be read ({err.strerror}); expected {expected}") \
            from None
    except ValueError:
        raise UsageError(f"[compare] best = {str(given)!r} is not a JSON file; expected {expected}") from None
    except AttributeError:
        found = None
    if not isinstance(found, dict) or "name" not in found:
        raise UsageError(f"[compare] best = {str(given)!r} holds no single best schedule (a multi-objective study's "
                         f"best.json is a Pareto front: copy the trial you want into the entry instead)")
    return {**found, **{k: v for k, v in entry.items() if k != "best"}}


def run_config(base: cfg.RunConfig, entry: dict, seed: int) -> cfg.RunConfig:
    """The config of one run: the base with this schedule and seed."""
    schedule = {k: v for k, v in entry.items() if k not in RUN_KEYS and k not in LEARNED_KEYS}
    learned = {k: v for k, v in entry.items() if k in LEARNED_KEYS}
    config = copy.deepcopy(base)
    config.schedule = dataclasses.replace(config.schedule, params={}, curriculum={})  # an entry names them all
    train = {"seed": seed, **({"target": entry["target"]} if "target" in entry else {})}
    return cfg.from_dict({"schedule": schedule, "learned": learned, "train": train}, config)
