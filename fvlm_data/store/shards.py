"""A store's shard objects: their keys (and how errors name them), the cached shard indexes of the
frame arrays, and the values of whole shards of the small arrays, checked before they are decoded.

`FeatureStore` (reader.py) builds on this: it sets `path`, `objects`, `arrays`, `shard_videos` and
`version`, and the two caches.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import numcodecs
import numpy as np
import zarr

from fvlm_data.errors import StoreError
from fvlm_data.store.checksums import checked_chunk
from fvlm_data.store.format import STRING_ARRAYS, inner_chunks
from fvlm_data.store.objects import LocalObjects, RemoteObjects
from fvlm_data.store.shard_index import ShardIndex

_VLEN_UTF8 = numcodecs.VLenUTF8()  # numcodecs' compiled decoder, the one zarr itself uses


class ShardObjects:
    """The shard objects of a store's arrays (see the module docstring)."""

    INDEX_CACHE = 4096  # shard indexes kept per process (each S x 16 bytes)
    SMALL_CACHE = 2048  # caption / video_id / checksum shards kept per process (a few kB each)

    path: str
    objects: LocalObjects | RemoteObjects
    arrays: dict[str, zarr.Array]
    shard_videos: int
    version: int
    _index_cache: OrderedDict[tuple[str, int], ShardIndex]
    _small_cache: OrderedDict[tuple[str, int], Any]
    _capacity: int  # the arrays' slot count (while a grow is under way, the count before it)

    @property
    def has_checksums(self) -> bool:
        """Format 3: every byte read is checked (per-frame crc32c, crc32c codec on the small arrays)."""
        return self.version >= 3

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def num_shard_objects(self) -> int:
        """Shards along the slot axis (the last one may be partly beyond the capacity)."""
        return -(-self.capacity // self.shard_videos)

    def shard_key(self, name: str, shard: int) -> str:
        return "/".join([name, "c", str(shard)] + ["0"] * (self.arrays[name].ndim - 1))

    def shard_name(self, name: str, shard: int) -> str:
        """How errors name a shard object."""
        return f"{self.path}: shard {shard} of {name!r} ({self.shard_key(name, shard)})"

    def slot_name(self, name: str, slot: int) -> str:
        return f"{self.shard_name(name, slot // self.shard_videos)}, slot {slot}"

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

    def decode_small(self, name: str, shard: int, data: bytes) -> np.ndarray | list[str]:
        """The values of a whole shard object of a small array (one inner chunk), [S, ...]: its checksum
        (format 3) and its size are checked before anything is decoded."""
        where = self.shard_name(name, shard)
        index = ShardIndex.parse(data, len(data), inner_chunks(name, self.shard_videos), where)
        if index.is_empty(0):
            raise StoreError(f"{where} holds no data: re-run precompute")
        chunk = checked_chunk(index.chunk(data), where) if self.has_checksums else index.chunk(data)
        damaged = StoreError(f"{where} cannot be decoded (the shard is damaged): re-run precompute to recompute it")
        if name in STRING_ARRAYS:
            if len(chunk) < 4 or int.from_bytes(chunk[:4], "little") != self.shard_videos:
                raise damaged  # a count that is not S: never allocate what a damaged header says
            try:
                return _VLEN_UTF8.decode(chunk).tolist()
            except (ValueError, UnicodeDecodeError, MemoryError, RuntimeError):
                raise damaged from None
        arr = self.arrays[name]
        dtype = np.dtype(arr.dtype).newbyteorder("<")
        if len(chunk) != self.shard_videos * int(np.prod(arr.shape[1:])) * dtype.itemsize:
            raise damaged
        return np.frombuffer(chunk, dtype=dtype).reshape(self.shard_videos, *arr.shape[1:])

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
                out[name][shard] = self.decode_small(name, shard, data)
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

    def shards_lacking(self, name: str, shards: list[int]) -> list[int]:
        """Those of `shards` without an object of `name`: a listing (a stat per shard on a local disk, where the
        folders of a multi-dimensional array's shard outlive its object)."""
        if isinstance(self.objects, LocalObjects):
            root = str(self.objects.root)
            return [s for s in shards if not os.path.isfile(os.path.join(root, self.shard_key(name, s)))]
        listed = set(self._listed_shards(name))
        return [s for s in shards if s not in listed]

    def _listed_shards(self, name: str) -> list[int]:
        """Shards of `name` that have an object, from one listing (no per-video files exist)."""
        n = self.num_shard_objects
        return sorted(int(s) for s in self.objects.list_names(f"{name}/c") if s.isdigit() and int(s) < n)
