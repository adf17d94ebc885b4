"""The feature store: one Zarr v3 group per dataset, one row (slot) per input video.

Layout (V slots, T frames, N DINO tokens of width D, VAE latents C x h x w):

    zarr.json      group attributes: format, version, shard_videos, encoders, sizes, dtypes, precompute args
    dino           [V, T, N, D] float16 (or int8, with dino_scale [V, T, N] float16 per token)
    latents        [V, T, C, h, w] float16
    timestamps     [V, T] float32, seconds of each sampled frame
    duration       [V] float32, seconds
    caption, video_id, source, failure   [V] strings
    committed      [V] uint8, written last: a shard's rows exist for readers once its object exists

Format 2: every array uses Zarr v3's sharding codec with S = attrs["shard_videos"] consecutive
slots per shard object (index at the end, crc32c-checked). Inside `dino`, `dino_scale`, `latents`
and `timestamps` shards the inner chunk is one video, uncompressed, so a reader fetches just the
frames it needs by byte ranges computed from the shard index; the small per-video arrays keep a
shard as one inner chunk. A store of V videos holds about 8 V / S objects.

Writers own whole shards: a shard's rows are buffered (`ShardBuffer`), encoded by zarr itself
into memory and each array's shard object is published whole (temp file + rename locally, one
PUT remotely), `committed` last. No two processes ever write the same object.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from fvlm_data.objects import LocalObjects, ReadRequest, RemoteObjects, StoreError, objects_at

__all__ = ["FeatureShapes", "FeatureStore", "ShardBuffer", "StoreError", "check_compatible", "quantize_int8"]

FORMAT_NAME = "fvlm-features"
FORMAT_VERSION = 2
DEFAULT_SHARD_VIDEOS = 64

# Attributes that must match for a run to add rows to an existing store.
COMPATIBILITY_KEYS = ("dino", "vae", "num_frames", "image_size", "feature_dtype")
# Attributes that say what the features are: a checkpoint records them and runs only on a store that agrees.
FEATURE_KEYS = ("dino", "vae", "preset", "num_frames", "image_size", "feature_dtype", "dino_tokens", "dino_dim",
                "latent_shape")
SHAPE_KEYS = ("dino_tokens", "dino_dim", "latent_shape")  # a model cannot even load on other shapes
STRING_ARRAYS = ("caption", "video_id", "source", "failure")
FRAME_ARRAYS = ("dino", "dino_scale", "latents", "timestamps")  # one inner chunk per video
EMPTY = np.uint64(2**64 - 1)  # a shard index entry for an inner chunk that was never written


_VLEN_UTF8 = numcodecs.VLenUTF8()


def check_compatible(path: str | os.PathLike, existing: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to add rows made with other encoders, frame count, image size or feature dtype."""
    for key in (*COMPATIBILITY_KEYS, "shard_videos"):
        if key == "shard_videos" and wanted.get(key) is None:
            continue  # not asked for: the store's own value is used
        if existing.get(key) != wanted.get(key):
            raise StoreError(
                f"{path} was made with {key}={existing.get(key)!r}, this run asks for "
                f"{key}={wanted.get(key)!r}: use a new --out"
            )


@dataclass(frozen=True)
class FeatureShapes:
    num_frames: int
    dino_tokens: int
    dino_dim: int
    latent_shape: tuple[int, int, int]


