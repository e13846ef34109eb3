"""A comparison's results.md: the final-step table, the metric per eval step, per guidance scale and per seed
(paired with the reference), the steps to the reference's final value and the per-condition spread."""
import re
from pathlib import Path

from adaptive_sched import config as cfg
from adaptive_sched.atomic import atomic_write_text
from adaptive_sched.compare_config import final_step as final_step_of
from adaptive_sched.compare_stats import format_ci, mean_ci
from adaptive_sched.conditioning import GUIDED_METRICS


def md_cell(text) -> str:
    """`text` safe in a markdown table cell: '|' escaped as '\\|' (a label may hold one)."""
    return str(text).replace("|", "\\|")


def spread_lines(spread) -> list[str]:
    """Markdown: do the per-condition schedules differ? The range of the condition medians (mean over seeds)
    against the seed-to-seed standard deviation of one condition's median (the noise floor)."""
    lines = ["", "## Per-condition schedules: spread of the medians λ(0.5 | c)", "",
             "| schedule | conditions | range of medians (mean ± 95% CI over seeds) | seed-to-seed std of a "
             "median (mean over conditions) | medians, seed mean (c = 0, 1, …) |", "|---|---|---|---|---|"]
    for label, group in spread.groupby("label", sort=False):
        ranges = group.groupby("seed")["median_logsnr"].agg(lambda m: m.max() - m.min())
        mean, half, n = mean_ci(ranges)
        noise = group.groupby("condition")["median_logsnr"].std(ddof=1).mean()
        medians = group.groupby("condition")["median_logsnr"].mean()
        lines.append(f"| {md_cell(label)} | {len(medians)} | {format_ci(mean, half, n=n, digits=3)} | "
                     f"{noise:.3g} | {', '.join(f'{m:.2f}' for m in medians)} |")
    return lines


