"""A lazy torch Dataset over a feature store, and the collate function that tokenises captions."""

from __future__ import annotations

import copy
import hashlib
import os
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from fvlm_data.file_ids import file_ids
from fvlm_data.sources.synthetic import get_task, parse_source_tag, synthetic_vocabulary
from fvlm_data.store.format import SCALE_SUFFIX, block_array
from fvlm_data.store.reader import FeatureStore

SPLITS = ("train", "val", "all")

# What the trainer takes from here; `synthetic_vocabulary` (the words of the synthetic captions) is the
# tiny tokenizer's vocabulary, and `synthetic_frames` renders a synthetic row's pixels for the attention figures.
__all__ = ["FeatureDataset", "CaptionCollator", "split_datasets", "to_device", "synthetic_frames",
           "synthetic_vocabulary"]


def validation_mask(video_ids: list[str], val_fraction: float) -> np.ndarray:
    """Deterministic split by video id (stable across runs, machines and store re-orderings):
    True where the id is held out. The first 8 bytes of its SHA-1, little-endian, mod 10^6, against
    the fraction; 1M ids in about a second."""
    sha1 = hashlib.sha1
    digests = b"".join([sha1(v.encode("utf-8")).digest()[:8] for v in video_ids])
    return np.frombuffer(digests, dtype="<u8") % 1_000_000 < val_fraction * 1_000_000


def is_validation(video_id: str, val_fraction: float) -> bool:
    """`validation_mask` of one id."""
    return bool(validation_mask([video_id], val_fraction)[0])


def frame_indices(stored: int, wanted: int, offset: float = 0.5) -> np.ndarray:
    """`wanted` of `stored` frames, evenly spaced; offset in [0, 1) shifts within each stride."""
    stride = stored / wanted
    return np.minimum((np.arange(wanted) * stride + offset * stride).astype(np.int64), stored - 1)


def check_num_frames(num_frames: int, store: FeatureStore) -> None:
    """A sample takes at most the frames stored per video (ValueError otherwise)."""
    stored = int(store.attrs["num_frames"])
    if not 1 <= num_frames <= stored:
        raise ValueError(f"asked for {num_frames} frames per sample but the store holds {stored} per video")


