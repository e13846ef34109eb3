"""Tables and plots of a sweep, rendered from its Optuna storage (so `sweep --report` needs no training).

Writes into the sweep directory: trials.csv (one row per trial), best.json and best.toml (the best trial in
the forms `train --config` and `--schedule-param` accept), optimization_history.png, param_importances.png,
contour.png (over the schedule's two parameters) and intermediate_values.png. A multi-objective study (a sweep
with a target, see adaptive_sched.sweep_pareto) adds both objective values to trials.csv, holds the Pareto front
in best.json and its lowest-metric trial in best.toml, adds pareto_front.png, and draws the other plots over the
metric objective.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from adaptive_sched import config as cfg
from adaptive_sched import sweep_pareto as pareto
from adaptive_sched.plots import _pyplot, finish_line_plot, log_axis, save_figure
from adaptive_sched.atomic import atomic_write_text
from adaptive_sched.sweep_space import EXTRAS, Dim, edge_warnings, space_from_dict


def trial_line(trial, metric: str) -> str:
    """'trial 3 COMPLETE eval_eps_mse=0.0312 mu=0.51 b=1.2 (41.0 s)', with the error of a failed trial."""
    state = trial.state.name
    params = params_text(trial.params)
    if trial.values is not None and len(trial.values) > 1:       # multi-objective: never pruned
        shown = f" {pareto.values_text(trial, metric)}"
    else:
        value = trial.value
        if state == "PRUNED" and trial.intermediate_values:
            step = max(trial.intermediate_values)
            state, value = f"PRUNED at step {step}", trial.intermediate_values[step]
        shown = f" {metric}={value:.5g}" if value is not None else ""
    duration = f" ({trial.duration.total_seconds():.1f} s)" if trial.duration is not None else ""
    error = f": {trial.user_attrs['error']}" if state == "FAIL" and "error" in trial.user_attrs else ""
    return f"trial {trial.number} {state}{shown} {params}{duration}{error}"


def best_line(study, metric: str) -> str:
    """'best: trial 1 eval_eps_mse=0.0301 mu=... b=...' or 'best: none yet'; with two objectives,
    'front: 3 trials; lowest eval_eps_mse: trial 1 eval_eps_mse=0.0301 steps_to_target=40 mu=... b=...'."""
    if pareto.is_multi(study):
        front = pareto.by_metric(study.best_trials)
        if not front:
            return "front: none yet"
        return (f"front: {len(front)} trial{'s' * (len(front) > 1)}; lowest {metric}: trial {front[0].number} "
                f"{pareto.values_text(front[0], metric)} {params_text(front[0].params)}")
    try:
        best = study.best_trial
    except ValueError:
        return "best: none yet"
    return f"best: trial {best.number} {metric}={best.value:.5g} {params_text(best.params)}"


def params_text(params: dict) -> str:
    """'mu=0.51 b=1.2 weighting=eps'."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def evals_of(trial) -> dict[int, float]:
    """The metric at each eval: Optuna's intermediate values, or the `evals` user attribute of a multi-objective
    trial (which cannot report them)."""
    return trial.intermediate_values or {int(s): v for s, v in trial.user_attrs.get("evals", {}).items()}


