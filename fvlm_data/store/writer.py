"""Writing a store: creating or growing it, the state of its shards, and whole-shard publishing.

Writers own whole shards: a shard's rows are buffered (`ShardBuffer`) in the bytes of the shard
objects zarr would write (shard_bytes.py), and each array's object is published whole (temp file,
fsync and rename locally, one PUT remotely), `committed` last. No two processes ever write the same
object, and a reader sees a shard's rows once its `committed` object exists.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import GroupMetadata

from fvlm_data.errors import StoreError
from fvlm_data.store.checksums import check_frames, frame_checksums
from fvlm_data.store.consistency import GROW_KEY
from fvlm_data.store.creation import (
    check_inputs,
    create_exclusive,
    fingerprint_version,
    inputs_fingerprint,
    new_store_id,
)
from fvlm_data.store.format import (
    DEFAULT_SHARD_VIDEOS,
    SCALE_SUFFIX,
    STRING_ARRAYS,
    FeatureRecipe,
    FeatureShapes,
    check_compatible,
    checksum_array,
    chunk_nbytes,
    is_frame_array,
    quantize_int8,
    schema,
    table_entry,
)
from fvlm_data.store.objects import LocalObjects, objects_at
from fvlm_data.store.reader import FeatureStore, open_group
from fvlm_data.store.shard_bytes import BufferPool, FrameShard, small_object
from fvlm_data.store.shard_index import ShardIndex


class StoreWriter(FeatureStore):
    """A store open for writing: `StoreWriter.create_or_open(...)`, then `shard_buffer(shard)` per
    shard, filled with `add_row`/`add_failure` and published whole. The only way to write a store;
    `FeatureStore` itself only reads."""

    @classmethod
    def create_or_open(cls, path: str | os.PathLike, attrs: dict[str, Any], shapes: FeatureShapes, capacity: int,
                       shard_videos: int | None = None,
                       inputs: Sequence[Sequence[Any]] | None = None) -> StoreWriter:
        """See `create_or_open`."""
        return create_or_open(path, attrs, shapes, capacity, shard_videos, inputs)

    def shard_buffer(self, shard: int, keep_existing: bool = False, keep_failures: bool = True) -> ShardBuffer:
        """An in-memory shard to fill and publish: see `ShardBuffer`."""
        return ShardBuffer(self, shard, keep_existing, keep_failures)

    @functools.cached_property
    def buffers(self) -> BufferPool:
        """Frame arrays' shard buffers, reused from one shard to the next."""
        return BufferPool()