def split_slots(store: FeatureStore, val_fraction: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(training slots, held-out slots, the held-out videos' ids) of the committed videos: see `split_by_file`."""
    train, val, val_ids, _, note = split_by_file(store, val_fraction)
    if note:
        warnings.warn(note, stacklevel=2)
    return train, val, val_ids


def split_by_file(store: FeatureStore, val_fraction: float) -> tuple[np.ndarray, np.ndarray, list[str], list[str],
                                                                      str | None]:
    """(training slots, held-out slots, the held-out videos' ids, their files' ids, a note or None) of the
    committed videos, split by `validation_mask` of the *file* each row was cut from, so that no row of a
    held-out file is trained on (a split by segment would leak); a whole video's file id is its video
    id, so the split of whole videos is the split by video id. The note says when the store's own file
    ids could not be trusted (`fvlm_data.file_ids`). The store's committed, video_id (and file_id)
    arrays are read once (shard by shard, V/S objects, no per-video files)."""
    slots = store.committed_slots()
    video_ids = store.read_strings("video_id", slots)
    files, note = file_ids(store, slots, video_ids)
    is_val = validation_mask(files, val_fraction)
    held_out = np.flatnonzero(is_val).tolist()
    return slots[~is_val], slots[is_val], [video_ids[i] for i in held_out], [files[i] for i in held_out], note


def synthetic_frames(attrs: dict[str, Any], source: str, timestamps: np.ndarray) -> np.ndarray | None:
    """The store keeps no pixels; a synthetic video can be rendered again from its source tag."""
    tag = parse_source_tag(source)
    if tag is None:
        return None
    task, index = tag
    seed = int(attrs.get("precompute_args", {}).get("seed", 0))
    return get_task(task)(seed, index, timestamps, int(attrs["image_size"]))[0]


class FeatureDataset(Dataset):
    """Samples of `num_frames` frames from committed videos of one split.

    Each process that reads opens the store itself, lazily (DataLoader workers, fork or spawn; the
    process that made the dataset keeps the store it opened), and only the returned frames are read.
    Features stay in their stored half precision (or int8 + scale); `to_device` converts them on the
    device. `split_datasets` makes both splits of an open store in one pass.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        num_frames: int = 16,
        split: str = "train",
        val_fraction: float = 0.05,
        frame_sampling: str = "uniform",
        seed: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0.0 <= val_fraction <= 1.0:  # also refuses nan
            raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction!r}")
        store = FeatureStore.open(path)
        check_num_frames(num_frames, store)
        if split == "all":
            slots = store.committed_slots()
        else:
            train, val, _ = split_slots(store, val_fraction)
            slots = val if split == "val" else train
        self._bind(store, num_frames, slots, frame_sampling, seed)

    @classmethod
    def from_store(cls, store: FeatureStore, num_frames: int, slots: np.ndarray, frame_sampling: str = "uniform",
                   seed: int = 0) -> FeatureDataset:
        """The samples of `slots` of an already open store (used in this process until pickled)."""
        check_num_frames(num_frames, store)
        ds = cls.__new__(cls)
        ds._bind(store, num_frames, slots, frame_sampling, seed)
        return ds

    def _bind(self, store: FeatureStore, num_frames: int, slots: np.ndarray, frame_sampling: str, seed: int) -> None:
        if frame_sampling not in ("uniform", "random"):
            raise ValueError(f"frame_sampling must be 'uniform' or 'random', got {frame_sampling!r}")
        self.path = str(store.path)
        self.attrs = store.attrs
        self.stored_frames = int(store.attrs["num_frames"])
        self.num_frames = num_frames
        self.frame_sampling = frame_sampling
        self.seed = seed
        self.epoch = 0
        self.slots = slots
        self.pairs: np.ndarray | None = None  # with_captions: (video position, caption number) per sample
        self.block_states: tuple[int, ...] = ()  # DINO blocks whose stored input states samples also read
        self._store: FeatureStore | None = store
        self._store_pid = os.getpid()

    def __len__(self) -> int:
        return len(self.slots) if self.pairs is None else len(self.pairs)

    def read_block_states(self, blocks: tuple[int, ...]) -> FeatureDataset:
        """Samples also read the states entering these DINO blocks (`dino_block<k>`, for the deep query);
        a block the store lacks is a ValueError. Returns the dataset itself."""
        if missing := [k for k in blocks if block_array(k) not in self._store_for_this_process().arrays]:
            raise ValueError(f"{self.path} holds no states of DINO block(s) {missing} (it has "
                             f"{list(self.attrs.get('dino_blocks', [])) or 'none'}: precompute --dino-layers)")
        self.block_states = tuple(blocks)
        return self

    def _read_names(self, store: FeatureStore) -> list[str]:
        """The per-frame arrays each sample reads: those of the table the dataset reads, and the block states
        asked for (with their int8 scales)."""
        blocks = [n for k in self.block_states for n in (block_array(k), block_array(k) + SCALE_SUFFIX)
                  if n in store.arrays]
        return [*store.frame_arrays(read_by_dataset=True), *blocks]

    def with_captions(self, first: int | None = None) -> FeatureDataset:
        """The same videos, one sample per (video, caption) for the first `first` captions of each
        (all if None): what evaluation scores. Caption-major order (every video's first caption, then
        every second caption, ...), so with one caption per video the samples are this dataset's own,
        and neighbours in a batch are different videos (the shuffled-query control needs that)."""
        counts = np.array([len(c) for c in self._store_for_this_process().captions(self.slots)], np.int64)
        counts = np.minimum(counts, first) if first is not None else counts
        ds = copy.copy(self)
        ds.pairs = np.array([(v, j) for j in range(int(counts.max(initial=0))) for v in np.flatnonzero(counts > j)],
                            dtype=np.int64).reshape(-1, 2)
        return ds

    def set_epoch(self, epoch: int) -> None:
        """Random frame offsets are a function of (seed, epoch, index), so a resumed run repeats them."""
        self.epoch = epoch

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers (spawn) get the path, not this process's open store and its caches.
        return {**self.__dict__, "_store": None, "_store_pid": -1}

    def _store_for_this_process(self) -> FeatureStore:
        if self._store is None or self._store_pid != os.getpid():
            self._store, self._store_pid = FeatureStore.open(self.path), os.getpid()
        return self._store

    def frames_for(self, index: int, epoch: int | None = None) -> np.ndarray:
        offset = 0.5
        if self.frame_sampling == "random":
            epoch = self.epoch if epoch is None else epoch
            offset = float(np.random.default_rng((self.seed, epoch, index)).random())
        return frame_indices(self.stored_frames, self.num_frames, offset)

    def caption_of(self, row: dict[str, Any], index: int, epoch: int | None = None) -> str:
        """The caption sample `index` takes: its pair's caption (with_captions), else one of the video's
        captions chosen from (seed, epoch, index), so a resumed run takes the same one."""
        captions = row["captions"]  # [caption] on a format-2 store
        if self.pairs is not None:
            return captions[int(self.pairs[index, 1])]
        if len(captions) == 1:
            return captions[0]
        epoch = self.epoch if epoch is None else epoch
        return captions[int(np.random.default_rng((self.seed, epoch, index, 1)).integers(len(captions)))]

    def _rows(self, indices: list[int], epoch: int | None, out: dict[str, np.ndarray] | None = None) -> list[dict]:
        videos = [int(i) if self.pairs is None else int(self.pairs[i, 0]) for i in indices]
        store = self._store_for_this_process()
        return store.read_slots([int(self.slots[v]) for v in videos], [self.frames_for(v, epoch) for v in videos],
                                out, names=self._read_names(store))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A whole batch in one store call (the DataLoader uses this when present): shard indexes and
        captions in one batch of reads, then every frame range in another (concurrent when remote)."""
        rows = self._rows(indices, None)
        return [self._item(row, index) for row, index in zip(rows, indices, strict=True)]

    def read_batch(self, indices: list[int], epoch: int | None = None, memory: str = "plain") -> dict[str, Any]:
        """A batch, assembled where it is read: the frames go from the store straight into batch-shaped
        tensors (one copy), allocated in shared memory (`memory="shared"`: a DataLoader worker hands
        them to the main process without copying) or pinned memory (`"pinned"`: ready for an
        asynchronous copy to the GPU). `epoch` overrides `set_epoch` (workers that outlive an epoch)."""
        store = self._store_for_this_process()
        arrays, names = store.arrays, self._read_names(store)
        tensors = {}
        for n in names:
            shape, dtype = (len(indices), self.num_frames, *arrays[n].shape[2:]), _TORCH[np.dtype(arrays[n].dtype)]
            tensors[n] = (_shared_empty(shape, dtype) if memory == "shared"
                          else torch.empty(shape, dtype=dtype, pin_memory=memory == "pinned"))
        rows = self._rows(indices, epoch, {n: t.numpy() for n, t in tensors.items()})
        batch: dict[str, Any] = dict(tensors)
        batch["captions"] = [self.caption_of(r, i, epoch) for r, i in zip(rows, indices, strict=True)]
        batch["references"] = [r["captions"] for r in rows]
        batch["video_ids"] = [r["video_id"] for r in rows]
        batch["index"] = torch.tensor([int(i) if self.pairs is None else int(self.pairs[i, 0]) for i in indices])
        return batch

    def _item(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        """Every per-frame array the dataset reads (`format.FRAME_TABLE`) as a tensor by its name, and the strings."""
        item = {name: torch.from_numpy(value) for name, value in row.items() if isinstance(value, np.ndarray)}
        item.update(caption=self.caption_of(row, index), captions=row["captions"], video_id=row["video_id"],
                    index=index if self.pairs is None else int(self.pairs[index, 0]))
        return item


_TORCH = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32, np.dtype(np.int8): torch.int8,
          np.dtype(np.float64): torch.float64}


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory (`share_memory_()` would allocate, then copy)."""
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape)


class Splits(NamedTuple):
    train: FeatureDataset
    val: FeatureDataset
    val_ids: list[str]  # the held-out videos' ids, in the order of val.slots
    val_files: list[str]  # their files' ids: what evaluation counts and resamples by
    note: str | None  # why the store's own file ids were not used as they are (`fvlm_data.file_ids`), or None


def split_datasets(store: FeatureStore, num_frames: int, val_fraction: float, frame_sampling: str = "uniform",
                   seed: int = 0) -> Splits:
    """Both splits of an open store in one pass (the same videos as FeatureDataset(split=...) takes).
    Validation always takes evenly spaced frames; `frame_sampling` and `seed` are the training split's."""
    check_num_frames(num_frames, store)
    train, val, val_ids, val_files, note = split_by_file(store, val_fraction)
    return Splits(FeatureDataset.from_store(store, num_frames, train, frame_sampling, seed),
                  FeatureDataset.from_store(store, num_frames, val), val_ids, val_files, note)


class CaptionCollator:
    """Stacks features and tokenises captions: EOS appended and learned, padding labelled -100."""

    def __init__(self, tokenizer: Any, max_caption_tokens: int = 64) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token")
        self.tokenizer = tokenizer
        self.max_caption_tokens = max_caption_tokens
        # The pad id only fills input positions; labels there are -100, so it is never learned.
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        eos = self.tokenizer.eos_token_id
        ids = self.tokenizer(captions, add_special_tokens=False)["input_ids"]
        ids = [seq[: self.max_caption_tokens - 1] + [eos] for seq in ids]
        length = max(len(seq) for seq in ids)
        input_ids = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(ids), length), -100, dtype=torch.long)
        for i, seq in enumerate(ids):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, : len(seq)] = torch.tensor(seq)
        return input_ids, labels

    def __call__(self, items: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
        """A batch from a list of items (stacked), or a batch `read_batch` assembled (only tokenised)."""
        if isinstance(items, dict):
            return {**items, **dict(zip(("input_ids", "labels"), self.tokenize(items["captions"]), strict=True))}
        input_ids, labels = self.tokenize([it["caption"] for it in items])
        frames = [name for name, value in items[0].items() if torch.is_tensor(value) and value.ndim > 0]
        batch = {
            **{name: torch.stack([it[name] for it in items]) for name in frames},  # the per-frame arrays
            "input_ids": input_ids,
            "labels": labels,
            "index": torch.tensor([it["index"] for it in items]),
            "captions": [it["caption"] for it in items],
            "video_ids": [it["video_id"] for it in items],
            "references": [it.get("captions") or [it["caption"]] for it in items],
        }
        return batch


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Move a batch to the device; int8 features (those with a `<name>_scale`) are dequantised there.

    Features keep their stored half precision unless `dtype` is given (then every floating tensor is
    converted): the model converts them to its compute dtype itself (an fp32 copy here would only
    double the bytes moved and converted).
    """
    out = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    for name in [k for k in out if k.endswith(SCALE_SUFFIX) and k.removesuffix(SCALE_SUFFIX) in out]:
        scale = out.pop(name)
        feature = name.removesuffix(SCALE_SUFFIX)
        out[feature] = out[feature].to(scale.dtype) * scale.unsqueeze(-1)
    if dtype is not None:
        out = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}
    return out
