"""Precompute under torchrun: each rank is process RANK of WORLD_SIZE, on its own GPU.

    torchrun --nproc_per_node 8 precompute.py --out S ...            # one machine, 8 GPUs
    torchrun --nnodes N --nproc_per_node 8 --rdzv-endpoint HOST:PORT ... precompute.py --out S ...

The process group (gloo: it needs no GPU and no NCCL) carries only two things: the barrier
that lets rank 0 create the store before the others open it, and the gathering of every rank's
summary so that rank 0 prints one. The store itself is shared through its path or URL.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist

from fvlm_data.environment import Launch

# Ranks wait for each other twice: while rank 0 loads models and creates the store, and at the end
# until the slowest rank finishes its share, which on a large run can be hours after the fastest.
GROUP_TIMEOUT = timedelta(days=7)


class RankGroup:
    """The gloo process group of one precompute run."""

    def __init__(self, launch: Launch) -> None:
        self.launch = launch
        dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)

    def barrier(self) -> None:
        dist.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (in rank order); None on the other ranks."""
        out: list[Any] | None = [None] * self.launch.world_size if self.launch.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        # No rank tears its group down while rank 0 may still be receiving: once in the suite (1 of 5 runs) rank 0
        # aborted ("terminate called without an active exception") after the other rank had left.
        dist.barrier()
        return out

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