def create_or_open(path: str | os.PathLike, attrs: dict[str, Any], shapes: FeatureShapes, capacity: int,
                   shard_videos: int | None = None, inputs: Sequence[Sequence[Any]] | None = None) -> StoreWriter:
    """Open `path` for writing, creating it with `capacity` slots if it does not exist.

    An existing store must have been made with the same encoders, frame count, image size,
    feature dtype (and shard size, if one is asked for), and from the same `inputs` (each slot's key,
    (video_id, source, *the rest): see `creation`; a longer list grows the store): all checked before
    anything is written.
    Creation is exclusive (`creation.create_exclusive`): of several writers started at once exactly
    one creates the store, the others check it like any existing store.
    """
    objects = objects_at(path, read_only=False)
    if isinstance(objects, LocalObjects):
        objects.remove_stale_temps()
    if not objects.exists():
        fingerprint = {} if inputs is None else {"inputs": inputs_fingerprint(inputs)}
        identity = {"store_id": new_store_id(), **fingerprint}
        objs = schema({**attrs, **identity}, shapes, capacity, shard_videos or DEFAULT_SHARD_VIDEOS)
        create_exclusive(path, objects, objs, {**identity, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    group = open_group(path, objects, mode="r+")
    check_compatible(path, group.attrs, FeatureRecipe.from_attrs(attrs), shard_videos)
    recorded = group.attrs.get("inputs")
    check_inputs(path, recorded, inputs)
    store = StoreWriter(path, objects, group)
    longer = inputs is not None and recorded is not None and recorded["count"] < len(inputs)
    if store.capacity >= capacity and not longer and not store.grow_unfinished:
        return store
    # Grow, or end a grow a killed writer left: to this run's length, or back to the store's own. The new
    # fingerprint in the store's own version (an old store's rows stay old ones).
    _grow(store, max(store.capacity, capacity),
          inputs_fingerprint(inputs, fingerprint_version(recorded)) if longer else None)
    return StoreWriter(path, objects, open_group(path, objects, mode="r+"))


def _grow(store: StoreWriter, capacity: int, fingerprint: dict[str, Any] | None) -> None:
    """More inputs than slots (e.g. a larger --limit): extend every array along the slot axis.

    Crash-safe: the group's attributes first record the grow (`growing`: from the store's length to
    `capacity`), then each array's metadata is rewritten (each write atomic), then the attributes
    drop `growing` and take the new input fingerprint, in one write. Until that last write readers
    see the store as it was before (`consistency.slot_count`); a writer that finds `growing` (its
    writer killed) runs this again, to its own length. No shard is written meanwhile. Shards are
    anchored at slot 0, so existing shard objects stay valid; the old last shard becomes incomplete
    and its owner fills it in (keeping its rows)."""
    meta = json.loads(store.objects.get_many(["zarr.json"])[0] or b"{}")
    attrs = {k: v for k, v in meta.get("attributes", {}).items() if k != GROW_KEY}
    _put_group_attrs(store, meta, {**attrs, GROW_KEY: {"from": store.capacity, "to": capacity}})
    for name in sorted(store.arrays, key=lambda n: n == "committed"):
        arr = store.arrays[name]
        resized = arr.metadata.update_shape((capacity, *arr.shape[1:])).to_buffer_dict(default_buffer_prototype())
        store.objects.put(f"{name}/zarr.json", resized["zarr.json"].to_bytes())
    _put_group_attrs(store, meta, {**attrs, **({"inputs": fingerprint} if fingerprint else {})})


def _put_group_attrs(store: StoreWriter, meta: dict[str, Any], attrs: dict[str, Any]) -> None:
    """The group's zarr.json with these attributes, written whole (zarr's own attribute writes are not atomic)."""
    group = GroupMetadata.from_dict({**meta, "attributes": attrs})
    store.objects.put("zarr.json", group.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())


@dataclass(frozen=True)
class ShardState:
    """What a shard's objects say about its slots (`committed`, `failed`: one flag per slot)."""

    committed: np.ndarray
    failed: np.ndarray
    published: bool = True  # its `committed` object exists
    problem: str | None = None  # why its objects cannot be trusted (then no slot counts as done)

    @classmethod
    def unusable(cls, slots: int, published: bool, problem: str | None = None) -> ShardState:
        none = np.zeros(slots, dtype=bool)
        return cls(none, none, published, problem)

    @property
    def kept(self) -> bool:
        """Its rows can be kept: published and intact."""
        return self.published and self.problem is None

    @property
    def done(self) -> np.ndarray:
        """Slots written or recorded as failed."""
        return self.committed | self.failed

    def slot(self, j: int) -> str:
        """'committed', 'failed' or 'empty' (never written, its shard not published, or untrusted)."""
        return "committed" if self.committed[j] else "failed" if self.failed[j] else "empty"


def shard_states(store: FeatureStore, shards: list[int], verify_data: bool = False) -> dict[int, ShardState]:
    """The state of each shard. A committed shard is trusted if every array's object of it exists, has
    an intact index (size, crc32c) and holds the features of each committed video. Reads objects'
    ends only, a few batches of requests for all the shards together; `verify_data` also reads every
    byte of each such shard and checks it against its checksums (`shard_data_problem`)."""
    s = store.shard_videos
    errors: dict[int, str] = {}
    committed = store.shard_values(("committed",), shards, errors=errors)["committed"]
    ok = [shard for shard in committed if shard not in errors]
    frames = store.frame_arrays()
    small = [n for n in store.arrays if n not in frames and n != "committed"]
    for names, chunks in ((small, 1), (frames, s)):
        wanted = [(n, shard) for shard in ok for n in names]
        tails = store.objects.tails([store.shard_key(n, shard) for n, shard in wanted], ShardIndex.nbytes(chunks))
        for (name, shard), got in zip(wanted, tails, strict=True):
            if shard in errors:
                continue
            if got is None:
                errors[shard] = str(store.missing(name, shard))
                continue
            try:
                index = ShardIndex.parse(*got, chunks, store.shard_name(name, shard))
            except StoreError as e:
                errors[shard] = str(e)
                continue
            if name in frames:
                n_slots = min(s, store.capacity - shard * s)
                bad = (committed[shard][:n_slots] == 1) & (index.sizes()[:n_slots] != chunk_nbytes(store.arrays[name]))
                if bad.any():
                    errors[shard] = (f"{store.path}: shard {shard} of {name!r} lacks the features of committed "
                                     f"slot {shard * s + int(np.flatnonzero(bad)[0])}")
    if verify_data:
        for shard in [sh for sh in ok if sh not in errors]:
            problem = shard_data_problem(store, shard)
            if problem:
                errors[shard] = problem
    failure = store.shard_values(("failure",), [sh for sh in ok if sh not in errors], errors=errors)["failure"]
    out = {}
    for shard in shards:
        if shard in errors:
            out[shard] = ShardState.unusable(s, published=True, problem=errors[shard])
        elif shard not in committed:
            out[shard] = ShardState.unusable(s, published=False)
        else:
            out[shard] = ShardState(committed[shard] == 1, np.array([bool(r) for r in failure[shard]]))
    return out


def shard_data_problem(store: FeatureStore, shard: int) -> str | None:
    """Why the data of a published shard cannot be trusted (every byte of every array's object read and
    checked against its checksums), or None. Format 2 has no frame checksums: only its small arrays
    are decoded. One shard's objects in memory at a time."""
    names = list(store.arrays)
    datas = store.objects.get_many([store.shard_key(name, shard) for name in names])
    objects = dict(zip(names, datas, strict=True))
    try:
        small = {name: store.decode_small(name, shard, data) for name, data in objects.items()
                 if not is_frame_array(name) and data is not None}
        committed = small.get("committed")
        if committed is None:
            return f"{store.shard_name('committed', shard)} is missing"
        n_slots = min(store.shard_videos, store.capacity - shard * store.shard_videos)
        for name in [n for n in store.frame_arrays() if n in objects]:
            data = objects[name]
            if data is None:
                return str(store.missing(name, shard))
            if checksum_array(name) not in small:
                continue  # format 2: nothing to check the frames against
            arr = store.arrays[name]
            index = ShardIndex.parse(data, len(data), store.shard_videos, store.shard_name(name, shard))
            for j in np.flatnonzero(committed[:n_slots]).tolist():
                slot = shard * store.shard_videos + j
                if index.chunk_nbytes(j) != int(np.prod(arr.shape[1:])) * np.dtype(arr.dtype).itemsize:
                    return f"{store.slot_name(name, slot)} lacks its features"
                chunk = index.chunk(memoryview(data), j)  # a view: no copy of the video's bytes
                frames = np.frombuffer(chunk, dtype=np.dtype(arr.dtype)).reshape(arr.shape[1:])
                expected = small[checksum_array(name)][j]
                check_frames(frames, expected, store.slot_name(name, slot), np.arange(len(frames)))
    except StoreError as e:
        return str(e)
    return None


class ShardBuffer:
    """The rows of one shard, in memory until published: S videos of features at most.

    Each frame array's rows live in its shard object's own buffer (`shard_bytes.FrameShard`): a row is
    copied once, into its place, and its frames' crc32c computed as it arrives; `publish` adds the
    indexes and writes each object whole. `keep_existing` starts from the shard's committed and failed
    rows (read by zarr's own reader), or from its committed rows only if not `keep_failures` (the failed
    ones are to be tried again)."""

    def __init__(self, store: StoreWriter, shard: int, keep_existing: bool = False, keep_failures: bool = True) -> None:
        self.store, self.shard, self.keep_failures = store, shard, keep_failures
        self.start = shard * store.shard_videos
        self.stop = min(self.start + store.shard_videos, store.capacity)
        n = self.stop - self.start
        self.data: dict[str, np.ndarray] = {}
        self.frames: dict[str, FrameShard] = {}
        for name, arr in store.arrays.items():
            if name in STRING_ARRAYS:
                self.data[name] = np.full(n, "", dtype=object)
            elif is_frame_array(name):
                self.frames[name] = FrameShard(store.shard_videos, n, arr.shape[1:], np.dtype(arr.dtype), store.buffers)
                self.data[name] = self.frames[name].values
            else:
                self.data[name] = np.zeros((n, *arr.shape[1:]), dtype=np.dtype(arr.dtype))
        # The encoders' arrays of this store (the table's encoded features, one per block for per-block ones).
        self.feature_names = {n for n in self.data if (f := table_entry(n)) is not None and f.encoded
                              and not n.endswith(SCALE_SUFFIX)}
        self.checksummed = [n for n in self.frames if checksum_array(n) in self.data]  # format 3
        self.filled = np.zeros(n, dtype=bool)
        if keep_existing and shard in store.shard_values(("committed",), [shard])["committed"]:
            self._load_existing()

    def _load_existing(self) -> None:
        """The shard's committed and failed rows, read by zarr (which checks the small arrays' crc32c);
        the kept rows' frames are checked against their checksums before they are published again."""
        store = self.store
        try:
            for name, data in self.data.items():
                data[...] = store.arrays[name][self.start : self.stop]
        except ValueError as e:  # zarr's crc32c codec: "Stored and computed checksum do not match"
            raise StoreError(f"{store.path}: shard {self.shard} fails a checksum ({e}): re-run precompute") from None
        self.filled = self.data["committed"] == 1
        if self.keep_failures:
            self.filled |= np.array([bool(r) for r in self.data["failure"]])
        for data in self.data.values():  # rows never completed (or failed ones to retry) are not kept
            data[~self.filled] = "" if data.dtype == object else 0
        for name in [n for n in store.frame_arrays() if checksum_array(n) in self.data]:
            for j in np.flatnonzero(self.data["committed"] == 1).tolist():
                check_frames(self.data[name][j], self.data[checksum_array(name)][j],
                             store.slot_name(name, self.start + j), np.arange(self.data[name].shape[1]))

    def _clear(self, slot: int, frames: bool = True) -> int:
        """Empty the slot's row (`frames=False`: not its frames, about to be overwritten whole)."""
        if not self.start <= slot < self.stop:
            raise IndexError(f"slot {slot} is not in shard {self.shard} (slots {self.start}..{self.stop - 1})")
        j = slot - self.start
        for name, data in self.data.items():
            if frames or name not in self.frames:
                data[j] = "" if data.dtype == object else 0
        self.filled[j] = True
        return j

    def add_row(self, slot: int, *, caption: str, video_id: str, source: str, timestamps: np.ndarray,
                duration: float, captions: Sequence[str] = (), file_id: str | None = None,
                **arrays: np.ndarray) -> None:
        """One video's row: `arrays` holds every feature of the table (`format.FRAME_TABLE`) by name,
        [T, ...] each (dino=, latents=, ...). A quantizable feature in an int8 store is quantized here,
        unless its scale is given too (`dino_scale=`: quantized on the device by the same rule).
        `captions`: all its captions, the first being `caption` (default: that one); `file_id`: the file
        it was cut from (default: `video_id`, a whole file)."""
        if captions and captions[0] != caption:
            raise ValueError(f"captions[0] must be the caption: {captions[0]!r} != {caption!r}")
        names = self.feature_names
        if unknown := sorted(set(arrays) - names - {n + SCALE_SUFFIX for n in names}):
            raise TypeError(f"add_row: {', '.join(unknown)} is not a feature of the store's table")
        if missing := sorted(n for n in names if n not in arrays):
            raise TypeError(f"add_row: missing the feature(s) {', '.join(missing)}")
        j, d = self._clear(slot, frames=False), self.data  # every frame array is written below
        for name in names:
            scale = name + SCALE_SUFFIX
            if scale not in d:
                if scale in arrays:
                    raise TypeError(f"add_row: {scale} given but the store keeps {name} unquantized")
                d[name][j] = arrays[name]
            elif scale in arrays:
                d[name][j], d[scale][j] = arrays[name], arrays[scale]
            else:
                d[name][j], d[scale][j] = quantize_int8(arrays[name])
        d["timestamps"][j], d["duration"][j] = timestamps, duration
        for name in self.checksummed:  # on arrival, over the bytes as stored
            d[checksum_array(name)][j] = frame_checksums(d[name][j])
        d["caption"][j], d["video_id"][j], d["source"][j] = caption, video_id, source
        if "captions" in d:  # format 3; one caption (the common case) is "", costing nothing
            d["captions"][j] = json.dumps(list(captions), ensure_ascii=False) if len(captions) > 1 else ""
            d["file_id"][j] = video_id if file_id is None else file_id
        d["committed"][j] = 1

    def add_failure(self, slot: int, *, video_id: str, source: str, reason: str, file_id: str | None = None) -> None:
        j, d = self._clear(slot), self.data
        d["video_id"][j], d["source"][j] = video_id, source
        if "file_id" in d:
            d["file_id"][j] = video_id if file_id is None else file_id
        d["failure"][j] = reason.replace("\n", " ")[:500] or "unknown error"

    def complete(self, until: int | None = None) -> bool:
        """Every slot below `until` (default: the shard's end) written or recorded as failed."""
        until = self.stop if until is None else min(until, self.stop)
        return bool(self.filled[: until - self.start].all())

    def seal(self) -> None:
        """Fill in what only the whole shard decides (publish does it first; doing it again changes
        nothing): the crc32c and the zeros of every row without frames."""
        committed = self.data["committed"] == 1
        for name, frames in self.frames.items():
            frames.values[~committed] = 0  # failed, never written, or a reused buffer's old bytes
            if name in self.checksummed:  # as for any row: the crc32c of its (zero) frames
                self.data[checksum_array(name)][~committed] = frame_checksums(np.zeros_like(frames.values[0]))

    def publish(self) -> None:
        """Write each array's shard object whole (one write, fsync and rename each locally, one PUT
        remotely), `committed` last: the objects zarr would write for these rows (shard_bytes.py).
        The buffer is spent: its frame buffers go to the next shard."""
        store = self.store
        self.seal()
        for name in sorted(self.data, key=lambda n: n == "committed"):
            if name in self.frames:
                data = self.frames[name].finish()
            else:
                data = small_object(self.data[name], store.shard_videos, store.has_checksums)
            store.objects.put(store.shard_key(name, self.shard), data)
        for frames in self.frames.values():
            store.buffers.give(frames.raw)
        self.frames, self.data = {}, {}
        store.refresh()  # this process's reads see the new shard
