"""Class-conditional training and classifier-free guidance (adaptive_sched.conditioning, generate, train)."""
import numpy as np
import pytest
import torch

from adaptive_sched import config as cfg
from adaptive_sched.conditioning import (balanced_labels, check_guidance, drop_labels, guided_prediction,
                                         parse_condition)
from adaptive_sched.diffusion import to_x0_eps
from adaptive_sched.errors import UsageError
from adaptive_sched.generate import generate, x0_denoiser
from adaptive_sched.models import MLPDenoiser, num_classes_of

TARGETS = ["eps", "x0", "v", "flow"]


def _model(num_classes=3, seed=0):
    torch.manual_seed(seed)
    model = MLPDenoiser(dim=4, hidden=32, depth=2, emb_dim=16, num_classes=num_classes)
    for p in model.parameters():                 # the output layer starts at zero: give it real weights
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def _inputs(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.linspace(-5, 5, n), torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize("target", TARGETS)
def test_guidance_one_is_the_conditional_model(target):
    model, (x, lam, y) = _model(), _inputs()
    with torch.no_grad():
        got = x0_denoiser(model, target, y, 1.0)(x, lam)
        want = to_x0_eps(model(x, lam, y), x, lam, target)[0]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("target", TARGETS)
def test_guidance_zero_is_the_unconditional_branch(target):
    model, (x, lam, y) = _model(), _inputs()
    null = torch.full_like(y, 3)
    with torch.no_grad():
        got = x0_denoiser(model, target, y, 0.0)(x, lam)
        want = to_x0_eps(model(x, lam, null), x, lam, target)[0]
        unlabelled = to_x0_eps(model(x, lam, None), x, lam, target)[0]    # y=None means the null class too
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, unlabelled)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("w", [0.5, 2.0, 3.0])
def test_guidance_in_any_target_space_is_guidance_on_eps_and_x0(target, w):
    """The combination is written in the target's own space; since every target is affine in ε̂ at fixed (x, λ),
    the guided x̂0 and ε̂ are the same combination of the two branches' x̂0 and ε̂."""
    model, (x, lam, y) = _model(), _inputs()
    null = torch.full_like(y, 3)
    with torch.no_grad():
        x0_c, eps_c = to_x0_eps(model(x, lam, y), x, lam, target)
        x0_u, eps_u = to_x0_eps(model(x, lam, null), x, lam, target)
        x0_w, eps_w = to_x0_eps(guided_prediction(model, x, lam, y, w, 3), x, lam, target)
    torch.testing.assert_close(x0_w, x0_u + w * (x0_c - x0_u), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_w, eps_u + w * (eps_c - eps_u), rtol=1e-4, atol=1e-4)


