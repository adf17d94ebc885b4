"""The read-only `FeatureStore`: committed rows, their strings and the frames asked for.

Frames are read by byte ranges computed from each shard's index (`ShardIndex`), a whole batch of
rows in one batch of requests; the small per-video arrays (caption, video_id, committed, ...) are
read a whole shard object at a time (`shards`). In a format-3 store every byte read is checked
against its checksum (`checksums`). Writing is `fvlm_data.store.writer` alone.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any

import numpy as np
import zarr

from fvlm_data.errors import StoreError
from fvlm_data.store.checksums import check_frames
from fvlm_data.store.consistency import GROW_KEY, UnevenArrays, check_attrs_match_arrays
from fvlm_data.store.format import (
    check_format,
    check_layout,
    checksum_array,
    chunk_nbytes,
    frame_array_names,
)
from fvlm_data.store.objects import LocalObjects, ReadRequest, RemoteObjects, objects_at
from fvlm_data.store.shard_index import ShardIndex
from fvlm_data.store.shards import ShardObjects


def open_group(path: str | os.PathLike, objects: LocalObjects | RemoteObjects, mode: str) -> zarr.Group:
    """The store's Zarr group; refuse anything this project did not write, or another format."""
    if not objects.exists():
        if isinstance(objects, LocalObjects) and objects.foreign_files():
            raise StoreError(f"{path} is not an fvlm feature store (it has no zarr.json)")
        raise StoreError(f"no store at {path}")
    try:
        group = zarr.open_group(objects.zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3)
    except StoreError:
        raise  # already one line (e.g. a remote failure that persisted)
    except Exception as e:  # zarr raises several types for a foreign or broken folder
        raise StoreError(f"{path}/zarr.json is not the metadata of a Zarr v3 group ({_reason(e)}): it is not an "
                         "fvlm feature store, or its zarr.json is damaged") from None
    check_format(path, group.attrs)
    return group


def _reason(e: BaseException) -> str:
    """An exception of a library as a short reason: its type and the first line of its text."""
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def open_arrays(path: str | os.PathLike, objects: LocalObjects | RemoteObjects,
                group: zarr.Group) -> dict[str, zarr.Array]:
    """The group's arrays by name. An array whose metadata cannot be read (cut short, an unknown codec or
    data type) is one line naming its zarr.json: zarr's own listing would raise its parser's exception."""
    arrays = {}
    for name in sorted(objects.list_names("")):
        if name.startswith(".") or name == "zarr.json":
            continue
        try:
            node = group[name]
        except (KeyError, FileNotFoundError):
            continue  # a folder or object that is no node of the group
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(f"{path}: {name}/zarr.json cannot be read ({_reason(e)}): the store's metadata is "
                             "damaged; restore that file from a copy of the store, or re-run precompute into a "
                             "new --out") from None
        if isinstance(node, zarr.Array):
            arrays[name] = node
    return arrays


