"""compare: steps-to-target, budgets, concurrent processes agree with sequential runs, sample grids."""
import json
import math

import pandas as pd
import pytest

from adaptive_sched.compare import compare, parse
from adaptive_sched.compare_stats import steps_to_target
from adaptive_sched.errors import UsageError

TINY = """
[data]
name = "{data}"
n = 2000
dim = 4
[model]
name = "{model}"
{model_params}
[train]
steps = 40
batch_size = 64
log_every = 20
target = "v"
[eval]
every = 20
n = 100
sample_n = {sample_n}
sample_steps = 5
logsnr_points = 5
[compare]
seeds = [0]
metric = "eval_eps_mse"
schedules = [{{ name = "cosine" }}, {{ name = "laplace", b = 1.0 }}]
{extra}
"""


def write_config(tmp_path, data="gmm", model="mlp", model_params="hidden = 32\ndepth = 1", sample_n=0, extra=""):
    path = tmp_path / "cmp.toml"
    text = TINY.format(data=data, model=model, model_params=model_params, sample_n=sample_n, extra=extra)
    if data != "gmm":                           # n and dim set the gmm's size and dimension only
        text = text.replace("n = 2000\ndim = 4\n", "")
    path.write_text(text)
    return path


def compared(tmp_path):
    """(config, out) of the tiny two-schedule comparison, run to the end into tmp_path/out."""
    out, config = tmp_path / "out", write_config(tmp_path)
    compare(config, out, progress=False)
    return config, out


def summary_rows(curves: dict, steps=(10, 20, 30, 40)) -> pd.DataFrame:
    """A tidy summary from {label: {seed: [metric at each step]}} (a shorter list: a run stopped early)."""
    return pd.DataFrame([{"label": label, "seed": seed, "step": step, "eval_fid": v}
                         for label, seeds in curves.items() for seed, vs in seeds.items()
                         for step, v in zip(steps, vs)])


def test_steps_to_target_finds_the_first_step_at_or_below_the_reference_final_mean():
    summary = summary_rows({"cos": {0: [4.0, 3.0, 2.5, 2.0], 1: [4.2, 3.2, 2.7, 2.2]},
                            "lap": {0: [3.0, 2.0, 1.5, 1.0], 1: [3.0, 2.2, 1.5, 1.0]},
                            "bad": {0: [9, 8, 7, 6], 1: [9, 8, 7, 6]}})
    reached = steps_to_target(summary, "eval_fid", "cos", 40).set_index("label")
    assert list(reached["target"]) == pytest.approx([2.1] * 3) and (reached["seeds"] == 2).all()
    assert reached.loc["cos", "step"] == 40 and reached.loc["cos", "fraction_of_reference"] == 1.0
    assert reached.loc["lap", "step"] == 20 and reached.loc["lap", "fraction_of_reference"] == 0.5
    assert math.isnan(reached.loc["bad", "step"])


def test_steps_to_target_compares_means_over_the_seeds_both_have_finished():
    # cauchy has seed 0 only: against cosine's seed 0 (2.0) it never gets there, though its 2.05 is below the mean
    # of cosine's two seeds (2.1); a run stopped at step 20 (seed 1 of lap) is left out; an unfinished reference
    # gives no target (it is no "final" value)
    summary = summary_rows({"cos": {0: [4.0, 3.0, 2.5, 2.0], 1: [4.2, 3.2, 2.7, 2.2]},
                            "cau": {0: [3.9, 2.9, 2.4, 2.05]},
                            "lap": {0: [3.0, 1.9, 1.5, 1.0], 1: [1.0, 1.0]}})
    reached = steps_to_target(summary, "eval_fid", "cos", 40).set_index("label")
    assert reached.loc["cau", "seeds"] == 1 and reached.loc["cau", "target"] == 2.0
    assert math.isnan(reached.loc["cau", "step"])
    assert reached.loc["lap", "seeds"] == 1 and reached.loc["lap", "step"] == 20       # seed 0's own curve
    unfinished = summary[~((summary["label"] == "cos") & (summary["step"] == 40))]
    reached = steps_to_target(unfinished, "eval_fid", "cos", 40).set_index("label")
    assert (reached["seeds"] == 0).all() and reached["target"].isna().all() and reached["step"].isna().all()


