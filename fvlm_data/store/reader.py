"""The read-only `FeatureStore`: committed rows, their strings and the frames asked for.

Frames are read by byte ranges computed from each shard's index (`ShardIndex`), a whole batch of
rows in one batch of requests; the small per-video arrays (caption, video_id, committed, ...) are
read a whole shard object at a time. Writing goes through `fvlm_data.store.writer`; the two
writing entry points below only hand over to it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numcodecs
import numpy as np
import zarr

from fvlm_data.objects import LocalObjects, ReadRequest, RemoteObjects, StoreError, objects_at
from fvlm_data.store.format import (
    FRAME_ARRAYS,
    STRING_ARRAYS,
    FeatureShapes,
    check_format,
    check_layout,
    chunk_nbytes,
    inner_chunks,
)
from fvlm_data.store.shard_index import ShardIndex

if TYPE_CHECKING:
    from fvlm_data.store.writer import ShardBuffer

_VLEN_UTF8 = numcodecs.VLenUTF8()  # numcodecs' compiled decoder, the one zarr itself uses


def open_group(path: str | os.PathLike, objects: LocalObjects | RemoteObjects, mode: str) -> zarr.Group:
    """The store's Zarr group; refuse anything this project did not write, or another format."""
    if not objects.exists():
        raise StoreError(f"no store at {path}")
    try:
        group = zarr.open_group(objects.zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3)
    except Exception as e:  # zarr raises several types for a foreign or broken folder
        raise StoreError(f"{path} is not a Zarr v3 group ({type(e).__name__}: {e})") from None
    check_format(path, group.attrs)
    return group


