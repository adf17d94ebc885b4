"""The index Zarr's sharding codec writes at the end of every shard object, read as a small value.

For n inner chunks it is n (offset, nbytes) pairs of little-endian uint64, then a crc32c of those
16 n bytes: 16 n + 4 bytes in all. An inner chunk that was never written has offset and nbytes
2^64 - 1. Reading it ourselves lets the reader fetch just the frames it needs by byte ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

import google_crc32c
import numpy as np

from fvlm_data.errors import StoreError

_EMPTY = np.uint64(2**64 - 1)  # offset (and nbytes) of an inner chunk that was never written


@dataclass(frozen=True)
class ShardIndex:
    entries: np.ndarray  # [n, 2] uint64: (offset, nbytes) per inner chunk

    @staticmethod
    def nbytes(chunks: int) -> int:
        """Size of the index of a shard of `chunks` inner chunks: the tail to fetch."""
        return 16 * chunks + 4

    @classmethod
    def parse(cls, tail: bytes, object_size: int, chunks: int, where: str) -> ShardIndex:
        """The index at the end of `tail` (the last bytes of an object of `object_size` bytes), after
        checking its crc32c and that every chunk lies inside the object; `where` names the shard in errors."""
        need = cls.nbytes(chunks)
        if object_size < need or len(tail) < need:
            raise StoreError(f"{where} is truncated ({object_size} bytes): re-run precompute to recompute it")
        body, crc = tail[-need:-4], tail[-4:]
        if google_crc32c.value(body) != int.from_bytes(crc, "little"):
            raise StoreError(f"{where} fails its index checksum (truncated or damaged): "
                             "re-run precompute to recompute it")
        index = cls(np.frombuffer(body, dtype="<u8").reshape(chunks, 2))
        written = index.entries[index.entries[:, 0] != _EMPTY]
        if len(written) and int((written[:, 0] + written[:, 1]).max()) > object_size - need:
            raise StoreError(f"{where} is truncated ({object_size} bytes): re-run precompute to recompute it")
        return index

    def is_empty(self, j: int) -> bool:
        """Inner chunk `j` was never written (zarr reads its fill value)."""
        return bool(self.entries[j, 0] == _EMPTY)

    def offset(self, j: int) -> int:
        return int(self.entries[j, 0])

    def chunk_nbytes(self, j: int) -> int:
        return int(self.entries[j, 1])

    def sizes(self) -> np.ndarray:
        """Bytes of every inner chunk (2^64 - 1 for one never written)."""
        return self.entries[:, 1]

    def chunk(self, data: bytes, j: int = 0) -> bytes:
        """Inner chunk `j` of a whole shard object `data`."""
        return data[self.offset(j) : self.offset(j) + self.chunk_nbytes(j)]

    def frame_ranges(self, j: int, frames: np.ndarray, frame_bytes: int) -> list[tuple[int, int, int]]:
        """(byte offset in the object, first, end) of each run of consecutive `frames` of chunk `j`:
        frames[first:end] are one contiguous byte range."""
        runs, first = [], 0
        for k in range(1, len(frames) + 1):
            if k == len(frames) or frames[k] != frames[k - 1] + 1:
                runs.append((self.offset(j) + int(frames[first]) * frame_bytes, first, k))
                first = k
        return runs
