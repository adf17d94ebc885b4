"""Process group setup for torchrun (NCCL on GPUs, gloo on CPU) and the few collectives used.

The rank layout is `fvlm_data.environment.Launch`, read from torchrun's environment there.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from fvlm_data.environment import Launch, torchrun_launch

from . import TrainError

ONE_PROCESS = Launch(rank=0, world_size=1, local_rank=0, local_world_size=1)


def init_distributed() -> Launch:
    """One process, or the process group torchrun describes in the environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ONE_PROCESS
    launch = torchrun_launch()
    if launch is None:
        raise TrainError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but RANK, LOCAL_RANK, MASTER_ADDR or "
                         "MASTER_PORT is not set: start several processes with torchrun")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank)
    return launch


def all_sum(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """Sum over processes (a copy; the identity with one process)."""
    values = values.clone()
    if world_size > 1:
        dist.all_reduce(values)
    return values


def any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """True on every rank if it is true on any (so all ranks take the same branch)."""
    return bool(all_sum(torch.tensor([float(flag)], device=device), world_size).item() > 0)


def shutdown(world_size: int) -> None:
    if world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
