"""Non-finite steps: skipped whatever made them non-finite, and skipped alike on the plain and the fused path."""
import math

import pytest
import torch

from adaptive_sched import config as cfg
from adaptive_sched.losses import DiffusionLoss
from adaptive_sched.run_build import build
from adaptive_sched.step_guard import new_running
from adaptive_sched.train import train_step


def small_config(**overrides) -> cfg.RunConfig:
    raw = {"data": {"name": "gmm", "n": 400, "dim": 4}, "model": {"name": "mlp", "hidden": 32, "depth": 2},
           "train": {"steps": 20, "batch_size": 16, "lr": 2e-3, "warmup": 3, "target": "v", "device": "cpu"},
           "eval": {"every": 20, "n": 50, "sample_n": 0, "logsnr_points": 3}}
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    return cfg.from_dict(raw)


def snapshot(run) -> list[torch.Tensor]:
    """Everything a skipped step must leave as it was: weights, φ, the EMA, the loss histogram."""
    return [t.detach().clone() for t in [*run.model.parameters(), *run.schedule_params, *run.ema.params,
                                         run.loss_bins.value, run.loss_bins.seen]]


def poison_gradient(param: torch.nn.Parameter):
    """After backward, set one parameter's gradient to +inf (the loss stays finite)."""
    def hook(p):
        p.grad.fill_(math.inf)
    return param.register_post_accumulate_grad_hook(hook)


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_a_non_finite_schedule_gradient_is_skipped_though_the_loss_is_finite(grad_clip):
    """In one process only the loss (and, with clipping, the denoiser's norm) was checked: an overflowing gradient
    of the learned schedule's φ was stepped, and AdamW left φ NaN for good (DDP checked φ's gradients)."""
    run = build(small_config(schedule={"name": "learned", "init": "none", "hidden": 8}, learned={"objective": "cvdm"},
                             train={"grad_clip": grad_clip}))
    running = new_running(run.device)
    for step in range(3):
        train_step(run, step, running)
    before = snapshot(run)
    handle = poison_gradient(run.schedule_params[0])
    train_step(run, 3, running)
    handle.remove()
    after = snapshot(run)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert running.tolist()[1:] == [3.0, 1.0, 1.0]           # 3 finite steps, 1 skipped, a streak of 1
    train_step(run, 4, running)                               # and training goes on, finite
    assert all(torch.isfinite(p).all() for p in run.schedule_params) and running.tolist()[1:] == [4.0, 1.0, 0.0]


def test_a_non_finite_denoiser_gradient_is_skipped_without_clipping():
    """grad_clip = 0: the clipping norm was the only check of the denoiser's gradients, so an inf gradient with a
    finite loss made the weights NaN."""
    run = build(small_config(train={"grad_clip": 0.0}))
    running = new_running(run.device)
    train_step(run, 0, running)
    before = snapshot(run)
    handle = poison_gradient(next(run.model.parameters()))
    train_step(run, 1, running)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(run)))
    assert running.tolist()[1:] == [1.0, 1.0, 1.0]


def poison_loss(patched):
    """Make every loss NaN while `patched` (a monkeypatch context) lasts."""
    original = DiffusionLoss.terms

    def terms(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.loss = out.loss * math.nan
        return out
    patched.setattr(DiffusionLoss, "terms", terms)


def fused_adamw(run):
    """The optimizer CUDA runs get (fused AdamW, skipping on the device through found_inf), here on the CPU."""
    try:
        return torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                                  for g in run.optimizer.param_groups], lr=run.config.train.lr, fused=True)
    except (RuntimeError, TypeError) as err:
        pytest.skip(f"fused AdamW on the CPU: {err}")


def a_poisoned_step_moves_nothing(run, monkeypatch, steps: int):
    """Train `steps` finite steps, then one whose loss is NaN; assert that step moved no weight, EMA or histogram and
    was counted skipped; return (running, the snapshot before it)."""
    running = new_running(run.device)
    for step in range(steps):
        train_step(run, step, running)
    before = snapshot(run)
    with monkeypatch.context() as patched:
        poison_loss(patched)
        train_step(run, steps, running)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(run)))
    assert running.tolist()[1:] == [float(steps), 1.0, 1.0]
    return running, before


def test_the_fused_path_skips_a_non_finite_step_as_the_plain_one_does(monkeypatch):
    """Fused AdamW skips on the device and the step went on to update the EMA (moving it towards the unchanged
    weights: 0.6 of the way at step 5) and the loss histogram; the plain path leaves both alone. Now both do."""
    runs = {}
    for fused in (False, True):
        run = build(small_config())
        if fused:
            run.optimizer = fused_adamw(run)
        running, before = a_poisoned_step_moves_nothing(run, monkeypatch, 5)
        train_step(run, 6, running)                       # the next step updates the EMA again
        assert not all(torch.equal(a, b) for a, b in zip(before, snapshot(run)))
        runs[fused] = run
    plain, fused = runs[False], runs[True]
    for a, b in zip(plain.ema.params, fused.ema.params):   # the two optimizers agree to rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_checkpoints_running_sums_go_back_to_the_rank_that_made_them():
    """[loss sum, finite steps, skipped, streak]: DDP saves one row per rank; each rank takes its own back; on another
    number of ranks rank 0 takes all the loss sums and the others none (the last two are the same on every rank)."""
    from adaptive_sched.step_guard import restored_running
    cpu = torch.device("cpu")
    one = torch.tensor([3.5, 5.0, 1.0, 0.0])
    assert restored_running(one, 0, 1, cpu).tolist() == [3.5, 5.0, 1.0, 0.0]
    rows = torch.tensor([[3.5, 5.0, 1.0, 1.0], [4.25, 5.0, 1.0, 1.0]])
    assert [restored_running(rows, r, 2, cpu).tolist() for r in (0, 1)] == [[3.5, 5.0, 1.0, 1.0],
                                                                          [4.25, 5.0, 1.0, 1.0]]
    assert restored_running(rows, 0, 1, cpu).tolist() == [7.75, 10.0, 1.0, 1.0]        # 2 ranks saved, 1 resumes
    assert [restored_running(one, r, 2, cpu).tolist() for r in (0, 1)] == [[3.5, 5.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
    assert restored_running(torch.tensor([3.5, 5.0]), 0, 1, cpu).tolist() == [3.5, 5.0, 0.0, 0.0]   # before the counters


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_cuda_the_fused_optimizer_skips_a_non_finite_step_and_the_ema_stays(monkeypatch):
    run = build(small_config(train={"device": "cuda"}))
    assert run.optimizer.param_groups[0]["fused"]
    a_poisoned_step_moves_nothing(run, monkeypatch, 3)