def test_label_dropout_rate_and_null_class():
    y = torch.randint(0, 10, (200_000,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(y, 0.1, 10, torch.Generator().manual_seed(1))
    rate = (dropped == 10).float().mean().item()
    assert abs(rate - 0.1) < 4 * (0.1 * 0.9 / len(y)) ** 0.5      # 4 standard errors
    kept = dropped != 10
    assert torch.equal(dropped[kept], y[kept])                     # the rest are untouched
    assert torch.equal(drop_labels(y, 0.0, 10), y)


def test_balanced_labels():
    counts = torch.bincount(balanced_labels(103, 10), minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 103


def test_check_guidance():
    assert check_guidance([1, 1.5], True) == [1.0, 1.5]
    for bad, conditional in (([2.0], False), ([], True), ([-1.0], True), ([1.0, 1.0], True), ([float("nan")], True)):
        with pytest.raises(UsageError):
            check_guidance(bad, conditional)
    assert check_guidance([1.0], True, p_uncond=0.0) == [1.0]
    with pytest.raises(UsageError, match=r"never trains"):     # p_uncond = 0: the null class is never trained
        check_guidance([1.0, 2.0], True, p_uncond=0.0)


def test_stats_condition_has_equal_mass_bins():
    x = torch.randn(4000, 8) * torch.linspace(0.1, 3.0, 4000)[:, None]
    cond = parse_condition("stats:4", x, None, 0)
    counts = torch.bincount(cond(x, None), minlength=4)
    assert cond.num_classes == 4 and counts.min() >= 990 and counts.max() <= 1010
    for spec in ("stats:1", "stats:x", "weird", "class"):
        with pytest.raises(UsageError):
            parse_condition(spec, x, None, 0)


def _two_class_npz(path, n=400):
    """8x8 images: class 0 dark (−0.6), class 1 bright (+0.6), with pixel noise 0.1."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    x = np.where(y[:, None, None] == 1, 0.6, -0.6) + 0.1 * rng.standard_normal((n, 8, 8))
    np.savez(path, x=((x + 1) * 127.5).clip(0, 255).astype(np.uint8)[:, None], y=y)
    return path


def _conditional_config(data, steps=300, p_uncond=0.2):
    return cfg.from_dict({
        "data": {"name": f"npz:{data}"},
        "model": {"name": "unet", "channels": [8], "emb_dim": 16, "mid_blocks": 0},
        "train": {"steps": steps, "batch_size": 32, "lr": 3e-3, "warmup": 20, "ema_decay": 0.9, "seed": 0,
                  "device": "cpu", "log_every": steps, "checkpoint_every": steps, "conditional": True,
                  "p_uncond": p_uncond, "target": "v"},
        "eval": {"every": steps, "n": 40, "sample_n": 40, "sample_steps": 10, "features": "none",
                 "guidance": [1.0, 0.0, 2.0]}})


def test_trainer_drops_labels_at_the_configured_rate(tmp_path):
    from adaptive_sched.run_build import build
    from adaptive_sched.train import train_step
    from adaptive_sched.step_guard import new_running
    config = _conditional_config(_two_class_npz(tmp_path / "two.npz"), p_uncond=0.25)
    run = build(config)
    seen = []
    run.model.embed.classes.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    running = new_running(run.device)
    for step in range(40):
        train_step(run, step, running)
    labels = torch.cat(seen)
    rate = (labels == 2).float().mean().item()                 # class 2 is the null class of a 2-class model
    assert num_classes_of(run.model) == 2 and len(labels) == 40 * 32
    assert abs(rate - 0.25) < 4 * (0.25 * 0.75 / len(labels)) ** 0.5


def test_conditional_training_learns_the_classes_and_guidance_is_logged(tmp_path):
    from adaptive_sched.sample_run import load_snapshot
    from adaptive_sched.train import train
    config = _conditional_config(_two_class_npz(tmp_path / "two.npz"))
    row = train(config, tmp_path / "run", progress=False)
    for w in ("1", "0", "2"):
        assert np.isfinite(row[f"eval_swd@w{w}"])
    assert row["eval_swd"] == row["eval_swd@w1"]            # the first scale also gives the plain name
    _, model, snap = load_snapshot(tmp_path / "run", torch.device("cpu"))
    assert snap["num_classes"] == 2
    grid = torch.linspace(-10, 12, 21)
    means = {}
    for k in (0, 1):
        x = generate(model, "v", (1, 8, 8), 64, grid, seed=3, labels=torch.full((64,), k))
        means[k] = x.mean(dim=(1, 2, 3))
    assert (means[0] < 0).float().mean() > 0.9 and (means[1] > 0).float().mean() > 0.9
    uncond = generate(model, "v", (1, 8, 8), 200, grid, seed=3).mean(dim=(1, 2, 3))   # the null class: both modes
    assert 0.2 < (uncond > 0).float().mean() < 0.8


def test_conditional_needs_labels_and_guidance_needs_conditional(tmp_path):
    from adaptive_sched.run_build import build
    base = {"train": {"steps": 10, "batch_size": 8, "device": "cpu"}, "eval": {"features": "none"}}
    with pytest.raises(UsageError, match="needs class labels"):
        build(cfg.from_dict({**base, "data": {"name": "checkerboard"}, "train": {**base["train"], "conditional": True}}))
    with pytest.raises(UsageError, match="conditional"):
        build(cfg.from_dict({**base, "data": {"name": "gmm"}, "eval": {"guidance": [2.0]}}))
    with pytest.raises(UsageError, match="p_uncond"):
        build(cfg.from_dict({**base, "data": {"name": "digits"},
                             "train": {**base["train"], "conditional": True, "p_uncond": 1.0}}))
    with pytest.raises(UsageError, match="list of numbers"):
        cfg.from_dict({"eval": {"guidance": ["big"]}})


def _write_compare_toml(path, data, steps, sample_n, sample_steps, guidance, compare):
    """A tiny conditional compare file on the two-class npz (8-channel U-Net, CPU)."""
    guided = "" if guidance is None else f"guidance = {guidance}\n"
    path.write_text(f'''
[data]
name = "npz:{data}"
[model]
name = "unet"
channels = [8]
emb_dim = 16
mid_blocks = 0
[train]
steps = {steps}
batch_size = 16
device = "cpu"
log_every = 10
checkpoint_every = {steps}
conditional = true
[eval]
every = {steps}
n = 20
sample_n = {sample_n}
sample_steps = {sample_steps}
features = "none"
{guided}[compare]
seeds = [0, 1]
samples = 0
{compare}
''')
    return path


def test_compare_reports_the_metric_at_every_guidance_scale(tmp_path):
    from adaptive_sched.compare import compare
    data = _two_class_npz(tmp_path / "two.npz", n=200)
    _write_compare_toml(tmp_path / "c.toml", data, 20, 20, 4, [1.0, 2.0, 3.0],
                        'metric = "eval_swd@w2"\nschedules = [{ name = "cosine" }, { name = "laplace" }]')
    out = compare(tmp_path / "c.toml", tmp_path / "out", progress=False)
    text = (out / "results.md").read_text()
    assert "eval_swd by classifier-free guidance scale" in text and "| w = 1 | w = 2 | w = 3 |" in text
    import pandas as pd
    agg = pd.read_csv(out / "aggregates.csv")
    final = agg[(agg["step"] == 20) & (agg["label"] == "cosine")].set_index("metric")
    summary = pd.read_csv(out / "summary.csv")
    want = summary[(summary["label"] == "cosine") & (summary["step"] == 20)]["eval_swd@w3"].mean()
    assert final.loc["eval_swd@w3", "seeds"] == 2 and abs(final.loc["eval_swd@w3", "mean"] - want) < 1e-9
    sections = [line for line in text.splitlines() if " per seed at step 20, paired with cosine" in line]
    assert sections == [f"## eval_swd@w{w} per seed at step 20, paired with cosine" for w in (1, 2, 3)]


def test_learned_conditional_run_logs_per_class_densities_exports_and_samples_per_class(tmp_path):
    """End to end: a class-conditioned learned schedule trains with a conditional denoiser, logs p(λ | k) and the
    marginal, exports one table per class plus the marginal, and samples each class on its own grid."""
    from adaptive_sched import schedules
    from adaptive_sched.cli import main
    from adaptive_sched.class_schedules import marginal_density
    from adaptive_sched.export import load_run_schedule
    from adaptive_sched.train import train
    config = _conditional_config(_two_class_npz(tmp_path / "two.npz"), steps=40)
    config = cfg.from_dict({"schedule": {"name": "learned", "hidden": 8},
                            "learned": {"condition": "class", "lr": 1e-2},
                            "eval": {"every": 20, "guidance": [1.0]}}, config)
    train(config, tmp_path / "run", progress=False)
    rows = (tmp_path / "run" / "schedule_density_by_class.csv").read_text().splitlines()
    assert rows[0] == "step,class,logsnr,density"
    assert {r.split(",")[1] for r in rows[1:]} == {"0", "1", "all"}
    assert {r.split(",")[0] for r in rows[1:]} == {"20", "40"}
    assert (tmp_path / "run" / "schedule_density_by_class.png").exists()
    _, schedule, snap = load_run_schedule(tmp_path / "run")
    assert schedule.num_classes == 2 and snap["schedule_num_classes"] == 2
    weights = snap["class_weights"]
    assert abs(sum(weights) - 1) < 1e-12 and abs(weights[0] - 0.5) < 0.05

    # the logged marginal is the weighted mixture of the classes' densities
    last = [r.split(",") for r in rows[1:] if r.startswith("40,")]
    lam = torch.tensor([float(r[2]) for r in last if r[1] == "all"], dtype=torch.float64)
    logged = torch.tensor([float(r[3]) for r in last if r[1] == "all"], dtype=torch.float64)
    with torch.no_grad():
        mix = weights[0] * schedule.density(lam, 0) + weights[1] * schedule.density(lam, 1)
        torch.testing.assert_close(logged, mix.double(), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(marginal_density(schedule, lam, weights).double(), mix.double())

    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "s.csv")]) == 0
    for k in (0, 1):
        table = schedules.build("table", path=str(tmp_path / f"s.class{k}.csv"))
        t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(table.logsnr(t), schedule.logsnr(t, k).double(), atol=0.05, rtol=0)
    both = schedules.build("table", path=str(tmp_path / "s.classes.csv"))
    assert both.num_classes == 2

    out = tmp_path / "per_class.npz"
    assert main(["sample", str(tmp_path / "run"), "--n", "6", "--out", str(out), "--grid", "per-class",
                 "--sample-steps", "5"]) == 0
    saved = np.load(out)
    assert saved["logsnr_grid"].shape == (2, 6) and list(saved["y"]) == [0, 1, 0, 1, 0, 1]
    assert main(["sample", str(tmp_path / "run"), "--n", "4", "--out", str(out), "--class", "7"]) == 2


def test_sampling_options_are_refused_for_an_unconditional_run(tmp_path):
    from adaptive_sched.cli import main
    from adaptive_sched.train import train
    config = cfg.from_dict({"data": {"name": "gmm", "n": 200}, "model": {"name": "mlp", "hidden": 16, "depth": 1},
                            "train": {"steps": 4, "batch_size": 8, "device": "cpu", "log_every": 4,
                                      "checkpoint_every": 4},
                            "eval": {"every": 4, "n": 20, "sample_n": 0}})
    train(config, tmp_path / "run", progress=False)
    out = str(tmp_path / "x.npz")
    assert main(["sample", str(tmp_path / "run"), "--n", "4", "--out", out, "--class", "1"]) == 2
    assert main(["sample", str(tmp_path / "run"), "--n", "4", "--out", out, "--guidance", "2"]) == 2
    assert main(["sample", str(tmp_path / "run"), "--n", "4", "--out", out, "--grid", "per-class"]) == 2
    assert main(["sample", str(tmp_path / "run"), "--n", "4", "--out", out]) == 0


def test_compare_reports_the_spread_of_per_class_medians(tmp_path):
    import pandas as pd
    from adaptive_sched.class_schedules import class_medians
    from adaptive_sched.compare import compare, run_dir_of
    from adaptive_sched.export import load_run_schedule
    data = _two_class_npz(tmp_path / "two.npz", n=200)
    _write_compare_toml(tmp_path / "c.toml", data, 10, 10, 3, None,
                        'metric = "eval_swd"\n'
                        'schedules = [{ name = "learned", hidden = 4, label = "shared" },\n'
                        '             { name = "learned", hidden = 4, condition = "class", lr = 0.05, '
                        'label = "per-class" }]')
    out = compare(tmp_path / "c.toml", tmp_path / "out", progress=False)
    spread = pd.read_csv(out / "class_medians.csv")
    assert set(spread["label"]) == {"per-class"} and len(spread) == 2 * 2       # 2 seeds x 2 classes
    entry = {"name": "learned", "hidden": 4, "condition": "class", "lr": 0.05, "label": "per-class"}
    medians = class_medians(load_run_schedule(run_dir_of(out, entry, 1))[1])
    got = spread[spread["seed"] == 1].sort_values("condition")["median_logsnr"].to_numpy()
    np.testing.assert_allclose(got, medians)
    text = (out / "results.md").read_text()
    assert "spread of the medians" in text and "| per-class | 2 |" in text
    assert (out / "densities_by_class.png").exists()


def test_a_schedule_conditioned_on_input_statistics_trains_and_exports(tmp_path):
    """[learned] condition = "stats:3": an unconditional denoiser, λ(t, bin of the example's pixel std); the
    marginal weights are the bins' training frequencies (equal mass: 1/3 each)."""
    from adaptive_sched.export import load_run_schedule
    from adaptive_sched.train import train
    config = cfg.from_dict({"data": {"name": "digits"},
                            "model": {"name": "unet", "channels": [8], "emb_dim": 16, "mid_blocks": 0},
                            "schedule": {"name": "learned", "hidden": 4},
                            "learned": {"condition": "stats:3"},
                            "train": {"steps": 10, "batch_size": 16, "device": "cpu", "log_every": 10},
                            "eval": {"every": 10, "n": 40, "sample_n": 8, "sample_steps": 3, "features": "none"}})
    train(config, tmp_path / "run", progress=False)
    _, schedule, snap = load_run_schedule(tmp_path / "run")
    assert schedule.num_classes == 3 and "num_classes" not in snap        # the denoiser stays unconditional
    np.testing.assert_allclose(snap["class_weights"], [1 / 3] * 3, atol=2e-3)
    assert (tmp_path / "run" / "schedule_density_by_class.csv").exists()


def test_quantile_grid_of_a_conditional_run_uses_the_marginal(tmp_path):
    from adaptive_sched.class_schedules import marginal_survival
    from adaptive_sched.export import load_run_schedule
    from adaptive_sched.grid_cli import grid_for_run
    from adaptive_sched.train import train
    config = cfg.from_dict({"data": {"name": "gmm", "n": 400},
                            "model": {"name": "mlp", "hidden": 16, "depth": 1},
                            "schedule": {"name": "learned", "hidden": 4},
                            "learned": {"condition": "class", "lr": 0.05},
                            "train": {"steps": 20, "batch_size": 32, "device": "cpu", "log_every": 20},
                            "eval": {"every": 20, "n": 40, "sample_n": 0}})
    train(config, tmp_path / "run", progress=False)
    grid, meta = grid_for_run(tmp_path / "run", 8, "quantile")
    _, schedule, snap = load_run_schedule(tmp_path / "run")
    lo, hi = config.eval.sample_logsnr_min, config.eval.sample_logsnr_max
    # equal marginal mass between consecutive grid points: the survival Σ_c w_c t(λ | c) is linear in the index
    with torch.no_grad():
        surv = marginal_survival(schedule, grid, snap["class_weights"]).double()
    steps = surv[:-1] - surv[1:]
    assert "marginal" in meta["training_density"] and grid[0] == lo and grid[-1] == hi
    torch.testing.assert_close(steps, torch.full_like(steps, float(steps.mean())), rtol=1e-9, atol=1e-12)


def test_eval_samples_take_the_labels_of_the_held_out_rows_they_are_scored_against(tmp_path, monkeypatch):
    """The gmm's classes are unequal (weights 0.075 to 0.163): equal class counts would score even the exact
    conditional sampler as far from the held-out rows. By default the samples take those rows' own labels;
    sample_labels = "balanced" gives equal counts."""
    from adaptive_sched import run_eval
    from adaptive_sched.run_build import load_data
    from adaptive_sched.train import train
    seen = []
    real = run_eval.generate
    monkeypatch.setattr(run_eval, "generate", lambda *a, **kw: seen.append(kw["labels"].clone()) or real(*a, **kw))
    for how in ("held_out", "balanced"):
        config = cfg.from_dict({"data": {"name": "gmm", "n": 400},
                                "model": {"name": "mlp", "hidden": 16, "depth": 1},
                                "train": {"steps": 4, "batch_size": 32, "device": "cpu", "log_every": 4,
                                          "conditional": True},
                                "eval": {"every": 4, "n": 200, "sample_n": 150, "sample_steps": 3,
                                         "sample_labels": how}})
        train(config, tmp_path / how, progress=False)
    test = load_data(config.data, "test")
    held_out = test.y[:150]
    assert torch.equal(seen[0], held_out) and torch.bincount(held_out).min() < torch.bincount(held_out).max() - 5
    assert torch.equal(seen[1], balanced_labels(150, test.num_classes))
    with pytest.raises(UsageError, match="sample_labels must be one of held_out, balanced"):
        train(cfg.from_dict({"eval": {"sample_labels": "uniform"}}), tmp_path / "bad", progress=False)


def test_labels_with_a_class_missing_from_the_training_data_are_refused(tmp_path):
    """An npz labelled {3, 7} would make an 8-class model whose classes 0-2 and 4-6 never train, and whose
    evals sample them; a run that does not use the labels is not refused."""
    from adaptive_sched.conditioning import check_class_labels
    from adaptive_sched.run_build import build
    path = _two_class_npz(tmp_path / "sparse.npz")
    with np.load(path) as f:
        x, y = f["x"], f["y"]
    np.savez(path, x=x, y=np.where(y == 1, 7, 3))
    with pytest.raises(UsageError, match="no training example has label 0, 1, 2, 4, 5, 6"):
        build(_conditional_config(path, steps=10))
    unconditional = _conditional_config(path, steps=10)
    unconditional.train.conditional, unconditional.eval.guidance = False, [1.0]
    assert build(unconditional).num_classes == 0
    with pytest.raises(UsageError, match=r"held-out labels must be in 0..2, got 0..3"):
        check_class_labels(torch.tensor([0, 1, 2]), torch.tensor([0, 3]), 3)


def test_a_table_of_several_classes_needs_a_class_conditioned_run(tmp_path):
    """A FILE.classes.csv export as the schedule of a run whose schedule sees no class failed at its first step."""
    from adaptive_sched import schedules
    from adaptive_sched.run_build import build
    t = np.linspace(0, 1, 11)
    rows = {k: schedules.build("cosine", shift=k / 5).logsnr(torch.tensor(t)).numpy() for k in range(10)}  # digits
    path = tmp_path / "s.classes.csv"
    path.write_text("class,t,logsnr\n" + "".join(f"{k},{float(ti)!r},{float(li)!r}\n" for k, lam in rows.items()
                                                  for ti, li in zip(t, lam)))
    config = cfg.from_dict({"data": {"name": "digits"}, "schedule": {"name": "table", "path": str(path)},
                            "model": {"name": "unet", "channels": [8], "emb_dim": 16, "mid_blocks": 0},
                            "train": {"steps": 4, "batch_size": 8, "device": "cpu"}, "eval": {"features": "none"}})
    with pytest.raises(UsageError, match="the table holds 10 classes' schedules: set \\[learned\\] condition"):
        build(config)
    config.learned.condition = "class"
    assert build(config).condition.kind == "class"


def test_equal_class_counts_score_exact_gmm_samples_far_from_the_data():
    """Why held_out is the default: exact conditional samples of the gmm (components weigh 0.075 to 0.163) drawn
    with equal class counts sit at about twice the SWD that two draws of the data have (0.081 against 0.043 at
    n = 2,000, the figures the README quotes); drawn with the reference rows' own labels they sit at the data's."""
    from adaptive_sched.data.gmm import make_gmm
    from adaptive_sched.evaluate import sliced_wasserstein
    gmm, n = make_gmm(16, 8, 0), 2000
    reference, ref_labels = gmm.sample_labeled(n, torch.Generator().manual_seed(1))
    other, _ = gmm.sample_labeled(n, torch.Generator().manual_seed(2))
    noise = torch.randn(n, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def exact(labels):
        return (gmm.means[labels] + gmm.stds[labels] * noise).float()

    floor = sliced_wasserstein(other, reference)
    balanced = sliced_wasserstein(exact(balanced_labels(n, 8)), reference)
    matched = sliced_wasserstein(exact(ref_labels), reference)
    assert round(floor, 3) == 0.043 and round(balanced, 3) == 0.081
    assert matched < 1.2 * floor