def budget_table(curve, metric: str, order) -> list[str]:
    """Markdown lines: `metric` (mean ± CI over seeds) at every eval step, one row per schedule."""
    steps = sorted(int(v) for v in curve["step"].unique())
    if len(steps) < 2:
        return []
    cells = {(r["label"], int(r["step"])): format_ci(r["mean"], r["ci95"], n=r["seeds"]) for _, r in curve.iterrows()}
    lines = ["", f"## {metric} at each eval step (training budget)", "",
             "| schedule | " + " | ".join(str(s) for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for label in order:
        lines.append(f"| {md_cell(label)} | " + " | ".join(cells.get((label, s), "") for s in steps) + " |")
    return lines


def guidance_table(final, metric: str, order) -> list[str]:
    """Markdown lines: the sample metric (FID for images, else SWD) at every guidance scale, one row per schedule
    (the paper's table layout: Hang & Gu 2024, Table 1)."""
    base = metric.split("@")[0] if metric.split("@")[0] in GUIDED_METRICS else "eval_fid"
    if not (final["metric"].str.startswith(base + "@w")).any():
        base = "eval_swd"
    scales = sorted({m.split("@w")[1] for m in final["metric"] if m.startswith(base + "@w")}, key=float)
    if len(scales) < 2:
        return []
    cells = {(r["label"], r["metric"]): format_ci(r["mean"], r["ci95"], n=r["seeds"]) for _, r in final.iterrows()}
    lines = ["", f"## {base} by classifier-free guidance scale w (final step)", "",
             "| schedule | " + " | ".join(f"w = {w}" for w in scales) + " |", "|---" * (len(scales) + 1) + "|"]
    for label in order:
        lines.append(f"| {md_cell(label)} | " + " | ".join(cells.get((label, f"{base}@w{w}"), "") for w in scales)
                     + " |")
    return lines


def per_seed_lines(paired, metric: str, final_step: int, order) -> list[str]:
    """Markdown lines: `metric` per seed at the final step and its paired difference from the reference (the rows of
    compare_stats.paired_with_reference; a diverged seed says so); a difference's interval that excludes 0 is what
    "below in every seed" needs."""
    if paired is None or not len(paired):
        return []
    seeds = [c for c in paired.columns if re.fullmatch(r"seed\d+", c)]          # seed0, seed1, ... (not seeds_below)
    reference = paired["reference"].iloc[0]
    rows = paired.set_index("label")
    ref = md_cell(reference)
    lines = ["", f"## {metric} per seed at step {final_step}, paired with {reference}", ""]
    if reference not in rows.index:
        lines += [f"({reference} has no run at step {final_step} yet: no paired differences.)", ""]
    lines += ["| schedule | " + " | ".join(seeds) + f" | − {ref} (mean ± 95% CI over paired seeds) | "
              f"seeds below {ref} |", "|---" * (len(seeds) + 3) + "|"]
    for label in [o for o in order if o in rows.index]:
        r = rows.loc[label]
        diverged = {f"seed{s}" for s in r.get("diverged", [])}
        cells = ["diverged" if s in diverged else "" if r[s] != r[s] else f"{r[s]:.4g}" for s in seeds]
        diff = "–" if label == reference or r["paired_seeds"] == 0 else \
            format_ci(r["diff_mean"], r["diff_ci95"], n=r["paired_seeds"], digits=3, signed=True)
        below = "–" if label == reference else f"{r['seeds_below']} of {r['paired_seeds']}"
        lines.append(f"| {md_cell(label)} | " + " | ".join(cells) + f" | {diff} | {below} |")
    return lines


def seeds_cell(n: int, planned: int | None, diverged: int) -> str:
    """The main table's seeds cell: 'n', 'n of planned' when fewer, then ', k diverged' when some diverged."""
    text = f"{n} of {planned}" if planned and n < planned else str(n)
    return text + (f", {diverged} diverged" if diverged else "")


def write_results_md(out: Path, aggregates, metric: str, base: cfg.RunConfig, target: str,
                     floor: float | None = None, reached=None, spread=None, paired: dict | None = None,
                     planned_seeds: int | None = None, diverged=None) -> None:
    """A markdown table of every eval metric at the final step (compare_config.final_step: [train] steps; mean ± 95%
    CI over seeds), sorted by `metric`; a schedule with fewer finished seeds than `planned_seeds` says so ("1 of 3"),
    and a note under the table says its mean is over other seeds than the others'. `diverged` (the runs of
    compare_stats.diverged_runs: finished, `metric` not finite) are counted in their rows and listed under the table;
    a schedule whose every finished run diverged reads "diverged", one with no run at the final step "unfinished"."""
    final_step = final_step_of(base)
    final = aggregates[aggregates["step"] == final_step]
    names = [metric] + [m for m in final["metric"].unique() if m != metric and "@w" not in m]
    table = final.pivot(index="label", columns="metric", values=["mean", "ci95", "seeds"])
    ranked = list(table[("mean", metric)].dropna().sort_values().index) if ("mean", metric) in table else []
    broke = {} if diverged is None else diverged.groupby("label", sort=False)["seed"].apply(list).to_dict()
    failed = [label for label in broke if label not in ranked]              # finished, and every run diverged
    unfinished = [label for label in aggregates["label"].unique() if label not in ranked + failed]   # no final run
    order = ranked + failed + unfinished

    def cells(label: str) -> list[str]:
        row = table.loc[label] if label in table.index else None
        return ["" if row is None or ("mean", m) not in row else format_ci(row["mean", m], row["ci95", m],
                                                                          n=row["seeds", m]) for m in names]

    lines = [f"# Eval metrics at step {final_step} (mean ± 95% CI over seeds; lower is better; sorted by {metric})",
             "", f"data={base.data.name}, model={base.model.name} {base.model.params or ''}, "
             f"steps={base.train.steps}, batch={base.train.batch_size}, lr={base.train.lr}, "
             f"{target}, weighting={base.weighting.name}, sampler={base.eval.sampler} "
             f"{base.eval.sample_steps} steps on the {base.eval.grid} grid"
             + (", x̂0 clipped to [-1, 1]" if base.eval.clip_x0 else ""), "",
             "| schedule | " + " | ".join(names) + " | seeds |", "|---" * (len(names) + 2) + "|"]
    for label in ranked:
        n = int(table.loc[label, ("seeds", metric)])
        lines.append(f"| {md_cell(label)} | " + " | ".join(cells(label)) +
                     f" | {seeds_cell(n, planned_seeds, len(broke.get(label, [])))} |")
    for label in failed:
        lines.append(f"| {md_cell(label)} | " + " | ".join(["diverged"] + cells(label)[1:]) +
                     f" | {seeds_cell(0, planned_seeds, len(broke[label]))} |")
    for label in unfinished:
        lines.append(f"| {md_cell(label)} | " + " | ".join("" for _ in names) + " | 0 (unfinished) |")
    counts = {int(table.loc[label, ("seeds", metric)]) for label in ranked}
    if len(counts) > 1:
        lines += ["", "Not every schedule has finished as many seeds: the means above are over different seed sets, "
                      "so their order is not a like-for-like ranking (the differences from the reference per seed, "
                      "where listed below, pair schedules on the seeds both have)."]
    if broke:
        runs = [f"{label} seed {seed}" for label, seeds in broke.items() for seed in seeds]
        lines += ["", f"{len(runs)} run(s) diverged: their training stopped on non-finite losses (diverged.json), or "
                      f"{metric} at step {final_step} is not finite (NaN or inf): {', '.join(runs)}. They are left out "
                      f"of the means and not retrained."]
    lines += budget_table(aggregates[aggregates["metric"] == metric], metric, order)
    lines += guidance_table(final, metric, order)
    for name, rows in (paired or {}).items():       # metric name -> compare_stats.paired_with_reference's rows
        lines += per_seed_lines(rows, name, final_step, order)
    if reached is not None and len(reached):
        reference = reached["reference"].iloc[0]
        ref = md_cell(reference)
        lines += ["", f"## Steps to reach {reference}'s final {metric}", "",
                  f"Each schedule against {reference}'s mean at step {final_step} over the seeds both have finished; "
                  f"the fraction divides its step by the first step at which {reference} itself reaches that mean.",
                  "", f"| schedule | seeds | {ref}'s final (same seeds) | step | fraction of {ref}'s first step "
                      f"there |", "|---|---|---|---|---|"]
        for _, r in reached.iterrows():
            label = md_cell(r["label"])
            if r["seeds"] == 0:
                lines.append(f"| {label} | 0 | – | no finished seed shared with {ref} | – |")
            elif r["step"] == r["step"]:
                lines.append(f"| {label} | {r['seeds']} | {r['target']:.4g} | {int(r['step'])} | "
                             f"{r['fraction_of_reference']:.2f} |")
            else:
                lines.append(f"| {label} | {r['seeds']} | {r['target']:.4g} | not reached | – |")
    if spread is not None and len(spread):
        lines += spread_lines(spread)
    if floor is not None:
        lines += ["", f"eval_swd floor (training data against held-out data, same n): {floor:.4g}"]
    lines += ["", "eval_excess_mse: held-out ε-MSE above the exact denoiser's (gmm only), mean over λ in "
              f"[{base.eval.logsnr_lo}, {base.eval.logsnr_hi}]; eval_eps_mse: the same without subtracting it; "
              "eval_swd: sliced Wasserstein-1 between samples and held-out data; eval_fid / eval_kid: Fréchet and "
              "kernel distances of sample features to held-out features (feature net in the run's eval_features.json); "
              "eval_bpd: the VLB in bits/dim on held-out data (independent of the training schedule)."]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
