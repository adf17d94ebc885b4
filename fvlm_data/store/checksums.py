"""Checksums of what a format-3 store holds, verified on every read.

Frame arrays (`dino`, `dino_scale`, `latents`, `timestamps`) are read by byte ranges, a few frames
of a video at a time, so each frame has its own crc32c (`<name>_crc32c`, [V, T] uint32, computed
by the writer over the frame's little-endian bytes): reading 16 of 24 frames verifies exactly
those 16. The small arrays' inner chunks carry zarr's standard crc32c codec (4 bytes, little-endian,
after the chunk), so zarr-python verifies them too; this reader checks it before decoding anything.
A mismatch is a one-line `StoreError` naming the array, the shard and the slot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import google_crc32c
import numpy as np

from fvlm_data.objects import StoreError
from fvlm_data.store.format import FRAME_ARRAYS, checksum_array
from fvlm_data.store.shard_index import ShardIndex

if TYPE_CHECKING:
    from fvlm_data.store.reader import FeatureStore

REPAIR = "re-run precompute to recompute it"


def frame_checksums(frames: np.ndarray) -> np.ndarray:
    """crc32c of each frame (first axis) of `frames` as stored (little-endian, C order): [T] uint32."""
    flat = np.ascontiguousarray(frames).reshape(len(frames), -1)
    return np.fromiter((google_crc32c.value(f.view(np.uint8)) for f in flat), dtype=np.uint32, count=len(flat))


def check_frames(frames: np.ndarray, expected: np.ndarray, where: str, frame_numbers: np.ndarray) -> None:
    """Refuse frames whose crc32c is not the stored one; `where` names the array, shard and slot."""
    bad = np.flatnonzero(frame_checksums(frames) != expected)
    if len(bad):
        raise StoreError(f"{where}: frame {int(frame_numbers[bad[0]])} fails its crc32c checksum (the shard is "
                         f"damaged): {REPAIR}")


def checked_chunk(chunk: bytes, where: str) -> bytes:
    """An inner chunk written with zarr's crc32c codec, less its checksum, once the checksum agrees."""
    if len(chunk) < 4 or google_crc32c.value(chunk[:-4]) != int.from_bytes(chunk[-4:], "little"):
        raise StoreError(f"{where} fails its crc32c checksum (the shard is damaged): {REPAIR}")
    return chunk[:-4]


def shard_data_problem(store: FeatureStore, shard: int) -> str | None:
    """Why the data of a published shard cannot be trusted (every byte of every array's object read and
    checked against its checksums), or None. Format 2 has no frame checksums: only its small arrays
    are decoded. One shard's objects in memory at a time."""
    names = list(store.arrays)
    datas = store.objects.get_many([store.shard_key(name, shard) for name in names])
    objects = dict(zip(names, datas, strict=True))
    try:
        small = {name: store.decode_small(name, shard, data) for name, data in objects.items()
                 if name not in FRAME_ARRAYS and data is not None}
        committed = small.get("committed")
        if committed is None:
            return f"{store.shard_name('committed', shard)} is missing"
        n_slots = min(store.shard_videos, store.capacity - shard * store.shard_videos)
        for name in [n for n in FRAME_ARRAYS if n in objects]:
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