def test_compare_options_are_validated(tmp_path):
    assert parse(write_config(tmp_path, extra='jobs = 2\nreference = "laplace(b=1.0)"')).jobs == 2
    with pytest.raises(UsageError, match="reference 'linear' is not one of the labels"):
        parse(write_config(tmp_path, extra='reference = "linear"'))
    with pytest.raises(UsageError, match="jobs must be an integer >= 1"):
        parse(write_config(tmp_path, extra="jobs = 0"))


def test_a_metric_no_run_would_log_is_refused_before_any_run(tmp_path):
    """eval_swd without samples, eval_fid on vectors: every run would train to the end and the report find nothing."""
    for sample_n, metric, message in ((0, "eval_swd", "needs samples at each eval"),
                                      (16, "eval_fid", "needs image data and a feature network")):
        path = write_config(tmp_path, sample_n=sample_n)
        path.write_text(path.read_text().replace('metric = "eval_eps_mse"', f'metric = "{metric}"'))
        with pytest.raises(UsageError, match=message):
            compare(path, tmp_path / "out", progress=False)
        assert not (tmp_path / "out" / "runs").exists()
    path = write_config(tmp_path, sample_n=16)
    path.write_text(path.read_text().replace('metric = "eval_eps_mse"', 'metric = "eval_swd"'))
    assert parse(path).metric == "eval_swd"
    from adaptive_sched.run_checks import check_metric_logged
    with pytest.raises(UsageError, match="metric eval_fid needs image data"):       # a guided metric's needs
        check_metric_logged(parse(path).base, "eval_fid@w1.5")


def test_a_bad_learned_objective_or_weighting_is_refused_before_any_run(tmp_path):
    """Not at the start of that row's run, perhaps an hour into the comparison."""
    learned = 'schedules = [{ name = "cosine" }, { name = "learned", objective = "%s" }]\n'
    for objective, weighting, message in (("magic", "", "unknown schedule objective 'magic'"),
                                          ("variance", '[weighting]\nname = "eps"\n', "needs an absolute weighting")):
        path = write_config(tmp_path)
        text = path.read_text().replace('schedules = [{ name = "cosine" }, { name = "laplace", b = 1.0 }]\n',
                                        learned % objective)
        path.write_text(weighting + text)
        with pytest.raises(UsageError, match=message):
            parse(path)
        with pytest.raises(UsageError, match=message):
            compare(path, tmp_path / "out", progress=False)
        assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.slow
def test_two_processes_at_once_reproduce_the_sequential_runs(tmp_path):
    config = write_config(tmp_path)
    compare(config, tmp_path / "seq", progress=False)
    compare(config, tmp_path / "par", progress=False, jobs=2)
    a, b = pd.read_csv(tmp_path / "seq" / "summary.csv"), pd.read_csv(tmp_path / "par" / "summary.csv")
    assert list(a["label"]) == list(b["label"]) and list(a["step"]) == list(b["step"])
    assert (a["loss"] - b["loss"]).abs().max() < 1e-5
    assert (a["eval_eps_mse"] - b["eval_eps_mse"]).abs().max() < 1e-5
    reached = pd.read_csv(tmp_path / "par" / "steps_to_target.csv")
    assert list(reached["label"]) == ["cosine", "laplace(b=1.0)"] and reached["step"].iloc[0] == 40
    text = (tmp_path / "par" / "results.md").read_text()
    assert "Steps to reach cosine's final eval_eps_mse" in text and "at each eval step" in text
    assert "## eval_eps_mse per seed at step 40, paired with cosine" in text
    final = b[b["step"] == 40].set_index("label")["eval_eps_mse"]
    assert f"| laplace(b=1.0) | {final['laplace(b=1.0)']:.4g} | " in text     # one seed: no interval