class FeatureStore(ShardObjects):
    """A Zarr feature store, read-only: `FeatureStore.open(path)`. Writing is `writer.StoreWriter`.

    `path` is a folder or a URL (s3://bucket/prefix/store.zarr, gs://..., any fsspec protocol).
    """

    # Written by every grow (`writer._grow`): `refresh()` re-reads the metadata when these changed.
    METADATA_KEYS = ("zarr.json", "committed/zarr.json")

    def __init__(self, path: str | os.PathLike, objects: LocalObjects | RemoteObjects, group: zarr.Group) -> None:
        self.path = str(path)
        self.objects = objects
        self._load(group)
        self._index_cache: OrderedDict[tuple[str, int], ShardIndex] = OrderedDict()
        self._small_cache: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._committed: np.ndarray | None = None

    def _load(self, group: zarr.Group) -> None:
        """The group's attributes and arrays, checked against each other."""
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.version = int(self.attrs["format_version"])
        self.arrays: dict[str, zarr.Array] = open_arrays(self.path, self.objects, group)
        self._capacity = check_attrs_match_arrays(self.path, self.attrs, self.arrays, self.version)
        self.shard_videos = int(self.attrs["shard_videos"])
        for name, arr in self.arrays.items():
            check_layout(self.path, name, arr, self.shard_videos, self.version)

    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureStore:
        """Open a store read-only; refuse anything this project did not write, or another format."""
        objects = objects_at(path, read_only=True)
        for attempt in range(3):
            try:
                return cls(path, objects, open_group(path, objects, mode="r"))
            except UnevenArrays:  # read while a grow began (its attributes read before it): read again
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    @property
    def grow_unfinished(self) -> bool:
        """A grow was begun and has not ended (it is under way, or its writer was killed): see `writer._grow`."""
        return GROW_KEY in self.attrs or len({arr.shape[0] for arr in self.arrays.values()}) > 1

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        return objects_at(path).exists()

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
        """Forget what was read: shards published since are seen, by any process (and a grow's new slots)."""
        if self._metadata_changed():
            self._load(open_group(self.path, self.objects, mode="r"))
        self._committed = None
        self._index_cache.clear()
        self._small_cache.clear()

    def _metadata_changed(self) -> bool:
        """The group's attributes or `committed`'s length are not those loaded (a grow began or ended)."""
        try:
            group, committed = (json.loads(data) for data in self.objects.get_many(list(self.METADATA_KEYS)))
            return group["attributes"] != self.attrs or committed["shape"][0] != self.arrays["committed"].shape[0]
        except (TypeError, ValueError, KeyError, IndexError):  # missing or damaged: opening again says what
            return True

    def __len__(self) -> int:
        return len(self.committed_slots())

    def read_string(self, name: str, slot: int) -> str:
        return self.read_strings(name, np.array([slot]))[0]

    def read_strings(self, name: str, slots: np.ndarray | None = None) -> list[str]:
        """Values of a string array at `slots` (default: committed slots), one read per shard."""
        slots = self.committed_slots() if slots is None else np.asarray(slots, dtype=np.int64)
        shards, within = np.divmod(slots, self.shard_videos)
        values = self.shard_values((name,), np.unique(shards).tolist(), cache=len(slots) < 64)[name]
        self._check_published(name, [s for s in np.unique(shards).tolist() if s not in values])
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

    def frame_arrays(self, read_by_dataset: bool = False) -> list[str]:
        """The store's per-frame arrays (`format.FRAME_TABLE`), in table order (DINO's block states, if any,
        are not read by the dataset unless a model asks for them)."""
        return [n for n in frame_array_names(read_by_dataset, self.dino_blocks) if n in self.arrays]

    @property
    def dino_blocks(self) -> tuple[int, ...]:
        """DINO blocks whose input states the store holds (`dino_block<k>`; precompute --dino-layers)."""
        return tuple(int(k) for k in self.attrs.get("dino_blocks", ()))

    def read_slots(self, slots: list[int], frames: list[np.ndarray | None],
                   out: dict[str, np.ndarray] | None = None, names: list[str] | None = None) -> list[dict[str, Any]]:
        """Rows of many slots at once: shard indexes and captions in one batch, then every frame
        range in one batch (concurrent requests on a remote store). `out` (optional) gives the batch
        buffers to read into, one per frame array, [len(slots), frames, ...] of its dtype (e.g. in
        shared or pinned memory): the bytes are then copied once, from the file into them. `names`
        (optional) picks the frame arrays to read (default: all of them)."""
        frame_names = self.frame_arrays() if names is None else names
        shards = [s // self.shard_videos for s in slots]
        indexes = self._indexes([(n, sh) for sh in shards for n in frame_names])
        sums = tuple(checksum_array(n) for n in frame_names) if self.has_checksums else ()
        small = self.shard_values(("caption", "video_id", *self._captions_array(), *sums), shards, cache=True)
        captions, ids = small["caption"], small["video_id"]
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
        rows, requests, checks = [], [], []
        for b, (slot, shard, want) in enumerate(zip(slots, shards, frames, strict=True)):
            for name, values in small.items():
                if shard not in values:
                    raise self.missing(name, shard)
            j = slot % self.shard_videos
            row: dict[str, Any] = {"caption": captions[shard][j], "video_id": ids[shard][j], "slot": slot,
                                   "captions": self._all_captions(small, shard, j)}
            for name in frame_names:
                arr = self.arrays[name]
                t = arr.shape[1]
                idx = np.arange(t) if want is None else np.asarray(want, dtype=np.int64)
                if idx.size and (idx.min() < 0 or idx.max() >= t):
                    raise IndexError(f"frame index out of range 0..{t - 1}: {idx.tolist()}")
                out = batch[name][b] if batch else np.empty((len(idx), *arr.shape[2:]), dtype=np.dtype(arr.dtype))
                got = self._frame_requests(name, slot, indexes[(name, shard)], idx, out)
                if got and sums:
                    checks.append((name, slot, out, small[checksum_array(name)][shard][j][idx], idx))
                requests += got
                row[name] = out
            rows.append(row)
        counts = self.objects.read_into(requests) if requests else []
        for (key, _, view), got in zip(requests, counts, strict=True):
            if got != len(view):
                raise StoreError(f"{self.path}: short read of {key}: the shard is truncated; "
                                 "re-run precompute to recompute it")
        for name, slot, out, expected, idx in checks:  # exactly the frames read, nothing else
            check_frames(out, expected, self.slot_name(name, slot), idx)
        return rows

    def _check_published(self, name: str, absent: list[int]) -> None:
        """Shards without an object of `name` must be unpublished (their values are then the fill value, as
        zarr reads them): one whose `committed` object exists lacks that object."""
        published = self.shard_values(("committed",), absent)["committed"] if absent else {}
        if published:
            raise self.missing(name, min(published))

    def _captions_array(self) -> tuple[str, ...]:
        return ("captions",) if "captions" in self.arrays else ()

    def _all_captions(self, small: dict[str, dict[int, Any]], shard: int, j: int) -> list[str]:
        """Every caption of a slot: `captions` holds "" for one caption (then it is `caption`), else a JSON list."""
        table = small["captions"][shard][j] if "captions" in small else ""
        if not table:
            return [small["caption"][shard][j]]
        try:
            return json.loads(table)
        except ValueError:
            raise StoreError(f"{self.slot_name('captions', shard * self.shard_videos + j)} is not a JSON "
                             "list of captions: the store is damaged") from None

    def captions(self, slots: np.ndarray | list[int]) -> list[list[str]]:
        """Every caption of each slot, first == its `caption` (no frames read; format 2: one each)."""
        slots = np.asarray(slots, dtype=np.int64)
        shards = np.unique(slots // self.shard_videos).tolist()
        small = self.shard_values(("caption", *self._captions_array()), shards, cache=len(slots) < 64)
        out = []
        for slot in slots.tolist():
            shard, j = divmod(slot, self.shard_videos)
            for name, values in small.items():
                if shard not in values:
                    raise self.missing(name, shard)
            out.append(self._all_captions(small, shard, j))
        return out

    def file_ids(self, slots: np.ndarray | list[int] | None = None) -> list[str]:
        """The file each slot was cut from (default: committed slots); format 2: the video ids."""
        return self.read_strings("file_id" if "file_id" in self.arrays else "video_id", slots)

    def read_slot(self, slot: int, frames: np.ndarray | None = None) -> dict[str, Any]:
        return self.read_slots([slot], [frames])[0]

    def read(self, i: int, frames: np.ndarray | None = None) -> dict[str, Any]:
        """The i-th committed video: every per-frame array [T', ...] in its stored dtype (dino [T', N, D],
        latents [T', C, h, w], timestamps [T'] float32 seconds, ...), caption, captions, video_id.
        `frames` picks frame indices."""
        slots = self.committed_slots()
        if not -len(slots) <= i < len(slots):
            raise IndexError(f"row {i} out of range: the store has {len(slots)} committed videos")
        return self.read_slot(int(slots[i]), frames)

    @property
    def failures(self) -> list[dict[str, Any]]:
        """Inputs that were skipped, with their source and the reason."""
        listed = self._listed_shards("failure")
        self._check_published("failure", sorted(set(self._listed_shards("committed")) - set(listed)))
        reasons = self.shard_values(("failure",), listed)["failure"]
        failed = [(shard * self.shard_videos + j, r) for shard, rs in reasons.items() for j, r in enumerate(rs) if r]
        failed = [(slot, r) for slot, r in failed if slot < self.capacity]
        slots = np.array([slot for slot, _ in failed], dtype=np.int64)
        sources, ids = self.read_strings("source", slots), self.read_strings("video_id", slots)
        return [{"slot": slot, "source": src, "video_id": vid, "reason": reason}
                for (slot, reason), src, vid in zip(failed, sources, ids, strict=True)]

    def nbytes_on_disk(self) -> int:
        return self.objects.nbytes()