def _array_specs(shapes: FeatureShapes, feature_dtype: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Per-slot shape and dtype of every array in the store."""
    t, n, d = shapes.num_frames, shapes.dino_tokens, shapes.dino_dim
    specs: dict[str, tuple[tuple[int, ...], Any]] = {
        "dino": ((t, n, d), "int8" if feature_dtype == "int8" else "float16"),
        "latents": ((t, *shapes.latent_shape), "float16"),
        "timestamps": ((t,), "float32"),
        "duration": ((), "float32"),
        "committed": ((), "uint8"),
    }
    if feature_dtype == "int8":
        specs["dino_scale"] = ((t, n), "float16")
    for name in STRING_ARRAYS:
        specs[name] = ((), str)
    return specs


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one float16 scale per token (last axis is the feature axis)."""
    x = x.astype(np.float32)
    scale = np.abs(x).max(axis=-1) / 127.0
    # Smallest normal float16 as a floor: an all-zero token must not divide by zero.
    scale = np.maximum(scale, np.finfo(np.float16).tiny).astype(np.float16)
    q = np.clip(np.rint(x / scale[..., None].astype(np.float32)), -127, 127).astype(np.int8)
    return q, scale


def _decode_vlen_utf8(raw: bytes) -> list[str]:
    """Decode an uncompressed zarr `vlen-utf8` chunk (uint32 count, then (uint32 length, bytes)*)
    with numcodecs' compiled decoder, the one zarr itself uses."""
    return _VLEN_UTF8.decode(raw).tolist()


def _schema(attrs: dict[str, Any], shapes: FeatureShapes, capacity: int, shard_videos: int) -> dict[str, bytes]:
    """Every metadata object (zarr.json) of a new store, written by zarr into memory."""
    mem = zarr.storage.MemoryStore()
    group = zarr.open_group(mem, mode="w", zarr_format=3)
    for name, (shape, dtype) in _array_specs(shapes, attrs["feature_dtype"]).items():
        per_video = name in FRAME_ARRAYS
        group.create_array(
            name,
            shape=(capacity, *shape),
            shards=(shard_videos, *shape),
            # Frame arrays: one video per inner chunk, uncompressed, for byte-range reads of frames.
            # Small arrays: the whole shard is one inner chunk (one read gives S values).
            chunks=(1 if per_video else shard_videos, *shape),
            dtype=dtype,
            compressors=None,
            fill_value="" if dtype is str else 0,
        )
    group.attrs.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **attrs,
                        "shard_videos": shard_videos})
    return {key: buf.to_bytes() for key, buf in mem._store_dict.items()}