@pytest.mark.slow
def test_image_compare_draws_one_sample_panel_per_schedule(tmp_path):
    config = write_config(tmp_path, data="digits", model="unet",
                          model_params="channels = [8]\nemb_dim = 16\nmid_blocks = 0", sample_n=16,
                          extra="samples = 16")
    out = compare(config, tmp_path / "out", progress=False)
    assert (out / "samples.png").stat().st_size > 1000


def test_targets_multiply_the_grid_and_set_each_runs_target(tmp_path):
    from adaptive_sched.compare import run_config, run_dir_of, run_label
    plan = parse(write_config(tmp_path, extra='targets = ["eps", "x0", "v"]'))
    labels = [run_label(e) for e in plan.entries]
    assert labels == ["cosine [eps]", "cosine [x0]", "cosine [v]", "laplace(b=1.0) [eps]", "laplace(b=1.0) [x0]",
                      "laplace(b=1.0) [v]"]
    assert [run_config(plan.base, e, 0).train.target for e in plan.entries] == ["eps", "x0", "v"] * 2
    assert run_config(plan.base, plan.entries[4], 0).schedule.params == {"b": 1.0}
    assert len({run_dir_of(tmp_path, e, 0) for e in plan.entries}) == 6
    with pytest.raises(UsageError, match="targets must be a list"):
        parse(write_config(tmp_path, extra='targets = ["score"]'))
    from adaptive_sched.compare import target_text
    assert target_text(plan) == "target per run (eps, x0, v: see the labels)"
    assert target_text(parse(write_config(tmp_path))) == f"target={plan.base.train.target}"


def test_an_entry_can_take_its_schedule_from_a_sweeps_best_json(tmp_path):
    import json
    best = tmp_path / "sweep" / "best.json"
    best.parent.mkdir()
    best.write_text(json.dumps({"compare_entry": {"name": "laplace", "label": "laplace (tuned)", "mu": 0.25,
                                                  "b": 0.3}}))
    config = write_config(tmp_path).read_text().replace(
        '{ name = "laplace", b = 1.0 }', '{ best = "sweep/best.json" }, { best = "sweep/best.json", label = "again" }')
    path = tmp_path / "cmp.toml"
    path.write_text(config)
    plan = parse(path)                              # relative to the TOML file when not found from the cwd
    assert plan.entries[1] == {"name": "laplace", "label": "laplace (tuned)", "mu": 0.25, "b": 0.3}
    assert plan.entries[2]["label"] == "again" and plan.entries[2]["b"] == 0.3
    from adaptive_sched.compare import run_config
    assert run_config(plan.base, plan.entries[1], 0).schedule.params == {"mu": 0.25, "b": 0.3}
    best.write_text(json.dumps({"pareto": []}))
    with pytest.raises(UsageError, match="holds no single best schedule"):
        parse(path)
    best.unlink()
    with pytest.raises(UsageError, match="no such file \\(run the sweep first"):
        parse(path)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failed_run_does_not_stop_the_others(tmp_path, jobs):
    # the cosine run's directory holds a checkpoint ahead of its (lost) metrics: resume refuses it, laplace still runs
    from adaptive_sched.compare import run_config, run_dir_of
    from adaptive_sched.train import train
    config = write_config(tmp_path)
    plan = parse(config)
    broken = run_dir_of(tmp_path / "out", plan.entries[0], 0)
    train(run_config(plan.base, plan.entries[0], 0), broken, progress=False)
    (broken / "metrics.csv").unlink()
    (broken / "finished.json").unlink()
    with pytest.raises(UsageError, match=r"1 of 2 runs failed \(first: cosine seed 0"):
        compare(config, tmp_path / "out", progress=False, jobs=jobs)
    assert (run_dir_of(tmp_path / "out", plan.entries[1], 0) / "finished.json").exists()


