"""Residual MLP denoiser for 2-D toy data and 16–64-D vectors, conditioned on logSNR."""
from __future__ import annotations

import torch
from torch import nn

from adaptive_sched.errors import UsageError
from adaptive_sched.models.embedding import LogSNREmbedding


class MLPBlock(nn.Module):
    """Pre-norm residual block h + Linear(SiLU(Linear(LN(h)·(1+scale) + shift))), FiLM from the embedding."""

    def __init__(self, hidden: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.film = nn.Linear(emb_dim, 2 * hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """h (N, hidden), emb (N, emb_dim) → (N, hidden)."""
        scale, shift = self.film(self.act(emb)).chunk(2, dim=1)  # (N, hidden) each
        z = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(self.act(self.fc1(z)))


class MLPDenoiser(nn.Module):
    """MLP denoiser model(x (N, D), λ (N,), y=None) → (N, D); the output layer starts at zero."""

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, emb_dim: int = 128, num_classes: int = 0):
        super().__init__()
        if not (isinstance(hidden, int) and isinstance(depth, int) and hidden >= 1 and depth >= 0):
            raise ValueError(f"hidden must be an integer >= 1 and depth an integer >= 0, got {hidden!r} and {depth!r}")
        self.dim = dim
        self.embed = LogSNREmbedding(emb_dim, num_classes)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, emb_dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, logsnr: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the network target for x (N, D) at logSNR λ (N,) (a scalar λ is broadcast)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UsageError(f"MLPDenoiser expects x of shape (N, {self.dim}), got {tuple(x.shape)}")
        emb = self.embed(logsnr.expand(x.shape[:1]), y)  # (N, emb_dim)
        h = self.inp(x)  # (N, hidden)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(torch.nn.functional.silu(self.out_norm(h)))
