"""Held-out evaluation against the exact Gaussian-mixture denoiser: no excess error, whatever the caller's precision."""
from __future__ import annotations

import pytest
import torch

from adaptive_sched.data.gmm import make_gmm
from adaptive_sched.diffusion import convert
from adaptive_sched.evaluate import eval_grid, loss_profile, summarize
from adaptive_sched.generate import full_precision
from adaptive_sched.likelihood import vlb

DIM = 8
MIX = make_gmm(dim=DIM, k=4, seed=0)


class ExactWithLinearHead(torch.nn.Module):
    """The exact denoiser, predicting `target`, behind an identity nn.Linear: under bf16 autocast its output is
    rounded to bf16, as the last Linear or Conv of a real network's is."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.head = torch.nn.Linear(DIM, DIM)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(DIM))
            self.head.bias.zero_()

    def forward(self, x, logsnr, y=None):
        eps = MIX.eps_hat(x.double(), logsnr.double())
        return self.head(convert(eps, x.double(), logsnr.double(), "eps", self.target).float())


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_exact_denoiser_has_no_excess_even_inside_a_bf16_autocast(target):
    x0 = MIX.sample(2000, torch.Generator().manual_seed(0)).float()
    grid = eval_grid(-10.0, 10.0, 21)
    with torch.autocast("cpu", dtype=torch.bfloat16):     # what a caller in a bf16 training step would leave on
        profile = loss_profile(ExactWithLinearHead(target), target, x0, None, grid, oracle=MIX)
    excess = profile["eps_mse"] - profile["oracle_eps_mse"]
    # float32 leaves ~1e-7; the x0 model's bf16 output alone gave +0.0056 on the mean and +0.074 at λ = 10
    assert summarize(profile)["eval_excess_mse"] == pytest.approx(0.0, abs=1e-5)
    assert excess.abs().max() < 1e-4


def test_vlb_of_an_x0_model_is_the_same_inside_a_bf16_autocast():
    x0 = MIX.sample(300, torch.Generator().manual_seed(1)).float()
    model = ExactWithLinearHead("x0")
    plain = vlb(model, "x0", x0, n_lambda=4)["bpd"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = vlb(model, "x0", x0, n_lambda=4)["bpd"]
    assert inside == pytest.approx(plain, rel=1e-6)


def test_full_precision_turns_autocast_off_inside_and_back_on_after():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with full_precision(torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
            assert torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
        assert torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
