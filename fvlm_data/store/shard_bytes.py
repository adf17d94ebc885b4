"""Shard objects laid out byte for byte as zarr's sharding codec writes them, without zarr's array write.

Zarr's write of a 300 MB shard (copy into its chunk buffers, encode chunk by chunk, join) took 4-6 s;
the disk writes the same bytes in well under one. So the writer builds each object itself, in the
layout `format.schema` declares and `format.check_layout` checks on open:

- a frame array's shard object is its in-bounds inner chunks (one video each, raw little-endian
  bytes, every one written, zeros included: zarr's `write_empty_chunks`) in slot order, then the
  index (`shard_index.ShardIndex`: S (offset, nbytes) pairs, 2^64 - 1 for inner chunks past the
  array's end, and their crc32c). `FrameShard` is that object's buffer: rows are copied straight
  into their place as they arrive (one copy), the index is written at the end when published.
- a small array's shard object is one inner chunk of all S values (past the array's end: the fill
  value), raw little-endian bytes or numcodecs' VLenUTF8 for strings, then (format 3) its crc32c,
  then the index of that one chunk.

tests/test_shard_bytes.py checks that every object is the one zarr writes for the same values.
"""

from __future__ import annotations

import threading

import google_crc32c
import numcodecs
import numpy as np

from fvlm_data.store.shard_index import ShardIndex

_VLEN_UTF8 = numcodecs.VLenUTF8()  # the encoder zarr's VLenUTF8Codec uses
_EMPTY = 2**64 - 1  # an inner chunk never written


def _index(chunk_nbytes: list[int], chunks: int) -> bytes:
    """The shard index of `chunks` inner chunks, the first len(chunk_nbytes) of them stored back to back."""
    entries = np.full((chunks, 2), _EMPTY, dtype="<u8")
    sizes = np.asarray(chunk_nbytes, dtype=np.uint64)
    entries[: len(sizes), 0] = np.cumsum(sizes) - sizes
    entries[: len(sizes), 1] = sizes
    body = entries.tobytes()
    return body + google_crc32c.value(body).to_bytes(4, "little")


class BufferPool:
    """The buffers of published shards, reused by the next ones (taken by the thread that fills shards,
    given back by the one that publishes them):
    a fresh 300 MB buffer costs a page fault per 4 kB on its first pass, 0.1-1.5 s per shard on a
    loaded machine, against 0.03-0.07 s for the copy itself. A reused buffer holds an old shard's
    bytes: its user overwrites or zeroes every row."""

    def __init__(self, keep: int = 8) -> None:
        self.keep, self._free, self._lock = keep, [], threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            for i, raw in enumerate(self._free):
                if raw.nbytes == nbytes:
                    return self._free.pop(i)
        return np.zeros(nbytes, dtype=np.uint8)

    def give(self, raw: np.ndarray) -> None:
        with self._lock:
            self._free = [raw, *self._free][: self.keep]


class FrameShard:
    """The shard object of a frame array, filled in place: `values` [rows, T, ...] is a view of its
    inner chunks (from `pool`: old bytes until overwritten), `finish()` adds the index and gives the
    whole object."""

    def __init__(self, shard_videos: int, rows: int, row_shape: tuple[int, ...], dtype: np.dtype,
                 pool: BufferPool) -> None:
        self.shard_videos, self.rows = shard_videos, rows
        dtype = np.dtype(dtype).newbyteorder("<")  # zarr's bytes codec: little-endian
        self.chunk_nbytes = int(np.prod(row_shape)) * dtype.itemsize
        data_nbytes = rows * self.chunk_nbytes
        self.raw = pool.take(data_nbytes + ShardIndex.nbytes(shard_videos))
        self.values = self.raw[:data_nbytes].view(dtype).reshape(rows, *row_shape)

    def finish(self) -> np.ndarray:
        """The whole object (a view of the buffer, no copy), index included."""
        self.raw[self.rows * self.chunk_nbytes :] = np.frombuffer(
            _index([self.chunk_nbytes] * self.rows, self.shard_videos), dtype=np.uint8)
        return self.raw


def small_object(values: np.ndarray, shard_videos: int, checksum: bool) -> bytes:
    """The shard object of a small array holding `values` (its in-bounds slots; the rest of the S
    are the fill value: "" for strings, 0 otherwise); `checksum`: zarr's crc32c codec (format 3)."""
    if values.dtype == object:
        padded = np.full((shard_videos, *values.shape[1:]), "", dtype=object)
        padded[: len(values)] = values
        chunk = bytes(_VLEN_UTF8.encode(padded))
    else:
        padded = np.zeros((shard_videos, *values.shape[1:]), dtype=values.dtype.newbyteorder("<"))
        padded[: len(values)] = values
        chunk = padded.tobytes()
    if checksum:
        chunk += google_crc32c.value(chunk).to_bytes(4, "little")
    return chunk + _index([len(chunk)], 1)