def test_paired_differences_match_scipys_paired_t_interval():
    from scipy import stats
    from adaptive_sched.compare_stats import paired_with_reference
    fid = {"cos": [4.6, 4.2, 4.3], "lap": [8.8, 8.6, 4.0], "cau": [4.5, 4.1, 4.25]}
    rows = [{"label": label, "seed": seed, "step": step, "eval_fid": v + (10 if step == 100 else 0)}
            for label, vs in fid.items() for seed, v in enumerate(vs) for step in (100, 200)]
    rows.append({"label": "cau", "seed": 3, "step": 200, "eval_fid": 1.0})     # no cosine seed 3 to pair with
    paired = paired_with_reference(pd.DataFrame(rows), "eval_fid", "cos", 200).set_index("label")
    for label in ("lap", "cau"):
        test = stats.ttest_rel(fid[label], fid["cos"])
        low, high = test.confidence_interval(0.95)
        assert paired.loc[label, "diff_mean"] == pytest.approx((low + high) / 2, rel=1e-12)
        assert paired.loc[label, "diff_ci95"] == pytest.approx((high - low) / 2, rel=1e-12)
        assert paired.loc[label, "paired_seeds"] == 3
    assert paired.loc["cau", "seeds_below"] == 3 and paired.loc["lap", "seeds_below"] == 1
    assert paired.loc["cau", "seed3"] == 1.0 and math.isnan(paired.loc["cos", "seed3"])
    assert list(paired.loc["lap", ["seed0", "seed1", "seed2"]]) == fid["lap"]           # the final step's values
    assert paired.loc["cos", "diff_mean"] == 0 and paired.loc["cos", "seeds_below"] == 0


def test_a_guided_metric_is_listed_per_seed_at_every_guidance_scale():
    from adaptive_sched.compare_stats import per_seed_metrics
    summary = pd.DataFrame({"eval_fid": [1.0], "eval_fid@w1": [1.0], "eval_fid@w1.5": [1.0], "eval_swd@w1": [1.0],
                            "eval_fid@w3": [float("nan")]})
    assert per_seed_metrics(summary, "eval_fid@w1.5") == ["eval_fid@w1", "eval_fid@w1.5"]   # w3 never logged
    assert per_seed_metrics(summary, "eval_fid") == ["eval_fid"]


def test_runs_trained_with_other_settings_are_refused_before_anything_is_rewritten(tmp_path):
    """A comparison run again into its folder with a changed base setting, or a changed entry under the same label,
    is refused before any run or report: finished runs were skipped and results.md / compare.toml rewritten under
    settings their numbers do not come from."""
    out = tmp_path / "out"
    config = write_config(tmp_path)
    compare(config, out, progress=False)
    written = {name: (out / name).read_bytes() for name in ("compare.toml", "results.md", "summary.csv")}
    original = config.read_text()
    for changed, message in ((original.replace("[train]\n", "[train]\nlr = 0.01\n"),
                              r"cosine seed 0 in .*\(\[train\] lr was 0.001 in the saved run, now 0.01\)"),
                             (original.replace("hidden = 32", "hidden = 48"), r"\[model\] hidden was 32"),
                             (original.replace("b = 1.0 }", "b = 2.0, label = \"laplace_b=1.0\" }"),
                              r"laplace_b=1.0 seed 0 .*\(\[schedule\] b was 1.0 in the saved run, now 2.0\)")):
        config.write_text(changed)
        with pytest.raises(UsageError, match=message):
            compare(config, out, progress=False)
        assert {name: (out / name).read_bytes() for name in written} == written
    config.write_text(original.replace("steps = 40", "steps = 60"))     # more steps resume, as train --resume does
    compare(config, out, progress=False)
    assert pd.read_csv(out / "summary.csv")["step"].max() == 60