class FeatureStore:
    """A Zarr feature store. `FeatureStore.open(path)` reads; `FeatureStore.create_or_open` writes.

    `path` is a folder or a URL (s3://bucket/prefix/store.zarr, gs://..., any fsspec protocol).
    """

    INDEX_CACHE = 4096  # shard indexes kept per process (each S x 16 bytes)
    SMALL_CACHE = 512  # caption / video_id shards kept per process

    def __init__(self, path: str | os.PathLike, objects: LocalObjects | RemoteObjects, group: zarr.Group,
                 writable: bool) -> None:
        self.path = str(path)
        self.objects = objects
        self.writable = writable
        self.attrs: dict[str, Any] = dict(group.attrs)
        self._arrays = {name: group[name] for name in group.array_keys()}
        self.shard_videos = int(self.attrs["shard_videos"])
        for name, arr in self._arrays.items():
            self._check_layout(name, arr)
        self._index_cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._small_cache: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._committed: np.ndarray | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureStore:
        """Open a store read-only; refuse anything this project did not write, or another format."""
        objects = objects_at(path, read_only=True)
        return cls(path, objects, cls._open_group(path, objects, mode="r"), writable=False)

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        return objects_at(path).exists()

    @staticmethod
    def _open_group(path: str | os.PathLike, objects: LocalObjects | RemoteObjects, mode: str) -> zarr.Group:
        if not objects.exists():
            raise StoreError(f"no store at {path}")
        try:
            group = zarr.open_group(objects.zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3)
        except Exception as e:  # zarr raises several types for a foreign or broken folder
            raise StoreError(f"{path} is not a Zarr v3 group ({type(e).__name__}: {e})") from None
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{path} is not an fvlm feature store (format={attrs.get('format')!r})")
        version = attrs.get("format_version")
        if version == 1:
            raise StoreError(f"{path} is a format-1 store (one file per video); this fvlm reads format "
                             f"{FORMAT_VERSION}: re-run precompute into a new --out")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{path} has store format version {version}; this fvlm reads version {FORMAT_VERSION}: "
                "upgrade fvlm"
            )
        return group

    def _check_layout(self, name: str, arr: zarr.Array) -> None:
        """The byte-range reader assumes the layout `_schema` writes; refuse anything else."""
        codecs = arr.metadata.codecs
        ok = len(codecs) == 1 and isinstance(codecs[0], zarr.codecs.ShardingCodec)
        if ok:
            sharding = codecs[0]
            inner = [type(c).__name__ for c in sharding.codecs]
            index = [type(c).__name__ for c in sharding.index_codecs]
            per_video = name in FRAME_ARRAYS
            ok = (
                tuple(arr.shards or ()) == (self.shard_videos, *arr.shape[1:])
                and tuple(sharding.chunk_shape) == (1 if per_video else self.shard_videos, *arr.shape[1:])
                and inner in (["BytesCodec"], ["VLenUTF8Codec"])
                and (inner[0] != "BytesCodec" or getattr(sharding.codecs[0].endian, "value", "little") == "little")
                and index == ["BytesCodec", "Crc32cCodec"]
                and sharding.index_location.value == "end"
                and getattr(arr.metadata.chunk_key_encoding, "separator", None) == "/"
            )
        if not ok:
            raise StoreError(f"{self.path}: array {name!r} is not laid out as fvlm store format 2 expects")

    @classmethod
    def create_or_open(
        cls, path: str | os.PathLike, attrs: dict[str, Any], shapes: FeatureShapes, capacity: int,
        shard_videos: int | None = None,
    ) -> FeatureStore:
        """Open `path` for writing, creating it with `capacity` slots if it does not exist.

        An existing store must have been made with the same encoders, frame count, image size,
        feature dtype (and shard size, if one is asked for). Creation is atomic locally (built
        beside the target, then renamed); remotely the group's metadata is written last and
        concurrent creators write the same arrays, so several processes may start at once.
        """
        objects = objects_at(path, read_only=False)
        if not objects.exists():
            schema = _schema(attrs, shapes, capacity, shard_videos or DEFAULT_SHARD_VIDEOS)
            if isinstance(objects, LocalObjects):
                cls._create_local(objects.root, schema)
            else:
                for key in sorted(schema, key=lambda k: k == "zarr.json"):  # group metadata last
                    objects.put(key, schema[key])
        group = cls._open_group(path, objects, mode="r+")
        check_compatible(path, dict(group.attrs), {**attrs, "shard_videos": shard_videos})
        store = cls(path, objects, group, writable=True)
        if store.capacity < capacity:
            store._grow(capacity)
        return store

    @staticmethod
    def _create_local(path: Path, schema: dict[str, bytes]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            for key, data in schema.items():
                (tmp / key).parent.mkdir(parents=True, exist_ok=True)
                (tmp / key).write_bytes(data)
            try:
                os.rename(tmp, path)
            except OSError:
                if not path.exists():
                    raise
                # Another process created it first; its store is the one we use.
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _grow(self, capacity: int) -> None:
        """More inputs than slots (e.g. a larger --limit): extend every array along the slot axis.

        Shards are anchored at slot 0, so existing shard objects stay valid; the old last shard
        becomes incomplete and its owner fills it in (keeping its rows)."""
        for arr in self._arrays.values():
            arr.resize((capacity, *arr.shape[1:]))
        group = zarr.open_group(self.objects.zarr_store(read_only=False), mode="r+", zarr_format=3)
        self._arrays = {name: group[name] for name in group.array_keys()}
        self.refresh()

    # ------------------------------------------------------------------ shard objects
    @property
    def capacity(self) -> int:
        return int(self._arrays["committed"].shape[0])

    @property
    def num_shard_objects(self) -> int:
        """Shards along the slot axis (the last one may be partly beyond the capacity)."""
        return -(-self.capacity // self.shard_videos)

    def shard_key(self, name: str, shard: int) -> str:
        return "/".join([name, "c", str(shard)] + ["0"] * (self._arrays[name].ndim - 1))

    def _inner_per_shard(self, name: str) -> int:
        return self.shard_videos if name in FRAME_ARRAYS else 1

    def _parse_index(self, name: str, shard: int, tail: bytes, size: int) -> np.ndarray:
        """The shard index [(offset, nbytes)] per inner chunk, after checking its crc32c and bounds."""
        n = self._inner_per_shard(name)
        need = 16 * n + 4
        where = f"{self.path}: shard {shard} of {name!r} ({self.shard_key(name, shard)})"
        if size < need or len(tail) < need:
            raise StoreError(f"{where} is truncated ({size} bytes): re-run precompute to recompute it")
        body, crc = tail[-need:-4], tail[-4:]
        if google_crc32c.value(body) != int.from_bytes(crc, "little"):
            raise StoreError(f"{where} fails its index checksum (truncated or damaged): "
                             "re-run precompute to recompute it")
        index = np.frombuffer(body, dtype="<u8").reshape(n, 2)
        present = index[:, 0] != EMPTY
        if present.any() and int((index[present, 0] + index[present, 1]).max()) > size - need:
            raise StoreError(f"{where} is truncated ({size} bytes): re-run precompute to recompute it")
        return index

    def _missing(self, name: str, shard: int) -> StoreError:
        return StoreError(f"{self.path}: shard {shard} of {name!r} ({self.shard_key(name, shard)}) is missing "
                          "although the shard is committed: re-run precompute to recompute it")

    def _indexes(self, wanted: list[tuple[str, int]]) -> dict[tuple[str, int], np.ndarray]:
        """Shard indexes of frame arrays, cached per process; missing ones fetched in one batch."""
        todo = sorted({w for w in wanted if w not in self._index_cache})
        if todo:
            keys = [self.shard_key(name, shard) for name, shard in todo]
            for (name, shard), got in zip(todo, self.objects.tails(keys, 16 * self.shard_videos + 4), strict=True):
                if got is None:
                    raise self._missing(name, shard)
                self._index_cache[(name, shard)] = self._parse_index(name, shard, *got)
                if len(self._index_cache) > self.INDEX_CACHE:
                    self._index_cache.popitem(last=False)
        return {w: self._index_cache[w] for w in wanted}

    def _decode_small(self, name: str, shard: int, data: bytes) -> np.ndarray | list[str]:
        # A shard of a small array is one inner chunk: its index is 20 bytes (offset, nbytes, crc32c).
        tail = data[-20:]
        offset, nbytes = struct.unpack_from("<QQ", tail)
        if (len(data) < 20 or google_crc32c.value(tail[:16]) != int.from_bytes(tail[16:], "little")
                or offset + nbytes > len(data) - 20):
            self._parse_index(name, shard, data, len(data))  # raises the precise one-line error
            raise StoreError(f"{self.path}: shard {shard} of {name!r} holds no data: re-run precompute")
        chunk = data[offset : offset + nbytes]
        if name in STRING_ARRAYS:
            return _decode_vlen_utf8(chunk)
        return np.frombuffer(chunk, dtype=np.dtype(self._arrays[name].dtype).newbyteorder("<"))

    def _small(self, name: str, shards: list[int], cache: bool = False,
               errors: dict[int, str] | None = None) -> dict[int, Any]:
        """Per-video values of whole shards of a small array; a shard without an object is left out,
        and so is a damaged one if `errors` collects the reasons (otherwise it raises StoreError)."""
        return self._small_many((name,), shards, cache, errors)[name]

    def _small_many(self, names: tuple[str, ...], shards: list[int], cache: bool = False,
                    errors: dict[int, str] | None = None) -> dict[str, dict[int, Any]]:
        """`_small` of several arrays, with one batch of reads for all of them."""
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

    def shard_states(self, shards: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray] | str | None]:
        """For each shard: None if it is not committed; else its (committed, failed) slot flags if every
        array's object of it exists, has an intact index (size, crc32c) and holds the features of each
        committed video; else the one-line reason it cannot be trusted. Reads objects' ends only,
        a few batches of requests for all the shards together."""
        errors: dict[int, str] = {}
        committed = self._small("committed", shards, errors=errors)
        ok = [s for s in committed if s not in errors]
        small = [n for n in self._arrays if n not in FRAME_ARRAYS and n != "committed"]
        frames = [n for n in self._arrays if n in FRAME_ARRAYS]
        for names, inner in ((small, 1), (frames, self.shard_videos)):
            wanted = [(n, s) for s in ok for n in names]
            tails = self.objects.tails([self.shard_key(n, s) for n, s in wanted], 16 * inner + 4)
            for (name, shard), got in zip(wanted, tails, strict=True):
                if shard in errors:
                    continue
                if got is None:
                    errors[shard] = str(self._missing(name, shard))
                    continue
                try:
                    index = self._parse_index(name, shard, *got)
                except StoreError as e:
                    errors[shard] = str(e)
                    continue
                if name in frames:
                    n_slots = min(self.shard_videos, self.capacity - shard * self.shard_videos)
                    bad = (committed[shard][:n_slots] == 1) & (index[:n_slots, 1] != self._chunk_nbytes(name))
                    if bad.any():
                        errors[shard] = (f"{self.path}: shard {shard} of {name!r} lacks the features of committed "
                                         f"slot {shard * self.shard_videos + int(np.flatnonzero(bad)[0])}")
        failure = self._small("failure", [s for s in ok if s not in errors], errors=errors)
        out: dict[int, tuple[np.ndarray, np.ndarray] | str | None] = {}
        for shard in shards:
            if shard in errors:
                out[shard] = errors[shard]
            elif shard not in committed:
                out[shard] = None
            else:
                out[shard] = (committed[shard] == 1, np.array([bool(r) for r in failure[shard]]))
        return out

    def shard_problem(self, shard: int) -> str | None:
        """Why shard `shard` cannot be trusted (see `shard_states`), or None."""
        state = self.shard_states([shard])[shard]
        return state if isinstance(state, str) else None

    def _forget_shard(self, shard: int) -> None:
        for cache in (self._index_cache, self._small_cache):
            for key in [k for k in cache if k[1] == shard]:
                del cache[key]

    def _chunk_nbytes(self, name: str) -> int:
        arr = self._arrays[name]
        return int(np.prod(arr.shape[1:])) * np.dtype(arr.dtype).itemsize

    # ------------------------------------------------------------------ reading
    def committed_slots(self) -> np.ndarray:
        """Slots whose row is complete, ascending. Cached; `refresh()` re-reads."""
        if self._committed is None:
            shards = self._listed_shards("committed")
            flags = self._small("committed", shards)
            s = self.shard_videos
            parts = [shard * s + np.flatnonzero(flags[shard][: self.capacity - shard * s]) for shard in flags]
            self._committed = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        return self._committed

    def refresh(self) -> None:
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
        values = self._small(name, np.unique(shards).tolist(), cache=len(slots) < 64)
        return [values[s][j] if s in values else "" for s, j in zip(shards.tolist(), within.tolist(), strict=True)]

    def _frame_requests(self, name: str, slot: int, index: np.ndarray, idx: np.ndarray,
                        out: np.ndarray) -> list[ReadRequest]:
        """Byte ranges of `name` for frames `idx` of `slot`, one per run of consecutive frames."""
        shard, j = divmod(slot, self.shard_videos)
        offset, nbytes = int(index[j, 0]), int(index[j, 1])
        if offset == int(EMPTY):  # never written: zarr reads the fill value
            out[...] = 0
            return []
        if nbytes != self._chunk_nbytes(name):
            raise StoreError(f"{self.path}: slot {slot} of {name!r} holds {nbytes} bytes, expected "
                             f"{self._chunk_nbytes(name)}: the store is damaged")
        frame_bytes = out[0].nbytes if len(idx) else 0
        view = memoryview(out.reshape(-1).view(np.uint8))
        key = self.shard_key(name, shard)
        requests, start = [], 0
        for k in range(1, len(idx) + 1):
            if k == len(idx) or idx[k] != idx[k - 1] + 1:
                requests.append((key, offset + int(idx[start]) * frame_bytes,
                                 view[start * frame_bytes : k * frame_bytes]))
                start = k
        return requests

    def read_slots(self, slots: list[int], frames: list[np.ndarray | None]) -> list[dict[str, Any]]:
        """Rows of many slots at once: shard indexes and captions in one batch, then every frame
        range in one batch (concurrent requests on a remote store)."""
        frame_names = [n for n in FRAME_ARRAYS if n in self._arrays]
        shards = [s // self.shard_videos for s in slots]
        indexes = self._indexes([(n, sh) for sh in shards for n in frame_names])
        strings = self._small_many(("caption", "video_id"), shards, cache=True)
        captions, ids = strings["caption"], strings["video_id"]
        # One buffer per array for the whole batch, rows are views of it: as 32 separate 4 MB arrays,
        # malloc gives a batch's memory back to the kernel and the next batch faults it in again 4 kB
        # at a time; numpy backs one large array with huge pages (bench/data_path.py, CANDIDATE rows).
        same_length = len({-1 if w is None else len(w) for w in frames}) == 1 and frames[0] is not None
        batch = ({n: np.empty((len(slots), len(frames[0]), *self._arrays[n].shape[2:]),
                              dtype=np.dtype(self._arrays[n].dtype)) for n in frame_names}
                 if len(slots) > 1 and same_length else None)
        rows, requests = [], []
        for b, (slot, shard, want) in enumerate(zip(slots, shards, frames, strict=True)):
            if shard not in captions or shard not in ids:
                raise self._missing("caption" if shard not in captions else "video_id", shard)
            j = slot % self.shard_videos
            row: dict[str, Any] = {"caption": captions[shard][j], "video_id": ids[shard][j], "slot": slot}
            for name in frame_names:
                arr = self._arrays[name]
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

    def chunk_location(self, name: str, slot: int) -> tuple[str, int, int]:
        """(object key, byte offset, byte count) of one video's inner chunk of a frame array."""
        shard = slot // self.shard_videos
        offset, nbytes = (int(v) for v in self._indexes([(name, shard)])[(name, shard)][slot % self.shard_videos])
        return self.shard_key(name, shard), offset, nbytes

    def read_frames(self, name: str, slot: int, frames: np.ndarray | None = None) -> np.ndarray:
        """Frames of one frame array (dino, dino_scale, latents, timestamps) of one slot."""
        arr = self._arrays[name]
        idx = np.arange(arr.shape[1]) if frames is None else np.asarray(frames, dtype=np.int64)
        out = np.empty((len(idx), *arr.shape[2:]), dtype=np.dtype(arr.dtype))
        shard = slot // self.shard_videos
        requests = self._frame_requests(name, slot, self._indexes([(name, shard)])[(name, shard)], idx, out)
        if requests and self.objects.read_into(requests) != [len(v) for _, _, v in requests]:
            raise StoreError(f"{self.path}: short read of {requests[0][0]}: the shard is truncated; "
                             "re-run precompute to recompute it")
        return out

    def read(self, i: int, frames: np.ndarray | None = None) -> dict[str, Any]:
        """The i-th committed video: dino [T', N, D], latents [T', C, h, w] (stored dtypes),
        caption, video_id, timestamps [T'] (float32 seconds). `frames` picks frame indices."""
        slots = self.committed_slots()
        if not -len(slots) <= i < len(slots):
            raise IndexError(f"row {i} out of range: the store has {len(slots)} committed videos")
        return self.read_slot(int(slots[i]), frames)

    def duration(self, i: int) -> float:
        slot = int(self.committed_slots()[i])
        shard = slot // self.shard_videos
        return float(self._small("duration", [shard])[shard][slot % self.shard_videos])

    @property
    def failures(self) -> list[dict[str, Any]]:
        """Inputs that were skipped, with their source and the reason."""
        reasons = self._small("failure", self._listed_shards("failure"))
        failed = [(shard * self.shard_videos + j, r) for shard, rs in reasons.items() for j, r in enumerate(rs) if r]
        failed = [(slot, r) for slot, r in failed if slot < self.capacity]
        slots = np.array([slot for slot, _ in failed], dtype=np.int64)
        sources, ids = self.read_strings("source", slots), self.read_strings("video_id", slots)
        return [{"slot": slot, "source": src, "video_id": vid, "reason": reason}
                for (slot, reason), src, vid in zip(failed, sources, ids, strict=True)]

    def shard_state(self, shard: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(committed, failed) flags of the shard's slots, or None if the shard is not committed."""
        committed = self._small("committed", [shard]).get(shard)
        if committed is None:
            return None
        failure = self._small("failure", [shard]).get(shard) or [""] * self.shard_videos
        return committed == 1, np.array([bool(r) for r in failure])

    def slot_state(self, slot: int) -> str:
        """'committed', 'failed' or 'empty' (never written, or its shard not yet published)."""
        state = self.shard_state(slot // self.shard_videos)
        if state is None:
            return "empty"
        j = slot % self.shard_videos
        return "committed" if state[0][j] else "failed" if state[1][j] else "empty"

    def nbytes_on_disk(self) -> int:
        return self.objects.nbytes()

    # ------------------------------------------------------------------ writing
    def _check_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"{self.path} was opened read-only")

    def shard_buffer(self, shard: int, keep_existing: bool = False) -> ShardBuffer:
        """An in-memory shard to fill and publish; `keep_existing` starts from its committed and
        failed rows (read by zarr's own reader)."""
        self._check_writable()
        buf = ShardBuffer(self, shard)
        if keep_existing and self.shard_state(shard) is not None:
            lo, hi = buf.start, buf.stop
            for name, data in buf.data.items():
                data[...] = self._arrays[name][lo:hi]
            buf.filled = (buf.data["committed"] == 1) | np.array([bool(r) for r in buf.data["failure"]])
            for data in buf.data.values():  # rows never completed are not kept
                data[~buf.filled] = "" if data.dtype == object else 0
        return buf

    def write_row(self, slot: int, **row: Any) -> None:
        """Write one video (read-modify-write of its whole shard; writers of many rows use `shard_buffer`)."""
        buf = self.shard_buffer(slot // self.shard_videos, keep_existing=True)
        buf.add_row(slot, **row)
        buf.publish()

    def write_failure(self, slot: int, *, video_id: str, source: str, reason: str) -> None:
        buf = self.shard_buffer(slot // self.shard_videos, keep_existing=True)
        buf.add_failure(slot, video_id=video_id, source=source, reason=reason)
        buf.publish()


class ShardBuffer:
    """The rows of one shard, in memory until published: S videos of features at most."""

    def __init__(self, store: FeatureStore, shard: int) -> None:
        self.store, self.shard = store, shard
        self.start = shard * store.shard_videos
        self.stop = min(self.start + store.shard_videos, store.capacity)
        n = self.stop - self.start
        self.data: dict[str, np.ndarray] = {}
        for name, arr in store._arrays.items():
            if name in STRING_ARRAYS:
                self.data[name] = np.full(n, "", dtype=object)
            else:
                self.data[name] = np.zeros((n, *arr.shape[1:]), dtype=np.dtype(arr.dtype))
        self.filled = np.zeros(n, dtype=bool)

    def _at(self, slot: int) -> int:
        if not self.start <= slot < self.stop:
            raise IndexError(f"slot {slot} is not in shard {self.shard} (slots {self.start}..{self.stop - 1})")
        return slot - self.start

    def add_row(self, slot: int, *, dino: np.ndarray, latents: np.ndarray, caption: str, video_id: str,
                source: str, timestamps: np.ndarray, duration: float) -> None:
        j, d = self._at(slot), self.data
        for name in d:
            d[name][j] = "" if d[name].dtype == object else 0
        if "dino_scale" in d:
            d["dino"][j], d["dino_scale"][j] = quantize_int8(dino)
        else:
            d["dino"][j] = dino
        d["latents"][j], d["timestamps"][j], d["duration"][j] = latents, timestamps, duration
        d["caption"][j], d["video_id"][j], d["source"][j] = caption, video_id, source
        d["committed"][j] = 1
        self.filled[j] = True

    def add_failure(self, slot: int, *, video_id: str, source: str, reason: str) -> None:
        j, d = self._at(slot), self.data
        for name in d:
            d[name][j] = "" if d[name].dtype == object else 0
        d["video_id"][j], d["source"][j] = video_id, source
        d["failure"][j] = reason.replace("\n", " ")[:500] or "unknown error"
        self.filled[j] = True

    def complete(self, until: int | None = None) -> bool:
        """Every slot below `until` (default: the shard's end) written or recorded as failed."""
        until = self.stop if until is None else min(until, self.stop)
        return bool(self.filled[: until - self.start].all())

    def publish(self) -> None:
        """Encode each array's shard with zarr (in memory) and write it whole; `committed` last."""
        store = self.store
        proto = default_buffer_prototype()
        mem = zarr.storage.MemoryStore()
        names = sorted(self.data, key=lambda n: n == "committed")
        for name in names:
            meta = store._arrays[name].metadata.to_buffer_dict(proto)["zarr.json"]
            sync(mem.set(f"{name}/zarr.json", meta))
            # Every in-bounds inner chunk is written, fill values included: a shard object exists even
            # when all its values are empty, and a committed video always has an index entry.
            arr = zarr.open_array(mem, path=name, mode="r+").with_config({"write_empty_chunks": True})
            arr[self.start : self.stop] = self.data[name]
        for name in names:
            key = store.shard_key(name, self.shard)
            store.objects.put(key, mem._store_dict[key].to_bytes())
        store._forget_shard(self.shard)
        store._committed = None

