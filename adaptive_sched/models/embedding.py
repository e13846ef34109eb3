"""Conditioning shared by every denoiser: a logSNR embedding plus an optional class embedding.

Networks are conditioned on λ = log(α²/σ²), never on t, so one network serves every schedule.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from adaptive_sched.errors import UsageError

LOGSNR_CLAMP = 30.0  # |λ| beyond this carries no usable signal: σ² = sigmoid(−30) ≈ 1e-13
LOGSNR_SCALE = 4.0   # c = λ / 4 maps the useful range [-20, 20] to [-5, 5]


class LogSNREmbedding(nn.Module):
    """λ → (N, dim): sinusoids of c = clamp(λ, ±30)/4 at frequencies 1..1000, then Linear→SiLU→Linear (the
    middle `hidden` wide, default dim).

    λ is clamped to [-30, 30] first, so λ = ±inf (clean data / pure noise) gives finite features.
    With `num_classes > 0` a class embedding is added; index `num_classes` is the null
    (unconditional) class, used for the whole batch when `y is None` (classifier-free guidance).
    """

    def __init__(self, dim: int, num_classes: int = 0, num_freqs: int = 64, max_freq: float = 1000.0,
                 hidden: int | None = None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"emb_dim must be an integer >= 1, got {dim!r}")
        # Geometric spacing 1 .. max_freq, as transformer position encodings (Vaswani et al. 2017).
        freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), num_freqs))
        self.register_buffer("freqs", freqs, persistent=False)
        hidden = dim if hidden is None else hidden
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.num_classes = num_classes
        self.classes = nn.Embedding(num_classes + 1, dim) if num_classes > 0 else None

    def forward(self, logsnr: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Embed λ (N,) and optional labels y (N,) int64 into (N, dim)."""
        c = logsnr.to(self.freqs.dtype).clamp(-LOGSNR_CLAMP, LOGSNR_CLAMP) / LOGSNR_SCALE
        angles = c[:, None] * self.freqs[None, :]  # (N, F)
        emb = self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))  # (N, dim)
        if self.classes is None:
            if y is not None:
                raise UsageError("class labels y were given, but the model was built with num_classes=0")
            return emb
        if y is None:
            y = torch.full(logsnr.shape, self.num_classes, dtype=torch.long, device=logsnr.device)
        return emb + self.classes(y)