def trials_frame(study):
    """One row per trial: number, state, value (complete trials only: Optuna gives a pruned trial its last report),
    last_intermediate (the metric at its last eval), pruned_at_step, duration_s, params, last_step, intermediate
    (JSON), error, run_dir; with two objectives, value (the metric) is followed by value_metric and
    value_steps_to_target."""
    import pandas as pd
    rows, multi = [], pareto.is_multi(study)
    for t in study.get_trials(deepcopy=False):
        evals = evals_of(t)
        steps = sorted(evals)
        if multi:
            metric, reached = t.values if t.values is not None else (None, None)
            values = {"value": metric, pareto.OBJECTIVES[0]: metric, pareto.OBJECTIVES[1]: reached}
        else:
            values = {"value": t.value if t.state.name == "COMPLETE" else None}
        pruned = t.state.name == "PRUNED" and bool(steps)
        rows.append({"number": t.number, "state": t.state.name, **values,
                     "last_intermediate": evals[steps[-1]] if steps else None,
                     "pruned_at_step": steps[-1] if pruned else None,
                     "duration_s": round(t.duration.total_seconds(), 3) if t.duration is not None else None,
                     **{f"param_{k}": v for k, v in t.params.items()},
                     "last_step": steps[-1] if steps else None,
                     "intermediate": json.dumps({str(s): evals[s] for s in steps}),
                     "error": t.user_attrs.get("error", ""), "run_dir": t.user_attrs.get("run_dir", ""),
                     "host": t.user_attrs.get("host", ""),
                     "datetime_start": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else "",
                     "datetime_complete": t.datetime_complete.isoformat(timespec="seconds")
                     if t.datetime_complete else ""})
    frame = pd.DataFrame(rows)
    if len(frame):
        frame["pruned_at_step"] = frame["pruned_at_step"].astype("Int64")      # 200, not 200.0 beside blanks
    return frame


def best_record(study, settings: dict) -> dict | None:
    """The best complete trial in the forms `train --config` (a TOML-ready dict) and `--schedule-param` accept."""
    try:
        best = study.best_trial
    except ValueError:
        return None
    warnings = edge_warnings(best.params, space_from_dict(settings["space"]))
    return {"study": study.study_name, "metric": settings["metric"], "trial": best.number, "value": best.value,
            "warnings": warnings, **trial_forms(best), "full_config": "best.toml"}


def trial_forms(trial) -> dict:
    """A complete trial's parameters as `--schedule-param` strings, a TOML-ready config section, a compare entry
    and train arguments, with its resolved [schedule] table and run directory. A tuned window (logsnr_min/max) is
    in every form; a curriculum (its tuned START and END) in every form but `schedule_params`."""
    from adaptive_sched import schedules
    full = trial.user_attrs["config"]
    window = ("logsnr_min", "logsnr_max")
    curriculum = dict(full["schedule"].get("curriculum") or {})
    valid = [k for k in schedules.parameters(full["schedule"]["name"]) if k not in window and k not in curriculum]
    params = {k: v for k, v in full["schedule"].items() if k in valid}
    tuned_window = {k: full["schedule"][k] for k in window if k in trial.params}
    schedule = {"name": full["schedule"]["name"], **{k: full["schedule"][k] for k in window}, **params,
                **({"curriculum": curriculum} if curriculum else {})}
    section = {"schedule": schedule}
    args = ["--schedule", schedule["name"]]
    for key, value in {**tuned_window, **params}.items():
        args += ["--schedule-param", f"{key}={value!r}"]
    for key, spec in curriculum.items():
        args += ["--curriculum", f"{key}={spec}"]
    if "lr" in trial.params:
        section["train"] = {"lr": full["train"]["lr"]}
        args += ["--lr", repr(full["train"]["lr"])]
    if "weighting" in trial.params:
        section["weighting"] = dict(full["weighting"])
        args += ["--weighting", full["weighting"]["name"]]
    entry = {"name": schedule["name"], "label": f"{schedule['name']} (tuned)", **tuned_window, **params,
             **({"curriculum": curriculum} if curriculum else {})}
    return {"params": trial.params, "config": section,
            "schedule_params": [f"{k}={v!r}" for k, v in {**tuned_window, **params}.items()],
            "compare_entry": entry, "train_args": args,
            "resolved_schedule": trial.user_attrs.get("schedule", schedule), "run_dir": trial.user_attrs.get("run_dir", "")}