def test_a_run_saved_before_sample_labels_existed_counts_as_balanced_if_conditional():
    """Conditional evals drew equal class counts before [eval] sample_labels (default held_out) came in: a saved
    conditional config without the key resumes under "balanced" and is refused under "held_out"; an unconditional
    one, which draws no labels, under either."""
    from adaptive_sched import config as cfg
    from adaptive_sched.run_checks import check_resumable
    for conditional in (True, False):
        saved = cfg.RunConfig().to_dict()
        saved["train"]["conditional"] = conditional
        del saved["eval"]["sample_labels"]
        for labels in ("balanced", "held_out"):
            current = cfg.RunConfig().to_dict()
            current["train"]["conditional"] = conditional
            current["eval"]["sample_labels"] = labels
            if conditional and labels == "held_out":
                with pytest.raises(UsageError, match="sample_labels was 'balanced'"):
                    check_resumable(saved, current)
            else:
                check_resumable(saved, current)
    unconditional = cfg.RunConfig().to_dict()
    changed = cfg.RunConfig().to_dict()
    changed["train"]["p_uncond"] = 0.3                   # read by no unconditional run: no reason to refuse
    check_resumable(unconditional, changed)
    changed["train"]["conditional"] = True
    with pytest.raises(UsageError, match="conditional was False"):
        check_resumable(unconditional, changed)


def test_a_run_with_nothing_trained_to_keep_starts_again_under_the_new_settings(tmp_path, capsys):
    """A run killed before its first checkpoint (config.toml and a metrics header, no checkpoint) is not held to its
    old settings: train --resume restarts it from step 0 anyway. A config.toml that is not a run's is refused in
    one line (it was a traceback)."""
    from adaptive_sched.compare import run_dir_of
    out = tmp_path / "out"
    config = write_config(tmp_path)
    plan = parse(config)
    killed = run_dir_of(out, plan.entries[0], 0)
    killed.mkdir(parents=True)
    (killed / "config.toml").write_text("[train]\nlr = 0.5\n")
    (killed / "metrics.csv").write_text("step,loss\n")
    compare(config, out, progress=False)
    assert pd.read_csv(out / "summary.csv")["step"].max() == 40
    (killed / "config.toml").write_text('note = "mine"\n[train]\nlr = 0.001\n')
    with pytest.raises(UsageError, match=r"config.toml is not a run's config \(every top-level key is a"):
        compare(config, out, progress=False)


def test_a_second_compare_on_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    """Two calls at once trained the same runs into one metrics.csv, whose repeated rows read as a second seed with
    a zero-width interval."""
    import fcntl
    from adaptive_sched.compare import held_lock
    out = tmp_path / "out"
    with held_lock(out):
        with pytest.raises(UsageError, match="another `compare` is running on .*out"):
            compare(write_config(tmp_path), out, progress=False)
    with open(out / ".compare.lock", "w") as handle:            # released: another process can take it
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_step_logged_twice_counts_once_per_seed(tmp_path):
    config, out = compared(tmp_path)
    metrics = out / "runs" / "cosine" / "seed0" / "metrics.csv"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines + lines[1:]) + "\n")     # every row again, as two writers left it
    compare(config, out, progress=False)
    aggregates = pd.read_csv(out / "aggregates.csv")
    assert (aggregates["seeds"] == 1).all() and aggregates["ci95"].isna().all()


def test_status_refuses_runs_trained_with_other_settings_as_compare_does(tmp_path):
    from adaptive_sched.compare import status
    config, out = compared(tmp_path)
    assert status(config, out) == (2, 2)
    config.write_text(config.read_text().replace("batch_size = 64", "batch_size = 32"))
    with pytest.raises(UsageError, match="batch_size was 64"):
        status(config, out)
    assert status(config, tmp_path / "nothing") == (0, 2)


