"""compare_report: the per-seed table of results.md, paired with the reference."""
import pandas as pd

from adaptive_sched.compare_stats import paired_with_reference
from adaptive_sched.compare_report import per_seed_lines


def test_per_seed_lines_list_each_seed_and_the_paired_difference():
    rows = [{"label": label, "seed": seed, "step": 50, "eval_fid": v}
            for label, vs in {"cosine": [2.0, 3.0], "laplace": [1.0, 2.5]}.items() for seed, v in enumerate(vs)]
    paired = paired_with_reference(pd.DataFrame(rows), "eval_fid", "cosine")
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
    assert format_ci(0.5, math.nan) == "0.5 (n = 1)" and format_ci(math.nan, math.nan) == ""
    aggregates = pd.DataFrame([
        {"label": "cosine", "step": 50, "metric": "eval_fid", "mean": 3.0, "ci95": 0.5, "seeds": 2},
        {"label": "cosine", "step": 100, "metric": "eval_fid", "mean": 2.0, "ci95": 0.25, "seeds": 2},
        {"label": "laplace", "step": 50, "metric": "eval_fid", "mean": 2.5, "ci95": math.nan, "seeds": 1},
        {"label": "laplace", "step": 100, "metric": "eval_fid", "mean": 1.5, "ci95": math.nan, "seeds": 1},
        {"label": "learned", "step": 50, "metric": "eval_fid", "mean": 2.8, "ci95": 0.1, "seeds": 2}])
    write_results_md(tmp_path, aggregates, "eval_fid", cfg.RunConfig(), "target v")
    text = (tmp_path / "results.md").read_text()
    assert "| laplace | 1.5 (n = 1) | 1 |" in text and "| cosine | 2 ± 0.25 | 2 |" in text
    assert "the means above are over different seed sets" in text         # laplace ranks first on one seed
    write_results_md(tmp_path, aggregates, "eval_fid", cfg.RunConfig(), "target v", planned_seeds=2)
    assert "| laplace | 1.5 (n = 1) | 1 of 2 |" in (tmp_path / "results.md").read_text()
    same = aggregates[aggregates["label"] == "cosine"]
    write_results_md(tmp_path, same, "eval_fid", cfg.RunConfig(), "target v", planned_seeds=2)
    assert "different seed sets" not in (tmp_path / "results.md").read_text()
    assert "| learned |  | 0 (unfinished) |" in text                  # no run at step 100 yet, still listed
    assert "| learned | 2.8 ± 0.1 |  |" in text                        # and its step-50 value in the budget table
    paired = paired_with_reference(pd.DataFrame([{"label": "laplace", "seed": 0, "step": 100, "eval_fid": 1.5}]),
                                   "eval_fid", "cosine")
    lines = per_seed_lines(paired, "eval_fid", 100, ["laplace"])
    assert lines[3] == "(cosine has no run at step 100 yet: no paired differences.)"        # above the table
    assert lines[5].startswith("| schedule |") and lines[7].startswith("| laplace | 1.5 |")
    with_nan = pd.concat([aggregates, pd.DataFrame([{"label": "learned", "step": 100, "metric": "eval_fid",
                                                     "mean": float("nan"), "ci95": float("nan"), "seeds": 0}])])
    write_results_md(tmp_path, with_nan, "eval_fid", cfg.RunConfig(), "target v")     # no value there: unfinished
    assert "| learned |  | 0 (unfinished) |" in (tmp_path / "results.md").read_text()
