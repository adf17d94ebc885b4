"""Counting the reads of tensor values back to the host (each one waits for the device on a GPU):
what `bench/train_step.py` reports per step and a test holds at 0 for a non-logging step."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def count_host_reads() -> Iterator[Counter]:
    """Inside: every `.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `float()`, `int()`, `bool()` of a
    tensor is counted by name (on a CPU run too, where it stands for the sync it would be on a GPU)."""
    counts: Counter = Counter()
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name: str, original):  # noqa: ANN001, ANN202
        def read(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            counts[name] += 1
            return original(self, *args, **kwargs)
        return read

    for name, original in saved.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