@pytest.mark.parametrize("name", ["3", "true", "[\"cosine\"]"])
def test_a_schedule_name_that_is_no_string_is_refused_in_one_line(tmp_path, name):
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace('{ name = "cosine" }', f"{{ name = {name} }}"))
    with pytest.raises(UsageError, match="a schedule's name must be a string"):
        parse(config)


def test_a_metrics_file_with_a_word_in_it_is_named(tmp_path):
    config, out = compared(tmp_path)
    metrics = out / "runs" / "laplace_b=1.0" / "seed0" / "metrics.csv"
    lines = metrics.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[-1].split(",")
    cells[header.index("loss")] = "oops"
    metrics.write_text("\n".join(lines[:-1] + [",".join(cells)]) + "\n")
    with pytest.raises(UsageError, match="metrics.csv holds a value that is not a number"):
        compare(config, out, progress=False)


def test_results_md_says_how_many_of_the_planned_seeds_a_schedule_has(tmp_path):
    config, out = compared(tmp_path)
    config.write_text(config.read_text().replace("seeds = [0]", "seeds = [0, 1]"))
    compare(config, out, progress=False, time_budget=0)        # seed 1 planned, not started: the report alone
    text = (out / "results.md").read_text()
    assert "| 1 of 2 |" in text and "different seed sets" not in text      # both have seed 0 only: comparable


def test_a_run_that_finished_with_a_non_finite_metric_is_reported_diverged_not_unfinished(tmp_path, capsys):
    """A diverged run's final eval metric is NaN (SWD of NaN samples; FID/KID now too): results.md listed the run as
    "0 (unfinished)", as if it had still to train. It is finished (skipped, not retrained) and reads "diverged"."""
    config, out = compared(tmp_path)
    metrics = out / "runs" / "laplace_b=1.0" / "seed0" / "metrics.csv"
    lines = metrics.read_text().splitlines()
    header, cells = lines[0].split(","), lines[-1].split(",")
    assert cells[header.index("step")] == "40"
    cells[header.index("eval_eps_mse")] = "nan"
    metrics.write_text("\n".join(lines[:-1] + [",".join(cells)]) + "\n")
    capsys.readouterr()
    compare(config, out, progress=False)
    assert "laplace(b=1.0) seed 0: finished, skipped" in capsys.readouterr().out
    text = (out / "results.md").read_text()
    excess = pd.read_csv(out / "aggregates.csv").query("label == 'laplace(b=1.0)' and step == 40 and "
                                                       "metric == 'eval_excess_mse'")["mean"].iloc[0]
    assert f"| laplace(b=1.0) | diverged | {excess:.4g} (n = 1) | 0 of 1, 1 diverged |" in text
    assert ("1 run(s) diverged: their training stopped on non-finite losses (diverged.json), or eval_eps_mse at step "
            "40 is not finite (NaN or inf): laplace(b=1.0) seed 0. They are left out of the means and not retrained."
            ) in text
    assert "| laplace(b=1.0) | diverged | – | 0 of 0 |" in text                       # the per-seed table
    assert "unfinished" not in text
    from adaptive_sched.compare import status
    assert status(config, out) == (2, 2)


def test_lowering_steps_below_what_runs_recorded_is_refused_in_one_line(tmp_path):
    """The final step had three definitions: [train] steps (finished runs, steps to target), the last logged step
    (results.md's table) and the last step overall (the per-seed table): with steps lowered from 40 to 20 the finished
    runs were skipped and results.md's tables spoke of step 40 while steps_to_target.csv measured at step 20."""
    from adaptive_sched.compare import status
    config, out = compared(tmp_path)
    written = {name: (out / name).read_bytes() for name in ("results.md", "steps_to_target.csv", "compare.toml")}
    config.write_text(config.read_text().replace("steps = 40", "steps = 20"))
    for call in (lambda: compare(config, out, progress=False), lambda: status(config, out)):
        with pytest.raises(UsageError, match=r"cosine seed 0 in .* \(\[train\] steps is now 20, but the run has "
                                             r"recorded step 40; keep steps >= 40\)") as info:
            call()
        assert "\n" not in str(info.value)
    assert {name: (out / name).read_bytes() for name in written} == written


