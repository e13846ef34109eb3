"""torch.distributed data parallelism for the trainer (DDP): NCCL on GPU, gloo on CPU, started by torchrun.

`torchrun --standalone --nproc_per_node N -m adaptive_sched train ...` sets WORLD_SIZE/RANK/LOCAL_RANK;
`setup()` reads them. The global batch is split across ranks; the denoiser's gradients are averaged by
DDP, the learned schedule's (a few hundred numbers) by one all-reduce, so every rank holds identical
parameters; `assert_identical` checks that at every checkpoint. Rank 0 evaluates, logs and writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from adaptive_sched.errors import UsageError


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str) -> tuple[World, str]:
    """Join the process group when started by torchrun; return (world, this rank's device name)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device_name
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if torch.cuda.device_count() <= local_rank:
            raise UsageError(f"rank {rank} wants cuda:{local_rank} but only {torch.cuda.device_count()} GPUs are "
                             f"visible; lower --nproc_per_node")
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    else:
        device_name = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank, size, local_rank), device_name


def teardown(world: World) -> None:
    """Leave the process group (after a final barrier)."""
    if world.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.enabled:
        dist.barrier()


def all_reduce_mean_(grads: list[torch.Tensor], world: World) -> None:
    """g ← (1/N) Σ_ranks g, in place, with one all-reduce over the flattened tensors."""
    if not world.enabled or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """Σ_ranks values (a copy; the input is untouched)."""
    values = values.clone()
    if world.enabled:
        dist.all_reduce(values)
    return values


def all_gather_rows(values: torch.Tensor, world: World) -> torch.Tensor:
    """(ranks, *values.shape): every rank's `values`, rank r's in row r (values[None] without torchrun)."""
    if not world.enabled:
        return values[None].clone()
    rows = [torch.empty_like(values) for _ in range(world.size)]
    dist.all_gather(rows, values.contiguous())
    return torch.stack(rows)


def assert_identical(tensors: list[torch.Tensor], world: World, what: str) -> None:
    """Raise if the ranks' copies of `tensors` differ (compares a float64 checksum across ranks)."""
    if not world.enabled or not tensors:
        return
    checksum = torch.stack([t.detach().double().sum() for t in tensors] +
                           [t.detach().double().square().sum() for t in tensors])
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"distributed training went out of sync: the ranks' {what} differ")


def rank0_says(flag: bool, world: World) -> bool:
    """Rank 0's `flag`, on every rank (a broadcast; just `flag` without torchrun)."""
    if not world.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.broadcast(value, src=0)
    return bool(value.item())

