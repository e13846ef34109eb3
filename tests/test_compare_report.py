"""compare_report: the per-seed table of results.md, paired with the reference."""
import pandas as pd

from adaptive_sched.compare_stats import paired_with_reference
from adaptive_sched.compare_report import per_seed_lines


def test_per_seed_lines_list_each_seed_and_the_paired_difference():
    rows = [{"label": label, "seed": seed, "step": 50, "eval_fid": v}
            for label, vs in {"cosine": [2.0, 3.0], "laplace": [1.0, 2.5]}.items() for seed, v in enumerate(vs)]
    paired = paired_with_reference(pd.DataFrame(rows), "eval_fid", "cosine", 50)
    lines = per_seed_lines(paired, "eval_fid", 50, ["laplace", "cosine"])
    assert lines[1] == "## eval_fid per seed at step 50, paired with cosine"
    assert lines[3] == ("| schedule | seed0 | seed1 | − cosine (mean ± 95% CI over paired seeds) | "
                        "seeds below cosine |")
    # paired differences -1.0 and -0.5: mean -0.75, half-width t(0.975, 1) * 0.3536 / sqrt(2) = 3.2
    assert lines[5] == "| laplace | 1 | 2.5 | -0.75 ± 3.2 | 2 of 2 |"
    assert lines[6] == "| cosine | 2 | 3 | – | – |"
    assert per_seed_lines(paired.iloc[:0], "eval_fid", 50, ["cosine"]) == []
    # only seed<k> columns are seeds: another column that starts with "seed" is not one
    assert per_seed_lines(paired.assign(seeds_total=2, seed_note="x"), "eval_fid", 50, ["laplace"])[5] == lines[5]


def test_one_seed_has_no_interval_and_unfinished_schedules_keep_their_rows(tmp_path):
    import math

    from adaptive_sched import config as cfg
    from adaptive_sched.compare_stats import format_ci, mean_ci
    from adaptive_sched.compare_report import write_results_md
    assert mean_ci([0.5])[0] == 0.5 and math.isnan(mean_ci([0.5])[1])
    assert format_ci(0.5, math.nan, n=1) == "0.5 (n = 1)" and format_ci(math.nan, math.nan, n=0) == ""
    aggregates = pd.DataFrame([
        {"label": "cosine", "step": 50, "metric": "eval_fid", "mean": 3.0, "ci95": 0.5, "seeds": 2},
        {"label": "cosine", "step": 100, "metric": "eval_fid", "mean": 2.0, "ci95": 0.25, "seeds": 2},
        {"label": "laplace", "step": 50, "metric": "eval_fid", "mean": 2.5, "ci95": math.nan, "seeds": 1},
        {"label": "laplace", "step": 100, "metric": "eval_fid", "mean": 1.5, "ci95": math.nan, "seeds": 1},
        {"label": "learned", "step": 50, "metric": "eval_fid", "mean": 2.8, "ci95": 0.1, "seeds": 2}])
    base = cfg.from_dict({"train": {"steps": 100}})                  # the final step: [train] steps
    write_results_md(tmp_path, aggregates, "eval_fid", base, "target v")
    text = (tmp_path / "results.md").read_text()
    assert "| laplace | 1.5 (n = 1) | 1 |" in text and "| cosine | 2 ± 0.25 | 2 |" in text
    assert "the means above are over different seed sets" in text         # laplace ranks first on one seed
    write_results_md(tmp_path, aggregates, "eval_fid", base, "target v", planned_seeds=2)
    assert "| laplace | 1.5 (n = 1) | 1 of 2 |" in (tmp_path / "results.md").read_text()
    same = aggregates[aggregates["label"] == "cosine"]
    write_results_md(tmp_path, same, "eval_fid", base, "target v", planned_seeds=2)
    assert "different seed sets" not in (tmp_path / "results.md").read_text()
    assert "| learned |  | 0 (unfinished) |" in text                  # no run at step 100 yet, still listed
    assert "| learned | 2.8 ± 0.1 |  |" in text                        # and its step-50 value in the budget table
    paired = paired_with_reference(pd.DataFrame([{"label": "laplace", "seed": 0, "step": 100, "eval_fid": 1.5}]),
                                   "eval_fid", "cosine", 100)
    lines = per_seed_lines(paired, "eval_fid", 100, ["laplace"])
    assert lines[3] == "(cosine has no run at step 100 yet: no paired differences.)"        # above the table
    assert lines[5].startswith("| schedule |") and lines[7].startswith("| laplace | 1.5 |")
    with_nan = pd.concat([aggregates, pd.DataFrame([{"label": "learned", "step": 100, "metric": "eval_fid",
                                                     "mean": float("nan"), "ci95": float("nan"), "seeds": 0}])])
    write_results_md(tmp_path, with_nan, "eval_fid", base, "target v")     # no value there: unfinished
    assert "| learned |  | 0 (unfinished) |" in (tmp_path / "results.md").read_text()