def test_a_changed_eval_interval_is_refused_while_runs_have_still_to_train(tmp_path, capsys):
    """[eval] every changed on resume was taken silently: a new seed evaluated at 10, 20, 30, 40 beside seed 0's 20, 40
    (the budget table's means at 10 and 30 over other seeds). With every run finished it changes nothing: accepted."""
    config, out = compared(tmp_path)
    original = config.read_text()
    config.write_text(original.replace("every = 20", "every = 10"))
    compare(config, out, progress=False)                                          # all finished: the report only
    assert "finished, skipped" in capsys.readouterr().out
    assert sorted(pd.read_csv(out / "aggregates.csv")["step"].unique()) == [20, 40]
    config.write_text(original.replace("every = 20", "every = 10").replace("seeds = [0]", "seeds = [0, 1]"))
    with pytest.raises(UsageError, match=r"cosine seed 0 in .* \(\[eval\] every was 20 in the saved run, now 10, "
                                         r"and some runs have still to train"):
        compare(config, out, progress=False)
    assert not (out / "runs" / "cosine" / "seed1").exists()


@pytest.mark.parametrize("metric, means, scale", [("eval_kid", [0.02, 0.01], "linear"),     # KID can be < 0
                                                  ("eval_fid", [3.0, -0.5], "linear"),
                                                  ("eval_fid@w1.5", [3.0, 1.5], "log"),
                                                  ("eval_kid@w1.5", [-0.001, 0.01], "linear")])
def test_metric_vs_step_uses_a_log_axis_only_for_positive_metrics(tmp_path, monkeypatch, metric, means, scale):
    """A log axis hid the unbiased KID estimate's negative values (and its CI band below 0)."""
    from adaptive_sched import compare_plots
    seen, draw = {}, compare_plots.finish_line_plot

    def spy(fig, ax, path, *args, **kwargs):
        draw(fig, ax, path, *args, **kwargs)
        seen["scale"], seen["lowest"] = ax.get_yscale(), ax.get_ylim()[0]
    monkeypatch.setattr(compare_plots, "finish_line_plot", spy)
    aggregates = pd.DataFrame([{"label": "cosine", "step": s, "metric": metric, "mean": m, "ci95": 0.01, "seeds": 2}
                               for s, m in zip((20, 40), means)])
    compare_plots.metric_curves(aggregates, metric, tmp_path / "curve.png")
    assert seen["scale"] == scale and (tmp_path / "curve.png").exists()
    assert scale == "log" or seen["lowest"] < min(means)                          # the lowest value is on the plot


