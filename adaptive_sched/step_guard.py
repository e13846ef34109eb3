"""Non-finite steps without host syncs: skip the optimizer update, count it, track the streak on the device."""
from __future__ import annotations

import torch


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor: every entry of every tensor is finite (one fused norm; identical on all ranks)."""
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.nn.utils.get_total_norm(tensors))


def new_running(device: torch.device) -> torch.Tensor:
    """The on-device accumulator train_step fills: [loss sum, finite steps, skipped steps, non-finite streak]."""
    return torch.zeros(4, device=device)


def optimizer_step_unless(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> bool:
    """Step the optimizer only when `finite` (a 0-d bool tensor) holds; return whether the caller should proceed.

    Fused AdamW/Adam skip the update on the device (their found_inf input), so CUDA runs never sync here;
    other optimizers read the flag on the host (free on CPU, one sync per step on CUDA).
    """
    if optimizer.param_groups[0].get("fused"):
        optimizer.found_inf = (~finite).float()
        optimizer.step()
        return True                 # the EMA of unchanged weights and the histogram are harmless to update
    if bool(finite):
        optimizer.step()
        return True
    return False


def update_running(running: torch.Tensor, loss: torch.Tensor, finite: torch.Tensor) -> None:
    """Accumulate [loss sum, finite count, skipped count, current non-finite streak] without a host sync."""
    ok = finite.float()
    running[0] += torch.where(finite, loss, torch.zeros_like(loss))
    running[1] += ok
    running[2] += 1.0 - ok
    running[3] = (running[3] + 1.0) * (1.0 - ok)
