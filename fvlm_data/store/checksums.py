"""Checksums of what a format-3 store holds, verified on every read.

Frame arrays (`dino`, `dino_scale`, `latents`, `timestamps`) are read by byte ranges, a few frames
of a video at a time, so each frame has its own crc32c (`<name>_crc32c`, [V, T] uint32, computed
by the writer over the frame's little-endian bytes): reading 16 of 24 frames verifies exactly
those 16. The small arrays' inner chunks carry zarr's standard crc32c codec (4 bytes, little-endian,
after the chunk), so zarr-python verifies them too; this reader checks it before decoding anything.
A mismatch is a one-line `StoreError` naming the array, the shard and the slot.
"""

from __future__ import annotations

import google_crc32c
import numpy as np

from fvlm_data.errors import StoreError

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
