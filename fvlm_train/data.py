"""The run's store and splits, the training data order (resumable, per rank), loaders, and caption padding for
compiled steps."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from fvlm_data.dataset import CaptionCollator, FeatureDataset, Splits, check_num_frames, split_datasets
from fvlm_data.store import FeatureStore, StoreError

from . import TrainError
from .config import RunConfig


class ResumableSampler(Sampler[int]):
    """A fresh permutation per epoch from (seed, epoch); this rank takes every world-th index.

    `start` skips the samples already consumed in the epoch, so a resumed run continues the
    exact sample sequence of an uninterrupted one.
    """

    def __init__(self, n: int, seed: int, rank: int, world: int, per_rank: int) -> None:
        self.n, self.seed, self.rank, self.world, self.per_rank = n, seed, rank, world, per_rank
        self.epoch, self.start = 0, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[self.rank :: self.world][: self.per_rank]
        return iter(perm[self.start :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


def default_workers() -> int:
    """Loader processes: one core is left to the training loop, at most 4 (PyTorch warns above the
    cores this process may use)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))


def make_loader(ds: FeatureDataset, collate: CaptionCollator, batch_size: int, workers: int,
                sampler: Sampler | None, pin: bool) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
                      pin_memory=pin, drop_last=sampler is not None, persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None)


def open_store(path: str) -> FeatureStore:
    """The run's store, opened once; not a store, or no videos in it, is a TrainError."""
    try:
        store = FeatureStore.open(path)
    except StoreError as e:
        raise TrainError(str(e)) from None
    if len(store) == 0:
        if store.failures:
            raise TrainError(f"{path} has no committed videos: every input failed: see "
                             f"`python -m fvlm_data.inspect {path}` for the reasons")
        raise TrainError(f"{path} has no committed videos: run precompute.py first")
    return store


def open_splits(store: FeatureStore, config: RunConfig) -> Splits:
    """The training and held-out datasets of the run, from one read of the store's video ids."""
    try:
        check_num_frames(config.num_frames, store)
    except ValueError:  # the same check, in the command line's words
        raise TrainError(f"--num-frames {config.num_frames} but {store.path} stores {store.attrs['num_frames']} "
                         "frames per video") from None
    return split_datasets(store, config.num_frames, config.val_fraction, config.frame_sampling, config.seed)


def pad_captions(batch: dict[str, Any], multiple: int, pad_id: int) -> dict[str, Any]:
    """Right-pad input_ids (pad_id) and labels (-100) to a multiple of `multiple` tokens.

    Changes no loss: padding is causal-masked from every real position and its labels are ignored.
    It bounds the caption lengths a compiled model sees (64-token captions: 4 shapes, not 64).
    """
    extra = -batch["input_ids"].shape[1] % multiple
    if extra == 0:
        return batch
    pad = (0, extra)
    return {**batch, "input_ids": torch.nn.functional.pad(batch["input_ids"], pad, value=pad_id),
            "labels": torch.nn.functional.pad(batch["labels"], pad, value=-100)}


class TrainBatches:
    """The training micro-batches of one rank, epoch after epoch; (epoch, micro_in_epoch) is its
    position, saved in checkpoints, from which a resumed run continues the same sequence."""

    def __init__(self, ds: FeatureDataset, collate: CaptionCollator, batch_size: int, workers: int, seed: int,
                 rank: int, world: int, pin: bool, epoch: int = 0, micro_in_epoch: int = 0) -> None:
        per_rank = len(ds) // world
        if per_rank // batch_size == 0:
            raise TrainError(f"{len(ds)} training videos over {world} process(es) is less than one batch of "
                             f"{batch_size}: lower --batch-size or --val-fraction")
        self.ds, self.collate, self.batch_size, self.workers, self.pin = ds, collate, batch_size, workers, pin
        self.sampler = ResumableSampler(len(ds), seed, rank, world, per_rank)
        self.epoch, self.micro_in_epoch = epoch, micro_in_epoch
        self._it = self._start()

    def _start(self):
        self.sampler.epoch, self.sampler.start = self.epoch, self.micro_in_epoch * self.batch_size
        self.ds.set_epoch(self.epoch)
        return iter(make_loader(self.ds, self.collate, self.batch_size, self.workers, self.sampler, self.pin))

    def __next__(self) -> dict[str, Any]:
        batch = next(self._it, None)
        if batch is None:  # end of epoch: the next permutation
            self.epoch, self.micro_in_epoch = self.epoch + 1, 0
            self._it = self._start()
            batch = next(self._it)
        self.micro_in_epoch += 1
        return batch
