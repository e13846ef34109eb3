"""Diagonal Gaussian mixture with its exact VP posterior mean: the oracle denoiser for tests and floors.

Data x0 ~ Σ_k π_k N(μ_k, diag(s_k²)); noisy x_λ = α·x0 + σ·ε with α² = sigmoid(λ), σ² = sigmoid(−λ).
Given component k, x_λ ~ N(α μ_k, α² s_k² + σ²) per coordinate, so every posterior quantity is closed form.
"""
from __future__ import annotations

import math

import torch

from adaptive_sched.errors import UsageError

_F64 = torch.float64


class GaussianMixture:
    """p(x0) = Σ_k π_k Π_d N(x0_d; μ_kd, s_kd²); parameters stored as float64 tensors on the CPU."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor):
        """weights (K,) > 0 (normalised to sum 1), means (K, D), stds (K, D) > 0."""
        w = torch.as_tensor(weights, dtype=_F64).detach().cpu()
        mu = torch.as_tensor(means, dtype=_F64).detach().cpu()
        s = torch.as_tensor(stds, dtype=_F64).detach().cpu()
        if w.ndim != 1 or mu.ndim != 2 or s.shape != mu.shape or mu.shape[0] != w.shape[0]:
            raise UsageError(f"need weights (K,), means (K, D), stds (K, D); got {tuple(w.shape)}, "
                             f"{tuple(mu.shape)}, {tuple(s.shape)}")
        if not (torch.isfinite(w).all() and torch.isfinite(mu).all() and torch.isfinite(s).all()):
            raise UsageError("mixture parameters must be finite")
        if (w <= 0).any() or (s <= 0).any():
            raise UsageError("mixture weights and stds must be positive")
        self.weights, self.means, self.stds = w / w.sum(), mu, s

    @property
    def num_components(self) -> int:
        """K."""
        return self.weights.shape[0]

    @property
    def dim(self) -> int:
        """D."""
        return self.means.shape[1]

    def sample_labeled(self, n: int, generator: torch.Generator | None = None,
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, k): k ~ Cat(π), x0 = μ_k + s_k ⊙ z with z ~ N(0, I); x0 (n, D) in `dtype`, k (n,) int64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        z = torch.randn(n, self.dim, generator=generator, dtype=_F64)                  # (n, D)
        return (self.means[k] + self.stds[k] * z).to(dtype), k

    def sample(self, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n draws x0 ~ p(x0), shape (n, D)."""
        return self.sample_labeled(n, generator, dtype)[0]

    def mean(self) -> torch.Tensor:
        """E[x0] = Σ_k π_k μ_k, shape (D,)."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Cov[x0] = Σ_k π_k (diag(s_k²) + μ_k μ_kᵀ) − m mᵀ, shape (D, D)."""
        m = self.mean()
        second = torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        return second + torch.diag(self.weights @ self.stds**2) - torch.outer(m, m)

    def log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        """log p(x0) = logsumexp_k [log π_k + Σ_d log N(x0_d; μ_kd, s_kd²)], shape (N,) float64."""
        return self._log_joint(x0.to(_F64).reshape(-1, self.dim), self.means, self.stds**2).logsumexp(-1)

    def _log_joint(self, x: torch.Tensor, loc: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """log π_k + Σ_d log N(x_d; loc_kd, var_kd) for x (N, D), loc/var (K, D) or (N, K, D) -> (N, K)."""
        diff2 = (x[:, None, :] - loc) ** 2 / var                             # (N, K, D)
        log_norm = -0.5 * (diff2 + var.log() + math.log(2 * math.pi)).sum(-1)
        return self.weights.to(x.device).log() + log_norm

    def _posterior(self, x_t: torch.Tensor, logsnr: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (E[x0|x_λ], E[ε|x_λ]) in float64 as (N, D).

        r_k ∝ π_k N(x; αμ_k, v_k), v_k = α² s_k² + σ²;  E[x0|x,k] = μ_k + α s_k² (x − αμ_k)/v_k;
        E[ε|x,k] = σ (x − αμ_k)/v_k  (= (x − α E[x0|x,k])/σ, written without the division by σ).
        """
        x = x_t.to(_F64).reshape(x_t.shape[0], -1)                               # (N, D)
        if x.shape[1] != self.dim:
            raise UsageError(f"x_t has {x.shape[1]} features per example; the mixture has D={self.dim}")
        lam = torch.as_tensor(logsnr, dtype=_F64, device=x.device)
        if lam.ndim == 0:
            lam = lam.expand(x.shape[0])
        if lam.shape != (x.shape[0],):
            raise UsageError(f"logsnr must be a scalar or shape ({x.shape[0]},); got {tuple(lam.shape)}")
        a2, s2 = torch.sigmoid(lam)[:, None, None], torch.sigmoid(-lam)[:, None, None]  # (N, 1, 1)
        a = a2.sqrt()
        mu, var0 = self.means.to(x.device), (self.stds**2).to(x.device)          # (K, D)
        var = a2 * var0 + s2                                                     # (N, K, D) v_k
        resid = x[:, None, :] - a * mu                                           # (N, K, D) x − αμ_k
        w = resid / var                                                          # (N, K, D) (x − αμ_k)/v_k
        logits = self.weights.to(x.device).log() - 0.5 * (resid * w + var.log()).sum(-1)  # (N, K)
        r = torch.softmax(logits, dim=-1)                                        # (N, K) responsibilities
        rw = r[..., None] * w                                                    # (N, K, D)
        x0 = r @ mu + a[:, :, 0] * torch.einsum("nkd,kd->nd", rw, var0)
        eps = s2[:, :, 0].sqrt() * rw.sum(1)
        return x0, eps

    def denoise(self, x_t: torch.Tensor, logsnr: torch.Tensor | float) -> torch.Tensor:
        """Exact posterior mean E[x0 | x_λ = x_t] (see `_posterior`); λ scalar or (N,); returns x_t's dtype."""
        return self._posterior(x_t, logsnr)[0].to(x_t.dtype).reshape(x_t.shape)

    def eps_hat(self, x_t: torch.Tensor, logsnr: torch.Tensor | float) -> torch.Tensor:
        """Exact E[ε | x_λ] = (x_t − α E[x0|x_λ])/σ (computed per component, finite as σ → 0)."""
        return self._posterior(x_t, logsnr)[1].to(x_t.dtype).reshape(x_t.shape)

    def mmse(self, logsnr: float, n: int = 100_000, generator: torch.Generator | None = None) -> float:
        """Monte-Carlo E‖x0 − E[x0|x_λ]‖²/D at one λ: the floor for any denoiser's x0-MSE there."""
        x0 = self.sample(n, generator, dtype=_F64)
        eps = torch.randn(x0.shape, generator=generator, dtype=_F64)
        lam = torch.tensor(float(logsnr), dtype=_F64)
        x_t = torch.sigmoid(lam).sqrt() * x0 + torch.sigmoid(-lam).sqrt() * eps
        return float(((x0 - self.denoise(x_t, lam)) ** 2).mean())


def make_gmm(dim: int = 16, k: int = 8, seed: int = 0) -> GaussianMixture:
    """Fixed seeded mixture: π_k ∝ 0.5 + U(0,1), s_kd ~ U(0.2, 0.6), μ_kd ~ N(0, 1) then spread about the
    mixture mean m_d so that Var[x0_d] = Σ_k π_k (s_kd² + (μ_kd − m_d)²) = 1 exactly in every coordinate (k ≥ 2)."""
    if dim < 1 or k < 1:
        raise UsageError(f"make_gmm needs dim >= 1 and k >= 1; got dim={dim}, k={k}")
    g = torch.Generator().manual_seed(seed)
    weights = 0.5 + torch.rand(k, generator=g, dtype=_F64)
    weights = weights / weights.sum()
    stds = 0.2 + 0.4 * torch.rand(k, dim, generator=g, dtype=_F64)
    means = torch.randn(k, dim, generator=g, dtype=_F64)
    m = weights @ means                                                          # (D,)
    spread = weights @ (means - m) ** 2                                          # (D,) variance of the means
    scale = ((1 - weights @ stds**2) / spread.clamp_min(1e-12)).sqrt()
    return GaussianMixture(weights, m + scale * (means - m), stds)


def make_gmm_dataset(split: str = "train", n: int = 20000, dim: int = 16, seed: int = 0, k: int = 8):
    """The "gmm" Dataset: mixture make_gmm(dim, k, seed=0) always (train and test share it); samples drawn
    with generator seed `seed` (train) or `seed + 1_000_003` (test); y = component index, oracle = mixture."""
    from adaptive_sched.data.dataset import Dataset  # deferred: dataset.py may import this module

    if split not in ("train", "test"):
        raise UsageError(f"unknown split {split!r}; choose one of: train, test")
    mixture = make_gmm(dim=dim, k=k, seed=0)
    g = torch.Generator().manual_seed(seed if split == "train" else seed + 1_000_003)
    x, y = mixture.sample_labeled(n, generator=g)
    return Dataset(name="gmm", x=x, y=y, num_classes=k, oracle=mixture)
