"""compare_report: the per-seed table of results.md, paired with the reference."""
import pandas as pd

from adaptive_sched.compare import paired_with_reference
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
