"""Per-step random generators: one seed per (run seed, step[, rank]), mixed so that every bit depends on all of them.

torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so a seed like (seed << 32) + step gave every
run seed the same draws at the same step on CPU (CUDA's Philox keeps all 64 bits). splitmix64 (Steele, Lea & Flood
2014) is a bijection of 64-bit integers whose every output bit depends on every input bit.
"""
from __future__ import annotations

import torch

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One splitmix64 output for state x: z = x + φ·2^64; z ^= z >> 30; z *= c1; z ^= z >> 27; z *= c2; z ^= z >> 31."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def mixed_seed(seed: int, step: int, rank: int | None = None) -> int:
    """A 64-bit seed from (seed, step) or (seed, step, rank); its low 32 bits differ between any two of them but
    with probability ~2^-32."""
    value = splitmix64(((seed << 32) + step) & MASK64)
    return value if rank is None else splitmix64(value ^ (rank + 1))


def step_generator(seed: int, step: int, device: torch.device, rank: int | None = None) -> torch.Generator:
    """The generator for every random draw of step `step` (of one rank, under DDP)."""
    return torch.Generator(device).manual_seed(mixed_seed(seed, step, rank))
