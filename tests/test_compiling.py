"""compile_run: the loss's core compiled whole gives the eager λ, loss and gradients (schedule network, weighting,
denoiser and the variance objective's hooks in one graph), and the schedule's ops leave the eager step (what made
the compiled learned step 26% slower than cosine on the GPU)."""
import functools

import pytest
import torch

from adaptive_sched import config as cfg, schedules
from adaptive_sched.compiling import compile_run, uncompile_run
from adaptive_sched.run_build import build
from adaptive_sched.train import new_running, train_step

pytestmark = pytest.mark.slow          # inductor compiles C++ on the CPU: tens of seconds


def gmm_run(objective="variance"):
    return build(cfg.from_dict({
        "data": {"name": "gmm", "n": 512, "dim": 4}, "model": {"name": "mlp", "hidden": 32, "depth": 2},
        "schedule": {"name": "learned"}, "learned": {"objective": objective},
        "train": {"steps": 10, "batch_size": 64, "device": "cpu", "target": "v", "warmup": 0}}))


def test_the_compiled_schedule_gives_the_eager_values_and_gradients():
    torch._dynamo.reset()
    sched = schedules.build("learned")
    with torch.no_grad():                                      # a schedule away from its initialisation
        sched.c.add_(torch.randn(sched.c.shape, generator=torch.Generator().manual_seed(0)))
    t = torch.rand(257, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(sched.logsnr_and_slope)
    values = []
    for fn in (sched.logsnr_and_slope, compiled):
        sched.zero_grad()
        lam, slope = fn(t)
        (lam.square().mean() + torch.log(-slope).mean()).backward()
        values.append((lam.detach(), slope.detach(), [p.grad.clone() for p in sched.parameters()]))
    (lam0, slope0, grads0), (lam1, slope1, grads1) = values
    torch.testing.assert_close(lam1, lam0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(slope1, slope0, rtol=1e-4, atol=1e-4)
    for g0, g1 in zip(grads0, grads1):
        torch.testing.assert_close(g1, g0, rtol=1e-3, atol=1e-5)


def aten_ops(run, step) -> list[str]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(run, step, new_running(run.device))
    return [e.name for e in prof.events()]


def assert_same_gradients(eager, compiled):
    """The gradients a train_step left on every parameter (denoiser and schedule) agree to float noise."""
    for group_e, group_c in zip(eager.optimizer.param_groups, compiled.optimizer.param_groups):
        for a, b in zip(group_e["params"], group_c["params"]):
            assert (a.grad is None) == (b.grad is None)
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-3 * float(a.grad.abs().max()))


@pytest.mark.parametrize("layout", ["whole", "parts"])
def test_compiled_steps_match_eager_ones_and_the_schedule_leaves_the_eager_ops(layout, monkeypatch):
    from adaptive_sched import compiling
    if layout == "parts":
        monkeypatch.setattr(compiling, "traces_intermediate_hooks", lambda: False)
    torch._dynamo.reset()
    eager, compiled = gmm_run(), gmm_run()
    compile_run(compiled)
    assert compiled.loss.core_fn is not None
    assert isinstance(compiled.loss.core_fn, functools.partial) == (layout == "parts")
    for step in range(3):
        for run in (eager, compiled):
            train_step(run, step, new_running(run.device))
        assert_same_gradients(eager, compiled)                  # the variance objective's φ gradient included
    for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
    for a, b in zip(eager.loss.schedule.parameters(), compiled.loss.schedule.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
    # the monotone network's log-sigmoids run eagerly in the eager step, inside the compiled graph otherwise
    assert "aten::log_sigmoid" in aten_ops(eager, 3) and "aten::log_sigmoid" not in aten_ops(compiled, 3)
    uncompile_run(compiled)
    assert compiled.loss.core_fn is None
    assert "aten::log_sigmoid" in aten_ops(compiled, 4)


def gmm_config(steps=6, **train):
    return cfg.from_dict({
        "data": {"name": "gmm", "n": 512, "dim": 4}, "model": {"name": "mlp", "hidden": 32, "depth": 2},
        "schedule": {"name": "learned"},
        "train": {"steps": steps, "batch_size": 64, "device": "cpu", "target": "v", "warmup": 0, "log_every": 2,
                  "checkpoint_every": 2, **train},
        "eval": {"every": 1000, "n": 64, "sample_n": 0, "logsnr_points": 3}})


def final_loss(run_dir) -> list[float]:
    """The logged training losses of a run."""
    import pandas as pd
    return pd.read_csv(run_dir / "metrics.csv")["loss"].tolist()


def test_a_compiled_training_run_follows_the_eager_one(tmp_path, capsys):
    from adaptive_sched.train import train
    train(gmm_config(), tmp_path / "eager", progress=False)
    train(gmm_config(compile=True), tmp_path / "compiled", progress=False)
    assert "training eagerly" not in capsys.readouterr().err                 # it really ran compiled
    assert "compile = true" in (tmp_path / "compiled" / "config.toml").read_text()
    eager, compiled = final_loss(tmp_path / "eager"), final_loss(tmp_path / "compiled")
    assert len(eager) == 3 and compiled == pytest.approx(eager, rel=1e-3)


def refuse_to_compile(fn, **kwargs):
    """What a torch.compile'd function that fails to compile looks like on its first call."""
    def failing(*args, **kw):
        raise RuntimeError("InductorError: misaligned address\nmore lines")
    return failing


def test_a_failed_compilation_trains_eagerly_with_a_warning(tmp_path, monkeypatch, capsys):
    from adaptive_sched.train import train
    train(gmm_config(), tmp_path / "eager", progress=False)
    monkeypatch.setattr(torch, "compile", refuse_to_compile)
    train(gmm_config(compile=True), tmp_path / "fallback", progress=False)
    assert "warning: torch.compile failed, training eagerly: RuntimeError: InductorError: misaligned address" \
        in capsys.readouterr().err
    assert final_loss(tmp_path / "fallback") == final_loss(tmp_path / "eager")          # the very same steps


def test_a_broken_device_stops_the_run_in_one_line_and_it_resumes_without_compile(tmp_path, monkeypatch):
    from adaptive_sched import compiling
    from adaptive_sched.errors import UsageError
    from adaptive_sched.train import train
    train(gmm_config(steps=4), tmp_path / "run", progress=False)
    monkeypatch.setattr(torch, "compile", refuse_to_compile)
    monkeypatch.setattr(compiling, "device_ok", lambda device: False)
    with pytest.raises(UsageError, match=r"^the compiled step broke the cpu device \(RuntimeError: InductorError: "
                                         r"misaligned address\); run again without compile"):
        train(gmm_config(steps=6, compile=True), tmp_path / "run", resume=True, progress=False)
    train(gmm_config(steps=6), tmp_path / "run", resume=True, progress=False)              # compile may change
    assert len(final_loss(tmp_path / "run")) == 3


def test_train_compile_on_the_command_line(tmp_path, monkeypatch, capsys):
    from adaptive_sched.cli import main
    monkeypatch.setattr(torch, "compile", refuse_to_compile)
    status = main(["train", "--data", "gmm", "--model", "mlp", "--steps", "2", "--batch-size", "32", "--device", "cpu",
                   "--eval-every", "1000", "--compile", "--out", str(tmp_path / "run"), "--quiet"])
    assert status == 0 and "compile = true" in (tmp_path / "run" / "config.toml").read_text()
    assert "training eagerly" in capsys.readouterr().err


class FailInBackward(torch.autograd.Function):
    """Identity whose backward fails, as when the lazily compiled backward does not compile."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("InductorError: the backward did not compile")


def compile_failing_in_backward(fn, **kwargs):
    def compiled(*args, **kw):
        out = fn(*args, **kw)
        return (FailInBackward.apply(out[0]), *out[1:])          # the loss's core: (loss, λ, ℓ_ε, slope)
    return compiled


def test_a_backward_that_fails_to_compile_retakes_the_step_with_the_histogram_as_it_was(tmp_path, monkeypatch,
                                                                                          capsys):
    # the adaptive objective updates its loss histogram in the forward, before backward fails
    from adaptive_sched import checkpoint
    from adaptive_sched.train import train
    eager, compiled = gmm_config(steps=4), gmm_config(steps=4, compile=True)
    for c in (eager, compiled):                          # adaptive needs an absolute weighting
        c.learned.objective, c.weighting.name = "adaptive", "sigmoid"
    train(eager, tmp_path / "eager", progress=False)
    monkeypatch.setattr(torch, "compile", compile_failing_in_backward)
    train(compiled, tmp_path / "fallback", progress=False)
    assert "training eagerly: RuntimeError: InductorError: the backward did not compile" in capsys.readouterr().err
    assert final_loss(tmp_path / "fallback") == final_loss(tmp_path / "eager")
    a, b = (checkpoint.load(tmp_path / name / "checkpoint.pt")["histogram"] for name in ("eager", "fallback"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


CORE_CASES = {           # schedule, weighting, objective: every branch of DiffusionLoss.core
    "learned-variance-hooks": ({"num_classes": 0}, ("like", {}), "variance", 0.0),
    "learned-adaptive": ({"num_classes": 0}, ("sigmoid", {}), "adaptive", 0.0),
    "learned-cvdm-smooth": ({"num_classes": 0}, ("edm", {}), "cvdm", 1e-3),
    "conditional-learned": ({"num_classes": 3}, ("like", {}), "variance", 0.0),
    "laplace-absolute": (None, ("sigmoid", {"b": 1.0}), "variance", 0.0),
}


def compiled_core(loss, whole: bool):
    """The loss's core compiled as compile_run does, whole or in its two parts, each as one graph (fullgraph)."""
    if whole:
        return torch.compile(loss.core, fullgraph=True)
    parts = (torch.compile(loss.schedule_part, fullgraph=True), torch.compile(loss.denoiser_part, fullgraph=True))
    return functools.partial(loss.core, parts=parts)


def test_this_torch_traces_hooks_on_intermediate_tensors():
    """torch 2.13 compiles the variance hooks into the graph, so compile_run compiles the core whole here."""
    from adaptive_sched.compiling import traces_intermediate_hooks
    assert traces_intermediate_hooks()
    run = gmm_run()
    compile_run(run)
    assert not isinstance(run.loss.core_fn, functools.partial)


def test_under_ddp_compile_run_compiles_the_parts():
    """DDP's forward breaks the graph, so the hooks sit between two compiled parts there, whatever torch traces."""
    from adaptive_sched.distributed import World
    run = gmm_run()
    run.world = World(rank=0, size=2)
    compile_run(run)
    assert isinstance(run.loss.core_fn, functools.partial)


def test_without_traceable_hooks_compile_run_compiles_the_parts(monkeypatch):
    from adaptive_sched import compiling
    monkeypatch.setattr(compiling, "traces_intermediate_hooks", lambda: False)
    run = gmm_run()
    compile_run(run)
    assert run.loss.core_fn.keywords["parts"][0] is not None and len(run.loss.core_fn.keywords["parts"]) == 2


@pytest.mark.parametrize("objective", ["adaptive", "cvdm"])
def test_a_loss_without_hooks_is_compiled_whole_under_ddp_and_on_any_torch(objective, monkeypatch):
    """Only the variance objective registers hooks; without them a graph break cannot hide a gradient from one."""
    from adaptive_sched import compiling
    from adaptive_sched.distributed import World
    monkeypatch.setattr(compiling, "traces_intermediate_hooks", lambda: False)
    run = gmm_run(objective)
    run.world = World(rank=0, size=2)
    assert not run.loss.uses_gradient_hooks
    compile_run(run)
    assert run.loss.core_fn is not None and not isinstance(run.loss.core_fn, functools.partial)
    variance = gmm_run("variance")
    assert variance.loss.uses_gradient_hooks
    compile_run(variance)
    assert isinstance(variance.loss.core_fn, functools.partial)


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "parts"])
@pytest.mark.parametrize("case", sorted(CORE_CASES))
def test_the_compiled_core_gives_the_eager_loss_and_gradients(case, whole):
    """One loss evaluation, eager and with the core compiled (whole, or in its two parts with the hooks between
    them): the same draws, per-example losses and gradients of every denoiser and schedule parameter (the variance
    hooks included)."""
    if not whole and CORE_CASES[case][0] is None:
        pytest.skip("a fixed schedule has no schedule part")
    from adaptive_sched import weighting
    from adaptive_sched.losses import DiffusionLoss
    from adaptive_sched.models.mlp import MLPDenoiser
    sched_kw, (w_name, w_kw), objective, smoothness = CORE_CASES[case]
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    classes = (sched_kw or {}).get("num_classes", 0)
    sched = schedules.build("laplace") if sched_kw is None else schedules.build("learned", hidden=16, **sched_kw)
    model = MLPDenoiser(4, hidden=32, depth=2, num_classes=classes)
    model_params, sched_params = list(model.parameters()), list(sched.parameters()) if sched_kw else []
    with torch.no_grad():                              # away from the zero output layer and the initial schedule
        for p in model_params + sched_params:
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    loss = DiffusionLoss(sched, "v", weighting.build(w_name, **w_kw), objective, smoothness)
    x0 = torch.randn(64, 4, generator=gen)
    cond = torch.randint(classes, (64,), generator=gen) if classes else None
    params = model_params + sched_params
    histogram = None if loss.histogram is None else {k: v.clone() for k, v in loss.histogram.state_dict().items()}
    results = []
    for compiled in (False, True):
        if histogram is not None:                      # adaptive: both passes fit the same loss histogram
            loss.histogram.load_state_dict(histogram)
        loss.core_fn = compiled_core(loss, whole) if compiled else None
        for p in params:
            p.grad = None
        terms = loss.terms(model, x0, cond, torch.Generator().manual_seed(1), **({"cond": cond} if classes else {}))
        (terms.loss.mean() + terms.extra).backward()
        results.append((terms.loss.detach(), terms.logsnr.detach(), [p.grad for p in params]))
    (loss0, lam0, grads0), (loss1, lam1, grads1) = results
    torch.testing.assert_close(lam1, lam0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss1, loss0, rtol=1e-4, atol=1e-6)
    assert all((g0 is None) == (g1 is None) for g0, g1 in zip(grads0, grads1))
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads0[:len(model_params)])
    sched_grads = [g for g in grads0[len(model_params):] if g is not None and bool(g.abs().sum() > 0)]
    assert len(sched_grads) == len(sched_params)          # φ learns (adaptive: through its fit to the histogram)
    for g0, g1 in zip(grads0, grads1):
        if g0 is not None:
            torch.testing.assert_close(g1, g0, rtol=1e-3, atol=1e-3 * float(g0.abs().max()))   # float noise
