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


def restored_running(saved: torch.Tensor, rank: int, ranks: int, device: torch.device) -> torch.Tensor:
    """This rank's accumulator from a checkpoint's `running`: (4,) saved by one process, (saved ranks, 4) under DDP,
    where each rank takes its own row back (each holds its own half-batches' loss sum since the last log row).
    Resumed on another number of ranks, rank 0 takes the loss sums and counts and the others none; the skipped count
    and the streak, the same on every rank, go to all. A (2,) one from before the non-finite counters gets zeros."""
    rows = saved.reshape(-1, saved.shape[-1]).float()
    if rows.shape[1] == 2:
        rows = torch.cat([rows, torch.zeros(len(rows), 2)], dim=1)
    if len(rows) == ranks:
        return rows[rank].clone().to(device)
    mine = rows[0].clone()
    mine[:2] = rows[:, :2].sum(0) if rank == 0 else 0.0
    return mine.to(device)


def optimizer_step_unless(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> bool | torch.Tensor:
    """Step the optimizer only when `finite` (a 0-d bool tensor) holds. Return True or False where the host decided
    (stepped or skipped), or `finite` itself where the device did: the caller's own updates (EMA, histograms) must
    then follow it on the device too.

    Fused AdamW/Adam skip the update on the device (their found_inf input), so CUDA runs never sync here;
    other optimizers read the flag on the host (free on CPU, one sync per step on CUDA).
    """
    if optimizer.param_groups[0].get("fused"):
        optimizer.found_inf = (~finite).float()
        optimizer.step()
        return finite
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