def test_a_nan_interval_over_several_seeds_is_not_called_one_seed(tmp_path):
    """format_ci read a NaN half-width as "n = 1"; it takes n now, and a NaN interval over n >= 2 says so."""
    import math

    from adaptive_sched import config as cfg
    from adaptive_sched.compare_report import write_results_md
    from adaptive_sched.compare_stats import format_ci
    assert format_ci(2.0, math.nan, n=3) == "2 (no interval)"
    assert format_ci(2.0, math.nan, n=1) == "2 (n = 1)" and format_ci(2.0, 0.25, n=3) == "2 ± 0.25"
    assert format_ci(-0.5, 0.125, n=2, digits=3, signed=True) == "-0.5 ± 0.12"
    aggregates = pd.DataFrame([{"label": "cosine", "step": s, "metric": "eval_fid", "mean": 2.0, "ci95": math.nan,
                                "seeds": 3} for s in (50, 100)])
    write_results_md(tmp_path, aggregates, "eval_fid", cfg.from_dict({"train": {"steps": 100}}), "target v")
    text = (tmp_path / "results.md").read_text()
    assert "| cosine | 2 (no interval) | 3 |" in text and "| cosine | 2 (no interval) | 2 (no interval) |" in text
    assert "n = 1" not in text


def test_the_final_step_is_train_steps_in_every_table(tmp_path):
    """results.md took the last logged step as final (here 50) while steps_to_target used [train] steps (100)."""
    from adaptive_sched import config as cfg
    from adaptive_sched.compare_report import write_results_md
    aggregates = pd.DataFrame([{"label": label, "step": 50, "metric": "eval_fid", "mean": v, "ci95": 0.1, "seeds": 2}
                               for label, v in (("cosine", 3.0), ("laplace", 2.0))])
    write_results_md(tmp_path, aggregates, "eval_fid", cfg.from_dict({"train": {"steps": 100}}), "target v")
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("# Eval metrics at step 100 ")
    assert "| cosine |  | 0 (unfinished) |" in text and "| laplace |  | 0 (unfinished) |" in text


def test_a_label_with_a_pipe_keeps_every_table_row_whole(tmp_path):
    """'|' in a label split its cells: every row of results.md's tables has as many cells as its header."""
    import re

    from adaptive_sched import config as cfg
    from adaptive_sched.compare_report import write_results_md
    from adaptive_sched.compare_stats import steps_to_target
    labels = ["cos|ine", "a | b"]
    summary = pd.DataFrame([{"label": label, "seed": seed, "step": step, "eval_fid": 3.0 - k + seed - step / 100}
                            for k, label in enumerate(labels) for seed in (0, 1) for step in (50, 100)])
    aggregates = pd.DataFrame([{"label": label, "step": step, "metric": "eval_fid", "mean": 2.0 - k, "ci95": 0.5,
                                "seeds": 2} for k, label in enumerate(labels) for step in (50, 100)])
    write_results_md(tmp_path, aggregates, "eval_fid", cfg.from_dict({"train": {"steps": 100}}), "target v",
                     reached=steps_to_target(summary, "eval_fid", "cos|ine", 100),
                     paired={"eval_fid": paired_with_reference(summary, "eval_fid", "cos|ine", 100)})
    text = (tmp_path / "results.md").read_text()
    assert "| a \\| b | 1 ± 0.5 | 2 |" in text and "| cos\\|ine | 2 ± 0.5 | 2 |" in text
    tables = [[line for line in block.splitlines() if line.startswith("|")] for block in text.split("\n\n")]
    tables = [rows for rows in tables if rows]
    assert len(tables) == 4                                   # final step, budget, per seed, steps to target
    for rows in tables:
        widths = {len(re.split(r"(?<!\\)\|", row)) for row in rows}
        assert len(widths) == 1, rows


def test_a_diverged_seed_is_named_in_the_per_seed_table_and_left_out_of_the_statistics():
    """An inf (SWD of samples with an inf) entered the paired mean and counted as a seed below the reference."""
    import math

    from adaptive_sched.compare_stats import diverged_runs, mean_ci, steps_to_target
    rows = [{"label": label, "seed": seed, "step": step, "eval_swd": v if step == 100 else v + 1}
            for label, vs in {"cosine": [2.0, 3.0, 2.5], "laplace": [1.0, -math.inf, math.nan]}.items()
            for seed, v in enumerate(vs) for step in (50, 100)]
    summary = pd.DataFrame(rows)
    assert diverged_runs(summary, "eval_swd", 100).values.tolist() == [["laplace", 1], ["laplace", 2]]
    assert mean_ci([1.0, math.inf, 3.0, math.nan])[::2] == (2.0, 2)
    paired = paired_with_reference(summary, "eval_swd", "cosine", 100).set_index("label")
    assert paired.loc["laplace", "paired_seeds"] == 1 and paired.loc["laplace", "seeds_below"] == 1
    assert paired.loc["laplace", "diff_mean"] == -1.0 and paired.loc["laplace", "diverged"] == [1, 2]
    lines = per_seed_lines(paired.reset_index(), "eval_swd", 100, ["laplace", "cosine"])
    assert lines[5] == "| laplace | 1 | diverged | diverged | -1 (n = 1) | 1 of 1 |"
    reached = steps_to_target(summary, "eval_swd", "cosine", 100).set_index("label")
    assert reached.loc["laplace", "seeds"] == 1 and reached.loc["laplace", "target"] == 2.0
