"""Sampling from a trained denoiser (adaptive_sched.generate): x̂0 clipping to the data range."""
import numpy as np
import pytest
import torch

from adaptive_sched import config as cfg
from adaptive_sched.diffusion import alpha_sigma
from adaptive_sched.errors import UsageError
from adaptive_sched.generate import generate, x0_denoiser


class Tripler(torch.nn.Module):
    """An x0-predicting 'network' whose x̂0 = 3x leaves [-1, 1] for |x| > 1/3."""

    def forward(self, x, logsnr, y=None):
        return 3 * x


def test_clipping_clamps_the_denoisers_x0_and_nothing_else():
    x, lam = torch.linspace(-1, 1, 12).reshape(3, 1, 2, 2), torch.zeros(3)
    plain = x0_denoiser(Tripler(), "x0")(x, lam)
    clipped = x0_denoiser(Tripler(), "x0", clip=True)(x, lam)
    torch.testing.assert_close(plain, 3 * x)
    torch.testing.assert_close(clipped, (3 * x).clamp(-1, 1))


def test_ddim_steps_from_the_clipped_x0():
    """One DDIM step by hand: ε̂ comes from the clipped x̂0, x₁ = α₁ x̂0 + σ₁ ε̂, the output is x̂0(x₁) clipped."""
    grid = torch.tensor([-2.0, 1.0])
    x_init = torch.randn((5, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    alpha, sigma = alpha_sigma(grid)
    x0 = (3 * x_init).clamp(-1, 1)
    x1 = alpha[1] * x0 + sigma[1] * (x_init - alpha[0] * x0) / sigma[0]
    want = (3 * x1).clamp(-1, 1)
    got = generate(Tripler(), "x0", (1, 2, 2), 5, grid, "ddim", seed=0, clip_x0=True)
    torch.testing.assert_close(got, want)
    unclipped = generate(Tripler(), "x0", (1, 2, 2), 5, grid, "ddim", seed=0)
    assert unclipped.abs().max() > 1 and got.abs().max() <= 1


def digits_config(**eval_overrides):
    raw = {"data": {"name": "digits"}, "model": {"name": "unet", "channels": [8], "emb_dim": 16, "mid_blocks": 0},
           "train": {"steps": 4, "batch_size": 16, "log_every": 2, "checkpoint_every": 2, "target": "eps"},
           "eval": {"every": 4, "n": 20, "sample_n": 20, "sample_steps": 3, "features": "none", **eval_overrides}}
    return cfg.from_dict(raw)


def test_clip_x0_runs_through_training_eval_and_sampling(tmp_path):
    from adaptive_sched.cli import main
    from adaptive_sched.train import train
    train(digits_config(clip_x0=True), tmp_path / "run", progress=False)
    assert "clip_x0 = true" in (tmp_path / "run" / "config.toml").read_text()
    out = tmp_path / "x.npz"
    assert main(["sample", str(tmp_path / "run"), "--n", "8", "--out", str(out), "--device", "cpu"]) == 0
    assert np.abs(np.load(out)["x"]).max() <= 1.0 and np.load(out)["clip_x0"]     # the run's own setting
    assert main(["sample", str(tmp_path / "run"), "--n", "8", "--out", str(out), "--device", "cpu",
                 "--no-clip-x0"]) == 0                                # and turned off for one call
    assert np.abs(np.load(out)["x"]).max() > 1.0 and not np.load(out)["clip_x0"]
    train(digits_config(), tmp_path / "plain", progress=False)
    assert main(["sample", str(tmp_path / "plain"), "--n", "8", "--out", str(out), "--device", "cpu"]) == 0
    assert np.abs(np.load(out)["x"]).max() > 1.0                    # 4 steps of ε-prediction: x̂0 = (x − σε̂)/α overshoots
    assert main(["sample", str(tmp_path / "plain"), "--n", "8", "--out", str(out), "--device", "cpu",
                 "--clip-x0"]) == 0                                   # the flag turns it on for a run without it
    assert np.abs(np.load(out)["x"]).max() <= 1.0


def test_clip_x0_is_refused_for_vectors(tmp_path):
    from adaptive_sched.train import train
    raw = {"data": {"name": "gmm", "n": 200, "dim": 2}, "model": {"name": "mlp", "hidden": 16, "depth": 1},
           "train": {"steps": 2, "batch_size": 16}, "eval": {"clip_x0": True}}
    with pytest.raises(UsageError, match="clip_x0 .* images"):
        train(cfg.from_dict(raw), tmp_path / "run", progress=False)