def write_report(study, out: str | Path, quiet: bool = False) -> list[str]:
    """Write trials.csv, best.json, best.toml and the plots into `out`; return the notes on what was skipped."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = study.user_attrs["sweep"]
    metric, space = settings["metric"], space_from_dict(settings["space"])
    multi, target = pareto.is_multi(study), settings.get("target")
    frame = trials_frame(study)
    atomic_write_text(out / "trials.csv", frame.to_csv(index=False))
    notes = []
    best = pareto.front_record(study, settings) if multi else best_record(study, settings)
    if best is None:
        notes.append("best.json, best.toml: no complete trial yet")
    else:
        atomic_write_text(out / "best.json", json.dumps(best, indent=2) + "\n")
        if multi:
            atomic_write_text(out / "best.toml", pareto.best_toml(study, best))
        else:
            header = (f"# best trial {best['trial']} of sweep study {study.study_name!r}: {metric} = "
                      f"{best['value']:.6g}\n" + "".join(f"# warning: {w}\n" for w in best["warnings"])
                      + "# train it again: adaptive-sched train --config best.toml --out DIR\n")
            atomic_write_text(out / "best.toml", header + cfg.dumps_toml(study.best_trial.user_attrs["config"]))
    plots = [plot_history(frame, metric, out / "optimization_history.png"),
             plot_importances(study, space, out / "param_importances.png", multi),
             plot_contour(frame, space, metric, out / "contour.png"),
             plot_intermediate(study, metric, out / "intermediate_values.png", target if multi else None)]
    if multi:
        front = [t.number for t in study.best_trials]
        plots.append(pareto.plot_front(frame, front, metric, target, pareto.penalty_of(settings["base"]),
                                       out / "pareto_front.png"))
    for note in plots:
        if note:
            notes.append(note)
    if not quiet:
        counts = frame["state"].value_counts().to_dict() if len(frame) else {}
        print(f"study {study.study_name!r}: {len(frame)} trials ({', '.join(f'{n} {s}' for s, n in counts.items())})"
              f"; {best_line(study, metric)}")
        print(f"wrote {out / 'trials.csv'}" + ("" if best is None else ", best.json, best.toml") + " and plots")
        for note in notes:
            print(f"note: skipped {note}")
        for warning in best_warnings(best):
            print(f"warning: {warning}", file=sys.stderr)
    return notes


def best_warnings(record: dict | None) -> list[str]:
    """The edge-of-range warnings of best.json: its best trial's, or 'trial N: ...' for each Pareto trial's."""
    if record is None:
        return []
    if "front" in record:
        return [f"trial {entry['trial']}: {w}" for entry in record["front"] for w in entry.get("warnings", [])]
    return list(record.get("warnings", []))


def plot_history(frame, metric: str, path: Path) -> str | None:
    """Objective per trial (complete: dots; pruned: last reported value, crosses) and the best so far."""
    if not len(frame) or not frame["state"].isin(["COMPLETE", "PRUNED"]).any():
        return f"{path.name}: no complete or pruned trial"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    done = frame[frame["state"] == "COMPLETE"].sort_values("number")
    pruned = frame[frame["state"] == "PRUNED"]
    last = list(pruned["last_intermediate"].astype(float))
    if len(done):
        ax.plot(done["number"], done["value"], "o", label="complete")
        ax.step(done["number"], done["value"].cummin(), where="post", color="C3", label="best so far")
    if len(pruned):
        ax.plot(pruned["number"], last, "x", color="grey", label="pruned (last report)")
    values = list(done["value"]) + [v for v in last if v == v]
    finish_line_plot(fig, ax, path, "trial", metric, logy=log_axis(metric, values))
    return None


def plot_importances(study, space: dict[str, Dim], path: Path, multi: bool = False) -> str | None:
    """Parameter importances (Optuna's default evaluator) for the metric objective, as horizontal bars."""
    import warnings

    import optuna
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2 or len(space) < 2:
        return f"{path.name}: needs >= 2 complete trials and > 1 tuned parameter"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(
                study, target=(lambda t: t.values[0]) if multi else None)
    except Exception as err:  # noqa: BLE001 - too few or degenerate trials: a note, not a failure
        return f"{path.name}: {err}"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 1.4 + 0.35 * len(importances)))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance")
    ax.set_title(f"{len(complete)} complete trials")
    save_figure(fig, path)
    return None


