"""The Dataset container every loader returns."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Dataset:
    """A named tensor dataset: vectors (N, D) or images (N, C, H, W) in [-1, 1], optional labels."""

    name: str
    x: torch.Tensor  # float32; (N, D) or (N, C, H, W)
    y: torch.Tensor | None = None  # (N,) int64 class labels, or None
    num_classes: int = 0  # 0 when unlabeled
    oracle: object | None = None  # e.g. the GaussianMixture for gmm (exact denoiser)

    @property
    def kind(self) -> str:
        """"image" for (N, C, H, W) data, "vector" otherwise."""
        return "image" if self.x.ndim == 4 else "vector"

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-example shape, x.shape[1:]."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        """Number of examples."""
        return int(self.x.shape[0])

    def to(self, device: torch.device | str) -> "Dataset":
        """A copy with x and y moved to `device` (the oracle is shared, not moved)."""
        y = None if self.y is None else self.y.to(device)
        return replace(self, x=self.x.to(device), y=y)
