"""The statistics of a comparison, pure functions of its tidy summary: mean and 95% Student-t interval over seeds,
steps-to-target against the reference, paired differences with the reference per seed, the per-seed columns."""
from __future__ import annotations

import math


def mean_ci(values) -> tuple[float, float, int]:
    """Mean and the half-width of its 95% Student-t confidence interval over seeds (NaN for one seed: no interval)."""
    import numpy as np
    from scipy import stats
    values = np.asarray([v for v in values if v == v], dtype=float)
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(values[0]), math.nan, 1
    half = stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return float(values.mean()), float(half), n


def format_ci(mean: float, half: float, digits: int = 4, signed: bool = False) -> str:
    """'mean ± half' for a table cell; 'mean (n = 1)' where one value gives no interval; '' for no value."""
    if mean != mean:
        return ""
    value = f"{mean:{'+' if signed else ''}.{digits}g}"
    return f"{value} ± {half:.2g}" if half == half else f"{value} (n = 1)"


def steps_to_target(summary, metric: str, reference: str, final_step: int):
    """Per label: the first eval step whose mean `metric` ≤ the reference's mean at `final_step` (lower is better),
    both means over the same seeds S: those the label and the reference have both finished (a value at final_step),
    so a schedule with fewer seeds is not measured against other seeds' mean. Also the fraction of the reference's
    own steps to that value over S. NaN step when never reached; NaN target when S is empty."""
    import pandas as pd
    data = summary.dropna(subset=[metric])
    values = data.pivot_table(index=["label", "step"], columns="seed", values=metric)      # (label, step) x seed

    def finished(label):
        return set(data.loc[(data["label"] == label) & (data["step"] == final_step), "seed"])

    def curve(label, seeds):                        # mean over `seeds` at the steps where all of them were logged
        return values.loc[label][seeds].dropna().mean(axis=1).sort_index()

    rows, reference_seeds = [], finished(reference)
    for label in data["label"].unique():
        seeds = sorted(finished(label) & reference_seeds)
        row = {"label": label, "reference": reference, "seeds": len(seeds), "target": math.nan, "step": math.nan,
               "fraction_of_reference": math.nan}
        if seeds:
            ref = curve(reference, seeds)
            target = float(ref.loc[final_step])
            own, ref_step = curve(label, seeds), int(ref.index[ref <= target][0])
            hit = own.index[own <= target]
            row.update(target=target, step=int(hit[0]) if len(hit) else math.nan,
                       fraction_of_reference=int(hit[0]) / ref_step if len(hit) else math.nan)
        rows.append(row)
    return pd.DataFrame(rows, columns=["label", "reference", "seeds", "target", "step", "fraction_of_reference"])


def per_seed_metrics(summary, metric: str) -> list[str]:
    """The columns results.md lists per seed: `metric`, and for a guided one (eval_fid@w1.5) every guidance scale's."""
    base = metric.split("@w")[0]
    guided = [c for c in summary.columns if c.startswith(base + "@w") and summary[c].notna().any()]
    return guided if "@w" in metric and metric in guided else [metric]


def paired_with_reference(summary, metric: str, reference: str):
    """Per label at the final step: `metric` per seed, and the paired difference d_s = m_s − m_s(reference) over the
    seeds both have: mean ± 95% Student-t half-width, and how many d_s < 0 (a DataFrame, one row per label)."""
    import pandas as pd
    final = summary[summary["step"] == summary["step"].max()].dropna(subset=[metric])
    values = final.pivot_table(index="label", columns="seed", values=metric, sort=False)
    values = values[sorted(values.columns)]                                          # seed0, seed1, ... in order
    rows = []
    for label in values.index:
        diffs = (values.loc[label] - values.loc[reference]).dropna() if reference in values.index else []
        mean, half, n = mean_ci(diffs)
        rows.append({"label": label, **{f"seed{int(s)}": values.loc[label, s] for s in values.columns},
                     "reference": reference, "diff_mean": mean, "diff_ci95": half, "paired_seeds": n,
                     "seeds_below": int(sum(d < 0 for d in diffs))})
    return pd.DataFrame(rows)