def plot_contour(frame, space: dict[str, Dim], metric: str, path: Path) -> str | None:
    """The objective over the schedule's two tuned parameters: complete trials coloured by value, a filled
    contour of their triangulation, pruned trials as grey crosses, the best as a star."""
    axes = [k for k, d in space.items() if k not in EXTRAS and not d.choices][:2]
    if len(axes) < 2:
        return f"{path.name}: needs two tuned schedule parameters"
    x_col, y_col = f"param_{axes[0]}", f"param_{axes[1]}"
    done = frame[frame["state"] == "COMPLETE"] if len(frame) else frame
    if not len(done) or x_col not in done or y_col not in done:
        return f"{path.name}: no complete trial"
    plt = _pyplot()
    import matplotlib.colors as mcolors
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    values = done["value"].astype(float)
    lo, hi = float(values.min()), float(values.max())
    norm = mcolors.LogNorm(lo, hi * (1 + 1e-9)) if log_axis(metric, list(values)) else mcolors.Normalize(lo, hi + 1e-12)
    if len(done) >= 4:
        try:
            import numpy as np
            levels = np.geomspace(lo, hi, 12) if log_axis(metric, list(values)) and hi > lo else 12
            ax.tricontourf(done[x_col], done[y_col], values, levels=levels, cmap="viridis", norm=norm, alpha=0.5)
        except (ValueError, RuntimeError):     # collinear or repeated points: the scatter alone
            pass
    points = ax.scatter(done[x_col], done[y_col], c=values, cmap="viridis", norm=norm, edgecolors="k", zorder=3)
    fig.colorbar(points, ax=ax, label=metric)
    pruned = frame[frame["state"] == "PRUNED"]
    if len(pruned):
        ax.plot(pruned[x_col], pruned[y_col], "x", color="grey", label="pruned", zorder=2)
    best = done.loc[values.idxmin()]
    ax.plot([best[x_col]], [best[y_col]], "*", color="red", ms=15, label=f"best (trial {int(best['number'])})",
            zorder=4)
    for name, set_scale, set_lim in ((axes[0], ax.set_xscale, ax.set_xlim), (axes[1], ax.set_yscale, ax.set_ylim)):
        set_scale("log" if space[name].log else "linear")
        set_lim(space[name].low, space[name].high)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return None


def plot_intermediate(study, metric: str, path: Path, target: float | None = None) -> str | None:
    """The metric at every eval of every trial: complete solid, pruned dashed grey, failed dotted red; the target
    of a multi-objective sweep as a dotted line."""
    trials = [t for t in study.get_trials(deepcopy=False) if evals_of(t)]
    if not trials:
        return f"{path.name}: no trial reported a value"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    style = {"COMPLETE": {"color": "C0", "ls": "-"}, "PRUNED": {"color": "grey", "ls": "--"},
             "FAIL": {"color": "C3", "ls": ":"}, "RUNNING": {"color": "C2", "ls": "-."}}
    labelled, values = set(), []
    for t in trials:
        evals = evals_of(t)
        steps = sorted(evals)
        ys = [evals[s] for s in steps]
        values += ys
        kind = t.state.name if t.state.name in style else "RUNNING"
        ax.plot(steps, ys, marker=".", alpha=0.7, label=None if kind in labelled else kind.lower(), **style[kind])
        labelled.add(kind)
    if target is not None:
        ax.axhline(target, color="k", ls=":", lw=0.8, label=f"target {target:g}")
    finish_line_plot(fig, ax, path, "training step", metric, logy=log_axis(metric, values))
    return None