class FeatureStore:
    """A Zarr feature store. `FeatureStore.open(path)` reads; `FeatureStore.create_or_open` writes.

    `path` is a folder or a URL (s3://bucket/prefix/store.zarr, gs://..., any fsspec protocol).
    """

    INDEX_CACHE = 4096  # shard indexes kept per process (each S x 16 bytes)
    SMALL_CACHE = 512  # caption / video_id shards kept per process

    def __init__(self, path: str | os.PathLike, objects: LocalObjects | RemoteObjects, group: zarr.Group,
                 writable: bool = False) -> None:
        self.path = str(path)
        self.objects = objects
        self.writable = writable
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.shard_videos = int(self.attrs["shard_videos"])
        self.arrays: dict[str, zarr.Array] = {name: group[name] for name in group.array_keys()}
        for name, arr in self.arrays.items():
            check_layout(self.path, name, arr, self.shard_videos)
        self._index_cache: OrderedDict[tuple[str, int], ShardIndex] = OrderedDict()
        self._small_cache: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._committed: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureStore:
        """Open a store read-only; refuse anything this project did not write, or another format."""
        objects = objects_at(path, read_only=True)
        return cls(path, objects, open_group(path, objects, mode="r"))

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        return objects_at(path).exists()

    @classmethod
    def create_or_open(cls, path: str | os.PathLike, attrs: dict[str, Any], shapes: FeatureShapes, capacity: int,
                       shard_videos: int | None = None) -> FeatureStore:
        """Open `path` for writing, creating (or growing) it: see `writer.create_or_open`."""
        from fvlm_data.store import writer

        return writer.create_or_open(path, attrs, shapes, capacity, shard_videos)

    def shard_buffer(self, shard: int, keep_existing: bool = False) -> ShardBuffer:
        """An in-memory shard to fill and publish: see `writer.ShardBuffer`."""
        from fvlm_data.store.writer import ShardBuffer

        if not self.writable:
            raise StoreError(f"{self.path} was opened read-only")

        return ShardBuffer(self, shard, keep_existing)

    # ------------------------------------------------------------------ shard objects
    @property
    def capacity(self) -> int:
        return int(self.arrays["committed"].shape[0])

    @property
    def num_shard_objects(self) -> int:
        """Shards along the slot axis (the last one may be partly beyond the capacity)."""
        return -(-self.capacity // self.shard_videos)

    def shard_key(self, name: str, shard: int) -> str:
        return "/".join([name, "c", str(shard)] + ["0"] * (self.arrays[name].ndim - 1))

    def shard_name(self, name: str, shard: int) -> str:
        """How errors name a shard object."""
        return f"{self.path}: shard {shard} of {name!r} ({self.shard_key(name, shard)})"

    def missing(self, name: str, shard: int) -> StoreError:
        return StoreError(f"{self.shard_name(name, shard)} is missing although the shard is committed: "
                          "re-run precompute to recompute it")

    def _indexes(self, wanted: list[tuple[str, int]]) -> dict[tuple[str, int], ShardIndex]:
        """Shard indexes of frame arrays, cached per process; missing ones fetched in one batch."""
        todo = sorted({w for w in wanted if w not in self._index_cache})
        keys = [self.shard_key(name, shard) for name, shard in todo]
        for (name, shard), got in zip(todo, self.objects.tails(keys, ShardIndex.nbytes(self.shard_videos)),
                                      strict=True):
            if got is None:
                raise self.missing(name, shard)
            self._index_cache[(name, shard)] = ShardIndex.parse(*got, self.shard_videos, self.shard_name(name, shard))
            if len(self._index_cache) > self.INDEX_CACHE:
                self._index_cache.popitem(last=False)
        return {w: self._index_cache[w] for w in wanted}

    def _decode_small(self, name: str, shard: int, data: bytes) -> np.ndarray | list[str]:
        """The values of a whole shard object of a small array (one inner chunk)."""
        index = ShardIndex.parse(data, len(data), inner_chunks(name, self.shard_videos), self.shard_name(name, shard))
        if index.is_empty(0):
            raise StoreError(f"{self.path}: shard {shard} of {name!r} holds no data: re-run precompute")
        chunk = index.chunk(data)
        if name in STRING_ARRAYS:
            return _VLEN_UTF8.decode(chunk).tolist()
        return np.frombuffer(chunk, dtype=np.dtype(self.arrays[name].dtype).newbyteorder("<"))

    def shard_values(self, names: tuple[str, ...], shards: list[int], cache: bool = False,
                     errors: dict[int, str] | None = None) -> dict[str, dict[int, Any]]:
        """Per-video values of whole shards of small arrays, one batch of reads for all of them. A shard
        without an object is left out, and so is a damaged one if `errors` collects the reasons
        (otherwise it raises StoreError)."""
        out: dict[str, dict[int, Any]] = {name: {} for name in names}
        todo = []
        for name in names:
            for shard in dict.fromkeys(shards):
                if cache and (name, shard) in self._small_cache:
                    out[name][shard] = self._small_cache[(name, shard)]
                else:
                    todo.append((name, shard))
        datas = self.objects.get_many([self.shard_key(n, s) for n, s in todo]) if todo else []
        for (name, shard), data in zip(todo, datas, strict=True):
            if data is None:
                continue
            try:
                out[name][shard] = self._decode_small(name, shard, data)
            except StoreError as e:
                if errors is None:
                    raise
                errors.setdefault(shard, str(e))
                continue
            if cache:
                self._small_cache[(name, shard)] = out[name][shard]
                if len(self._small_cache) > self.SMALL_CACHE:
                    self._small_cache.popitem(last=False)
        return out

    def _listed_shards(self, name: str) -> list[int]:
        """Shards of `name` that have an object, from one listing (no per-video files exist)."""
        n = self.num_shard_objects
        return sorted(int(s) for s in self.objects.list_names(f"{name}/c") if s.isdigit() and int(s) < n)

    # ------------------------------------------------------------------ reading
    def committed_slots(self) -> np.ndarray:
        """Slots whose row is complete, ascending. Cached; `refresh()` re-reads."""
        if self._committed is None:
            flags = self.shard_values(("committed",), self._listed_shards("committed"))["committed"]
            s = self.shard_videos
            parts = [shard * s + np.flatnonzero(flags[shard][: self.capacity - shard * s]) for shard in flags]
            self._committed = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        return self._committed

    def refresh(self) -> None:
        """Forget what was read: shards published since are seen."""
        self._committed = None
        self._index_cache.clear()
        self._small_cache.clear()

    def __len__(self) -> int:
        return len(self.committed_slots())

    def read_string(self, name: str, slot: int) -> str:
        return self.read_strings(name, np.array([slot]))[0]

    def read_strings(self, name: str, slots: np.ndarray | None = None) -> list[str]:
        """Values of a string array at `slots` (default: committed slots), one read per shard."""
        slots = self.committed_slots() if slots is None else np.asarray(slots, dtype=np.int64)
        shards, within = np.divmod(slots, self.shard_videos)
        values = self.shard_values((name,), np.unique(shards).tolist(), cache=len(slots) < 64)[name]
        return [values[s][j] if s in values else "" for s, j in zip(shards.tolist(), within.tolist(), strict=True)]

    def _frame_requests(self, name: str, slot: int, index: ShardIndex, idx: np.ndarray,
                        out: np.ndarray) -> list[ReadRequest]:
        """Byte ranges of `name` for frames `idx` of `slot`, one per run of consecutive frames."""
        shard, j = divmod(slot, self.shard_videos)
        if index.is_empty(j):  # never written: zarr reads the fill value
            out[...] = 0
            return []
        expected = chunk_nbytes(self.arrays[name])
        if index.chunk_nbytes(j) != expected:
            raise StoreError(f"{self.path}: slot {slot} of {name!r} holds {index.chunk_nbytes(j)} bytes, expected "
                             f"{expected}: the store is damaged")
        frame_bytes = out[0].nbytes if len(idx) else 0
        view = memoryview(out.reshape(-1).view(np.uint8))
        key = self.shard_key(name, shard)
        return [(key, offset, view[first * frame_bytes : end * frame_bytes])
                for offset, first, end in index.frame_ranges(j, idx, frame_bytes)]

    def read_slots(self, slots: list[int], frames: list[np.ndarray | None],
                   out: dict[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
        """Rows of many slots at once: shard indexes and captions in one batch, then every frame
        range in one batch (concurrent requests on a remote store). `out` (optional) gives the batch
        buffers to read into, one per frame array, [len(slots), frames, ...] of its dtype (e.g. in
        shared or pinned memory): the bytes are then copied once, from the file into them."""
        frame_names = [n for n in FRAME_ARRAYS if n in self.arrays]
        shards = [s // self.shard_videos for s in slots]
        indexes = self._indexes([(n, sh) for sh in shards for n in frame_names])
        strings = self.shard_values(("caption", "video_id"), shards, cache=True)
        captions, ids = strings["caption"], strings["video_id"]
        # One buffer per array for the whole batch, rows are views of it: as 32 separate 4 MB arrays,
        # malloc gives a batch's memory back to the kernel and the next batch faults it in again 4 kB
        # at a time; numpy backs one large array with huge pages (bench/data_path.py, CANDIDATE rows).
        same_length = len({-1 if w is None else len(w) for w in frames}) == 1 and frames[0] is not None
        batch = ({n: np.empty((len(slots), len(frames[0]), *self.arrays[n].shape[2:]),
                              dtype=np.dtype(self.arrays[n].dtype)) for n in frame_names}
                 if len(slots) > 1 and same_length else None)
        if out is not None:
            if not same_length or any(out[n].shape[:2] != (len(slots), len(frames[0])) for n in frame_names):
                raise ValueError("read_slots: `out` needs one [slots, frames, ...] buffer per frame array")
            batch = out
        rows, requests = [], []
        for b, (slot, shard, want) in enumerate(zip(slots, shards, frames, strict=True)):
            if shard not in captions or shard not in ids:
                raise self.missing("caption" if shard not in captions else "video_id", shard)
            j = slot % self.shard_videos
            row: dict[str, Any] = {"caption": captions[shard][j], "video_id": ids[shard][j], "slot": slot}
            for name in frame_names:
                arr = self.arrays[name]
                t = arr.shape[1]
                idx = np.arange(t) if want is None else np.asarray(want, dtype=np.int64)
                if idx.size and (idx.min() < 0 or idx.max() >= t):
                    raise IndexError(f"frame index out of range 0..{t - 1}: {idx.tolist()}")
                out = batch[name][b] if batch else np.empty((len(idx), *arr.shape[2:]), dtype=np.dtype(arr.dtype))
                requests += self._frame_requests(name, slot, indexes[(name, shard)], idx, out)
                row[name] = out
            rows.append(row)
        counts = self.objects.read_into(requests) if requests else []
        for (key, _, view), got in zip(requests, counts, strict=True):
            if got != len(view):
                raise StoreError(f"{self.path}: short read of {key}: the shard is truncated; "
                                 "re-run precompute to recompute it")
        return rows

    def read_slot(self, slot: int, frames: np.ndarray | None = None) -> dict[str, Any]:
        return self.read_slots([slot], [frames])[0]

    def read(self, i: int, frames: np.ndarray | None = None) -> dict[str, Any]:
        """The i-th committed video: dino [T', N, D], latents [T', C, h, w] (stored dtypes),
        caption, video_id, timestamps [T'] (float32 seconds). `frames` picks frame indices."""
        slots = self.committed_slots()
        if not -len(slots) <= i < len(slots):
            raise IndexError(f"row {i} out of range: the store has {len(slots)} committed videos")
        return self.read_slot(int(slots[i]), frames)

    @property
    def failures(self) -> list[dict[str, Any]]:
        """Inputs that were skipped, with their source and the reason."""
        reasons = self.shard_values(("failure",), self._listed_shards("failure"))["failure"]
        failed = [(shard * self.shard_videos + j, r) for shard, rs in reasons.items() for j, r in enumerate(rs) if r]
        failed = [(slot, r) for slot, r in failed if slot < self.capacity]
        slots = np.array([slot for slot, _ in failed], dtype=np.int64)
        sources, ids = self.read_strings("source", slots), self.read_strings("video_id", slots)
        return [{"slot": slot, "source": src, "video_id": vid, "reason": reason}
                for (slot, reason), src, vid in zip(failed, sources, ids, strict=True)]

    def nbytes_on_disk(self) -> int:
        return self.objects.nbytes()
