"""The statistics of a comparison, pure functions of its tidy summary: mean and 95% Student-t interval over seeds,
steps-to-target against the reference, paired differences with the reference per seed, the per-seed columns, the
diverged runs. A non-finite value (NaN or inf: a diverged run's) counts as no value in every statistic."""
from __future__ import annotations

import math


def mean_ci(values) -> tuple[float, float, int]:
    """Mean, the half-width of its 95% Student-t confidence interval t(0.975, n−1)·s/√n, and n, over the finite values
    (NaN half-width for one value: no interval; NaN mean and n = 0 for none)."""
    import numpy as np
    from scipy import stats
    values = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(values[0]), math.nan, 1
    half = stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return float(values.mean()), float(half), n


def format_ci(mean: float, half: float, *, n: int, digits: int = 4, signed: bool = False) -> str:
    """A table cell of mean_ci's (mean, half, n): 'mean ± half'; 'mean (n = 1)' for one value (no interval); 'mean
    (no interval)' for n >= 2 values whose half-width is NaN; '' for no value."""
    if mean != mean:
        return ""
    value = f"{mean:{'+' if signed else ''}.{digits}g}"
    if n == 1:
        return f"{value} (n = 1)"
    return f"{value} ± {half:.2g}" if half == half else f"{value} (no interval)"


def steps_to_target(summary, metric: str, reference: str, final_step: int):
    """Per label: the first eval step whose mean `metric` ≤ the reference's mean at `final_step` (lower is better),
    both means over the same seeds S: those the label and the reference have both finished (a value at final_step),
    so a schedule with fewer seeds is not measured against other seeds' mean. fraction_of_reference: that step divided
    by the reference's first-reach step, the first eval step at which the reference's own mean over S is at or below
    its value at final_step (final_step itself unless the reference got there earlier). NaN step when never reached;
    NaN target when S is empty. Non-finite values (diverged runs) count as not logged."""
    import numpy as np
    import pandas as pd
    data = summary[np.isfinite(summary[metric])]
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


def diverged_runs(summary, metric: str, final_step: int):
    """The runs (label, seed) that reached `final_step` with no finite `metric` there (NaN or inf: a diverged model's
    samples score so), in the summary's order (a DataFrame)."""
    import numpy as np
    at_end = summary[summary["step"] == final_step]
    finite = at_end.assign(finite=np.isfinite(at_end[metric])).groupby(["label", "seed"], sort=False)["finite"].any()
    return finite[~finite].reset_index()[["label", "seed"]]


def paired_with_reference(summary, metric: str, reference: str, final_step: int):
    """Per label at `final_step`: `metric` per seed (NaN for a diverged seed, listed in `diverged`), and the paired
    difference d_s = m_s − m_s(reference) over the seeds both have a finite value for: mean ± 95% Student-t
    half-width, and how many d_s < 0 (a DataFrame, one row per label)."""
    import numpy as np
    import pandas as pd
    final = summary[summary["step"] == final_step]
    finite = final[np.isfinite(final[metric])]
    diverged = diverged_runs(summary, metric, final_step)
    labels = list(dict.fromkeys(list(finite["label"]) + list(diverged["label"])))
    values = finite.pivot_table(index="label", columns="seed", values=metric, sort=False)
    values = values.reindex(index=labels, columns=sorted(set(final["seed"])))       # seed0, seed1, ... in order
    rows = []
    for label in values.index:
        diffs = (values.loc[label] - values.loc[reference]).dropna() if reference in values.index else []
        mean, half, n = mean_ci(diffs)
        rows.append({"label": label, **{f"seed{int(s)}": values.loc[label, s] for s in values.columns},
                     "reference": reference, "diff_mean": mean, "diff_ci95": half, "paired_seeds": n,
                     "seeds_below": int(sum(d < 0 for d in diffs)),
                     "diverged": [int(s) for s in diverged.loc[diverged["label"] == label, "seed"]]})
    return pd.DataFrame(rows)