def poison_schedule(monkeypatch, schedule: str):
    """Make every training loss of runs with the given schedule class name NaN (their training diverges)."""
    from adaptive_sched.losses import DiffusionLoss
    original = DiffusionLoss.terms

    def terms(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if type(self.schedule).__name__.lower().startswith(schedule):
            out.loss = out.loss * float("nan")
        return out
    monkeypatch.setattr(DiffusionLoss, "terms", terms)


def test_a_run_whose_training_diverged_is_reported_diverged_and_not_retrained(tmp_path, monkeypatch, capsys):
    """Training stopped on non-finite losses failed the whole comparison (no report) on every call, retraining the
    run each time; it is a result: results.md says diverged, and the next call skips it."""
    config, out = tmp_path / "cmp.toml", tmp_path / "out"
    write_config(tmp_path, extra="").write_text(config.read_text().replace("[train]\n", "[train]\nmax_nonfinite = 3\n"))
    poison_schedule(monkeypatch, "laplace")
    compare(config, out, progress=False)                        # no UsageError: one run diverged, one finished
    run = out / "runs" / "laplace_b=1.0" / "seed0"
    assert json.loads((run / "diverged.json").read_text())["step"] == 20
    text = (out / "results.md").read_text()
    assert "| laplace(b=1.0) | diverged |" in text and "0 of 1, 1 diverged" in text
    assert "| cosine | " in text and "unfinished" not in text
    before = (run / "metrics.csv").read_text()
    capsys.readouterr()
    compare(config, out, progress=False)
    assert "laplace(b=1.0) seed 0: diverged at step 20, skipped" in capsys.readouterr().out
    assert (run / "metrics.csv").read_text() == before
    from adaptive_sched.compare import status
    assert status(config, out) == (2, 2)


def test_with_jobs_a_diverged_run_is_not_a_failed_one(tmp_path, monkeypatch):
    """The same with runs in processes: a job that exits non-zero having written diverged.json is no failure."""
    import adaptive_sched.jobs as jobs
    from adaptive_sched.run_artifacts import mark_diverged
    config = write_config(tmp_path)

    def fake_run_jobs(work, parallel, progress, deadline=None):
        for job in work:
            if "laplace" in job.name:
                mark_diverged(job.log.parent, 20, 3)
        return [(job, 2) for job in work if "laplace" in job.name], [job for job in work if "laplace" not in job.name]
    monkeypatch.setattr(jobs, "run_jobs", fake_run_jobs)
    compare(config, tmp_path / "out", progress=False, jobs=2)   # raised "1 of 2 runs failed" before
    with pytest.raises(UsageError, match="1 of 2 runs failed"):
        monkeypatch.setattr(jobs, "run_jobs", lambda work, *a, **k: ([(work[0], 2)], []))
        compare(config, tmp_path / "out2", progress=False, jobs=2)


def test_a_run_diverging_at_its_last_step_can_be_retried(tmp_path, monkeypatch):
    """Divergence found at the final step saved a checkpoint there: deleting diverged.json to retry trained nothing,
    wrote finished.json without a final eval, and the run read "unfinished" for good."""
    config, out = tmp_path / "cmp.toml", tmp_path / "out"
    write_config(tmp_path).write_text(config.read_text().replace("[train]\n", "[train]\nmax_nonfinite = 20\n"))
    from adaptive_sched.losses import DiffusionLoss
    original, calls = DiffusionLoss.terms, {"n": 0}

    def terms(self, *args, **kwargs):                   # laplace's losses NaN from its 21st step on
        result = original(self, *args, **kwargs)
        if type(self.schedule).__name__.lower().startswith("laplace"):
            calls["n"] += 1
            if calls["n"] > 20:
                result.loss = result.loss * float("nan")
        return result
    with monkeypatch.context() as patched:
        patched.setattr(DiffusionLoss, "terms", terms)
        compare(config, out, progress=False)
    run = out / "runs" / "laplace_b=1.0" / "seed0"
    assert json.loads((run / "diverged.json").read_text())["step"] == 40
    (run / "diverged.json").unlink()
    compare(config, out, progress=False)                # the retry, its losses finite now
    assert pd.read_csv(run / "metrics.csv")["step"].tolist() == [20, 40]
    assert "unfinished" not in (out / "results.md").read_text() and (run / "finished.json").exists()


def test_a_changed_eval_interval_is_taken_when_the_only_run_left_diverged(tmp_path, monkeypatch):
    """A diverged run is not trained again, so it has no evals to misplace: the [eval] every check counts it done."""
    config, out = tmp_path / "cmp.toml", tmp_path / "out"
    write_config(tmp_path).write_text(config.read_text().replace("[train]\n", "[train]\nmax_nonfinite = 3\n"))
    with monkeypatch.context() as patched:
        poison_schedule(patched, "laplace")
        compare(config, out, progress=False)
    config.write_text(config.read_text().replace("every = 20", "every = 40"))
    compare(config, out, progress=False, time_budget=0)     # refused before: "some runs have still to train"
