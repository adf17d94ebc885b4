"""The run's store and splits, the training data order (resumable, per rank), loaders, and caption padding for
compiled steps."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler, get_worker_info

from fvlm_data.dataset import CaptionCollator, FeatureDataset, Splits, check_num_frames, split_datasets, to_device
from fvlm_data.errors import StoreError
from fvlm_data.store.reader import FeatureStore

from . import TrainError
from .config import RunConfig, query_blocks


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


def default_workers(local_ranks: int | None = None) -> int:
    """Loader worker processes per rank: the cores this process may use, shared by the ranks on this
    machine, one of each share left to its training loop (at most 16: one worker reads ~1,000 samples/s)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(16, cores // max(1, local_ranks) - 1))


class EpochBatches(Sampler[tuple[int, list[int]]]):
    """Batches of `sampler`'s order, each tagged with the epoch it belongs to: workers that persist
    across epochs take the epoch (random frame offsets, caption choice) from the key, not from a
    dataset attribute set in the main process."""

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool, epoch_of: Any) -> None:
        self.batches, self.epoch_of = BatchSampler(sampler, batch_size, drop_last), epoch_of

    def __iter__(self):
        epoch = self.epoch_of()
        return ((epoch, indices) for indices in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BatchReader(Dataset):
    """A dataset whose items are whole batches, read by `FeatureDataset.read_batch` into batch-shaped
    tensors: in shared memory in a worker (handing them over copies nothing), pinned in the main
    process when the batch goes to a GPU."""

    def __init__(self, ds: FeatureDataset, pin: bool) -> None:
        self.ds, self.pin = ds, pin

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, list[int]]) -> dict[str, Any]:
        epoch, indices = key
        memory = "shared" if get_worker_info() is not None else ("pinned" if self.pin else "plain")
        return self.ds.read_batch(indices, epoch, memory)


def make_loader(ds: FeatureDataset, collate: CaptionCollator, batch_size: int, workers: int,
                sampler: Sampler | None, pin: bool) -> DataLoader:
    """The loader of `ds`: whole batches read in place (one copy from the store), captions tokenised by
    `collate`; workers persist across epochs and validations (iterate it again for the next epoch)."""
    order = sampler if sampler is not None else SequentialSampler(ds)
    keys = EpochBatches(order, batch_size, drop_last=sampler is not None,
                        epoch_of=lambda: getattr(order, "epoch", ds.epoch))
    return DataLoader(BatchReader(ds, pin and workers == 0), batch_size=None, sampler=keys, collate_fn=collate,
                      num_workers=workers, persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None)


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
    splits = split_datasets(store, config.num_frames, config.val_fraction, config.frame_sampling, config.seed)
    for ds in (splits.train, splits.val):  # the deep query also reads the states entering its blocks
        ds.read_block_states(query_blocks(config.query_depth, store.attrs, store.path))
    return splits


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
    position, saved in checkpoints, from which a resumed run continues the same sequence.

    With `device`, batches come on the device: on CUDA the next batches' copies run on a side stream
    in a thread (`DevicePrefetch`) while the loop computes; the position counts batches handed out.
    """

    def __init__(self, ds: FeatureDataset, collate: CaptionCollator, batch_size: int, workers: int, seed: int,
                 rank: int, world: int, pin: bool, epoch: int = 0, micro_in_epoch: int = 0,
                 device: torch.device | None = None) -> None:
        per_rank = len(ds) // world
        if per_rank // batch_size == 0:
            raise TrainError(f"{len(ds)} training videos over {world} process(es) is less than one batch of "
                             f"{batch_size}: lower --batch-size or --val-fraction")
        self.batch_size = batch_size
        self.sampler = ResumableSampler(len(ds), seed, rank, world, per_rank)
        self.loader = make_loader(ds, collate, batch_size, workers, self.sampler, pin)
        self.epoch, self.micro_in_epoch = epoch, micro_in_epoch
        sequence = self._sequence(epoch, micro_in_epoch)
        if device is not None and device.type == "cuda":
            self._it = DevicePrefetch(sequence, device)
        else:
            self._it = ((e, m, to_device(b, device) if device is not None else b) for e, m, b in sequence)

    def _sequence(self, epoch: int, micro: int):
        """(epoch, micro_in_epoch after it, batch), forever: the same loader iterated once per epoch."""
        while True:
            self.sampler.epoch, self.sampler.start = epoch, micro * self.batch_size
            for batch in self.loader:
                micro += 1
                yield epoch, micro, batch
            epoch, micro = epoch + 1, 0

    def __next__(self) -> dict[str, Any]:
        self.epoch, self.micro_in_epoch, batch = next(self._it)
        return batch


class DevicePrefetch:
    """Moves the next `depth` batches to a CUDA device on a side stream, in a thread, while the loop
    computes; each batch is handed out after the compute stream is told to wait for its copy."""

    def __init__(self, source: Iterator[tuple[int, int, dict[str, Any]]], device: torch.device, depth: int = 2):
        self.device, self.stream = device, torch.cuda.Stream(device)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        threading.Thread(target=self._fill, args=(source,), daemon=True, name="fvlm-h2d").start()

    def _fill(self, source: Iterator[tuple[int, int, dict[str, Any]]]) -> None:
        torch.cuda.set_device(self.device)
        try:
            for epoch, micro, batch in source:
                with torch.cuda.stream(self.stream):
                    moved = to_device(batch, self.device)
                    done = torch.cuda.Event()
                    done.record(self.stream)
                self.queue.put((epoch, micro, moved, done))
        except BaseException as e:  # handed to the loop, which raises it
            self.queue.put(e)

    def __next__(self) -> tuple[int, int, dict[str, Any]]:
        got = self.queue.get()
        if isinstance(got, BaseException):
            raise got
        epoch, micro, batch, done = got
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        for v in batch.values():
            if torch.is_tensor(v):
                v.record_stream(compute)  # the allocator must not reuse it while the step runs
        return epoch, micro, batch
