"""Process group setup for torchrun (NCCL on GPUs, gloo on CPU) and the few collectives used."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """One process, or the process group torchrun describes in the environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(d.local_rank)
    return d


def all_sum(values: torch.Tensor, world: int) -> torch.Tensor:
    """Sum over processes (a copy; the identity with one process)."""
    values = values.clone()
    if world > 1:
        dist.all_reduce(values)
    return values


def any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank if it is true on any (so all ranks take the same branch)."""
    return bool(all_sum(torch.tensor([float(flag)], device=device), world).item() > 0)


def shutdown(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()
