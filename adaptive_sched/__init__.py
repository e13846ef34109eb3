"""adaptive_sched: noise schedules for diffusion training as densities over logSNR λ = log(α²/σ²).

Fixed schedules (adaptive_sched.schedules), a learned monotone schedule trained with the denoiser,
the trainer (adaptive_sched.train), comparisons (compare), Optuna sweeps (sweep) and the CLI
(`adaptive-sched`, adaptive_sched.cli). Importing the package needs torch and numpy only.
"""
__version__ = "0.1.0"
