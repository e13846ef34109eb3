"""Multi-objective sweeps (`sweep --target-value V`): steps to target, the Pareto front, pareto_front.png.

With a target the study minimises two objectives: (1) the eval metric at the budget, as a plain sweep does, and
(2) steps to target, the first eval step whose metric is <= V; a trial whose metric never gets there scores
steps + eval.every ("not reached within the budget"). Optuna can neither report nor prune multi-objective
trials, so every trial runs to its budget. best.json holds the Pareto front (lowest metric first) and best.toml
the front's trial with the lowest metric.
"""
from __future__ import annotations

from pathlib import Path

OBJECTIVES = ("value_metric", "value_steps_to_target")      # trials.csv's and best.json's names of the two values


def steps_to_target(evals: dict[int, float], target: float, steps: int, every: int) -> int:
    """The first eval step whose metric is <= target; steps + every when none is (not reached within the budget)."""
    for step in sorted(evals):
        if evals[step] <= target:
            return int(step)
    return not_reached(steps, every)


def not_reached(steps: int, every: int) -> int:
    """Steps to target of a trial that never reaches it: one eval interval past the budget."""
    return int(steps) + int(every)


def penalty_of(config: dict) -> int:
    """not_reached for a config dict (a trial's `config` user attribute, or a study's stored base settings)."""
    return not_reached(config["train"]["steps"], config["eval"]["every"])


def is_multi(study) -> bool:
    """True for a study with more than one objective (a sweep with a target)."""
    return len(study.directions) > 1


def by_metric(trials: list) -> list:
    """Complete multi-objective trials ordered by metric, then steps to target, then number."""
    return sorted(trials, key=lambda t: (t.values[0], t.values[1], t.number))


def values_text(trial, metric: str) -> str:
    """'eval_eps_mse=0.0312 steps_to_target=40', or '... steps_to_target=not reached' past the budget."""
    value, steps = trial.values
    config = trial.user_attrs.get("config")
    reached = config is None or steps < penalty_of(config)
    return f"{metric}={value:.5g} steps_to_target={int(steps) if reached else 'not reached'}"


def front_record(study, settings: dict) -> dict | None:
    """best.json of a multi-objective sweep: every Pareto-optimal trial (both values and the forms `train` and
    `compare` accept), lowest metric first; None before the first complete trial."""
    from adaptive_sched.sweep_report import trial_forms
    from adaptive_sched.sweep_space import edge_warnings, space_from_dict
    front = by_metric(study.best_trials)
    if not front:
        return None
    penalty, space = penalty_of(settings["base"]), space_from_dict(settings["space"])
    trials = [{"trial": t.number, OBJECTIVES[0]: t.values[0], OBJECTIVES[1]: int(t.values[1]),
               "reached_target": t.values[1] < penalty, "warnings": edge_warnings(t.params, space),
               **trial_forms(t)} for t in front]
    return {"study": study.study_name, "metric": settings["metric"], "target": settings["target"],
            "objectives": [f"{settings['metric']} at step {settings['base']['train']['steps']}",
                           f"first eval step with {settings['metric']} <= {settings['target']:g}"],
            "not_reached_value": penalty, "lowest_metric_trial": front[0].number, "front": trials,
            "full_config": "best.toml"}


def best_toml(study, record: dict) -> str:
    """best.toml of a multi-objective sweep: the full config of the Pareto trial with the lowest metric."""
    from adaptive_sched import config as cfg
    top = record["front"][0]
    trial = study.trials[top["trial"]]
    reached = top[OBJECTIVES[1]] if top["reached_target"] else "not reached within the budget"
    return (f"# trial {top['trial']} of sweep study {study.study_name!r}: of the {len(record['front'])} Pareto "
            f"trials in best.json, the one with the lowest {record['metric']}\n"
            f"# {record['metric']} = {top[OBJECTIVES[0]]:.6g}; steps to {record['metric']} <= {record['target']:g}: "
            f"{reached}\n" + "".join(f"# warning: {w}\n" for w in top["warnings"])
            + "# train it again: adaptive-sched train --config best.toml --out DIR\n"
            + cfg.dumps_toml(trial.user_attrs["config"]))


def plot_front(frame, front: list[int], metric: str, target: float, penalty: int, path: Path) -> str | None:
    """Metric at the budget against steps to target for every complete trial; the Pareto front in red, joined
    by its staircase, and a dashed line where 'not reached within the budget' trials sit."""
    from adaptive_sched.plots import _pyplot, finish_line_plot
    done = frame[frame["state"] == "COMPLETE"] if len(frame) else frame
    if not len(done):
        return f"{path.name}: no complete trial"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(done[OBJECTIVES[1]], done[OBJECTIVES[0]], "o", color="grey", alpha=0.6, label="complete trials")
    best = done[done["number"].isin(front)].sort_values([OBJECTIVES[1], OBJECTIVES[0]])
    ax.step(best[OBJECTIVES[1]], best[OBJECTIVES[0]], "-o", where="post", color="C3", label="Pareto front")
    for _, row in best.iterrows():
        ax.annotate(str(int(row["number"])), (row[OBJECTIVES[1]], row[OBJECTIVES[0]]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    ax.axvline(penalty, color="k", ls="--", lw=0.8, label=f"not reached within the budget ({penalty})")
    ax.set_title(f"target: {metric} <= {target:g}", fontsize=9)
    values = list(done[OBJECTIVES[0]])
    finish_line_plot(fig, ax, path, "steps to target (first eval at or below it)", f"{metric} at the budget",
                     logy=len(values) > 0 and all(v > 0 for v in values))
    return None
