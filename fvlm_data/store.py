"""The feature store: one Zarr v3 group per dataset, one row (slot) per input video.

Layout (V slots, T frames, N DINO tokens of width D, VAE latents C x h x w):

    zarr.json      group attributes: format, version, encoders, sizes, dtypes, precompute args
    dino           [V, T, N, D] float16 (or int8, with dino_scale [V, T, N] float16 per token)
    latents        [V, T, C, h, w] float16
    timestamps     [V, T] float32, seconds of each sampled frame
    duration       [V] float32, seconds
    caption, video_id, source, failure   [V] strings
    committed      [V] uint8, written last: a row exists for readers only once this is 1

Every array is chunked one slot per chunk and stored without compression, so a chunk file of
`dino` is the raw little-endian bytes of one video and a reader fetches just the frames it
needs with `pread` (see README, "Store layout", for the measurements behind this choice).
One slot per chunk also lets several writer processes fill disjoint slots of one store with
no locking: zarr's LocalStore writes every chunk file atomically (temp file + rename).
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs.bytes import Endian

FORMAT_NAME = "fvlm-features"
FORMAT_VERSION = 1

# Attributes that must match for a run to add rows to an existing store.
COMPATIBILITY_KEYS = ("dino", "vae", "num_frames", "image_size", "feature_dtype")
STRING_ARRAYS = ("caption", "video_id", "source", "failure")


class StoreError(Exception):
    """A store that cannot be used as asked; the message is one line for the user."""


def check_compatible(path: str | os.PathLike, existing: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to add rows made with other encoders, frame count, image size or feature dtype."""
    for key in COMPATIBILITY_KEYS:
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
    """Decode an uncompressed zarr `vlen-utf8` chunk: uint32 count, then (uint32 length, bytes)*."""
    (count,) = struct.unpack_from("<I", raw, 0)
    pos, out = 4, []
    for _ in range(count):
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        out.append(raw[pos : pos + length].decode("utf-8"))
        pos += length
    return out


class FeatureStore:
    """A Zarr feature store. `FeatureStore.open(path)` reads; `FeatureStore.create_or_open` writes."""

    def __init__(self, path: str | os.PathLike, group: zarr.Group, writable: bool) -> None:
        self.path = Path(path)
        self._group = group
        self.writable = writable
        self.attrs: dict[str, Any] = dict(group.attrs)
        # write_empty_chunks is a runtime setting, not stored metadata: every writer must set it,
        # or a row of zeros would leave no chunk file (and the fast reader expects one per row).
        self._arrays = {name: group[name].with_config({"write_empty_chunks": True}) for name in group.array_keys()}
        self._raw_ok = {name: self._is_raw_layout(arr) for name, arr in self._arrays.items()}
        self._committed: np.ndarray | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureStore:
        """Open a store read-only; refuse anything this project did not write, or a newer format."""
        group = cls._open_group(path, mode="r")
        return cls(path, group, writable=False)

    @staticmethod
    def _open_group(path: str | os.PathLike, mode: str) -> zarr.Group:
        path = Path(path)
        if not path.exists():
            raise StoreError(f"no store at {path}")
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except Exception as e:  # zarr raises several types for a foreign or broken folder
            raise StoreError(f"{path} is not a Zarr v3 group ({type(e).__name__}: {e})") from None
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{path} is not an fvlm feature store (format={attrs.get('format')!r})")
        version = attrs.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StoreError(
                f"{path} has store format version {version}; this fvlm reads up to {FORMAT_VERSION}: "
                "upgrade fvlm"
            )
        return group

    @classmethod
    def create_or_open(
        cls, path: str | os.PathLike, attrs: dict[str, Any], shapes: FeatureShapes, capacity: int
    ) -> FeatureStore:
        """Open `path` for writing, creating it with `capacity` slots if it does not exist.

        An existing store must have been made with the same encoders, frame count, image size
        and feature dtype. Creation is atomic (built beside the target, then renamed), so
        several processes may start on the same path at once.
        """
        path = Path(path)
        if not path.exists():
            cls._create(path, attrs, shapes, capacity)
        group = cls._open_group(path, mode="r+")
        check_compatible(path, dict(group.attrs), attrs)
        store = cls(path, group, writable=True)
        if store.capacity < capacity:
            store._grow(capacity)
        return store

    @classmethod
    def _create(cls, path: Path, attrs: dict[str, Any], shapes: FeatureShapes, capacity: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            for name, (shape, dtype) in _array_specs(shapes, attrs["feature_dtype"]).items():
                group.create_array(
                    name,
                    shape=(capacity, *shape),
                    chunks=(1, *shape),
                    dtype=dtype,
                    compressors=None,  # raw chunks: read by pread of just the needed frames
                    fill_value="" if dtype is str else 0,
                )
            group.attrs.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **attrs})
            try:
                os.rename(tmp, path)
            except OSError:
                if not path.exists():
                    raise
                # Another process created it first; its store is the one we use.
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _grow(self, capacity: int) -> None:
        """More inputs than slots (e.g. a larger --limit): extend every array along the slot axis."""
        for arr in self._arrays.values():
            arr.resize((capacity, *arr.shape[1:]))

    # ------------------------------------------------------------------ reading
    @property
    def capacity(self) -> int:
        return int(self._arrays["committed"].shape[0])

    @staticmethod
    def _is_raw_layout(arr: zarr.Array) -> bool:
        """True when chunk files are plain little-endian bytes at `<name>/c/<slot>/0/...`."""
        meta = arr.metadata
        codecs = [type(c).__name__ for c in meta.codecs]
        enc = meta.chunk_key_encoding
        return (
            arr.chunks[0] == 1
            and tuple(arr.chunks[1:]) == tuple(arr.shape[1:])
            and codecs in (["BytesCodec"], ["VLenUTF8Codec"])
            and getattr(enc, "separator", None) == "/"
            and type(enc).__name__ == "DefaultChunkKeyEncoding"
            and (codecs[0] != "BytesCodec" or meta.codecs[0].endian in (None, Endian.little))
        )

    def _chunk_path(self, name: str, slot: int) -> Path:
        inner = ["0"] * (self._arrays[name].ndim - 1)  # every non-slot axis is a single chunk
        return self.path.joinpath(name, "c", str(slot), *inner)

    def committed_slots(self) -> np.ndarray:
        """Slots whose row is complete, ascending. Cached; `refresh()` re-reads."""
        if self._committed is None:
            if self._raw_ok["committed"]:
                # A marker chunk file exists only once its row was committed: list, don't read.
                folder = self.path / "committed" / "c"
                names = [e.name for e in os.scandir(folder)] if folder.exists() else []
                slots = np.array(sorted(int(n) for n in names if n.isdigit()), dtype=np.int64)
                slots = slots[slots < self.capacity]
                if slots.size:  # a marker may also hold 0 if a row was ever un-committed
                    slots = slots[[self._read_raw_bytes("committed", int(s)) == b"\x01" for s in slots]]
            else:
                slots = np.flatnonzero(self._arrays["committed"][:]).astype(np.int64)
            self._committed = slots
        return self._committed

    def refresh(self) -> None:
        self._committed = None

    def __len__(self) -> int:
        return len(self.committed_slots())

    def _read_raw_bytes(self, name: str, slot: int) -> bytes:
        try:
            return self._chunk_path(name, slot).read_bytes()
        except FileNotFoundError:
            return b""

    def read_string(self, name: str, slot: int) -> str:
        if self._raw_ok[name]:
            raw = self._read_raw_bytes(name, slot)
            return _decode_vlen_utf8(raw)[0] if raw else ""
        return str(self._arrays[name][slot])

    def read_strings(self, name: str, slots: np.ndarray | None = None) -> list[str]:
        slots = self.committed_slots() if slots is None else slots
        return [self.read_string(name, int(s)) for s in slots]

    def _read_frames(self, name: str, slot: int, frames: np.ndarray | None) -> np.ndarray:
        arr = self._arrays[name]
        shape, dtype = arr.shape[1:], np.dtype(arr.dtype)
        idx = np.arange(shape[0]) if frames is None else np.asarray(frames, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= shape[0]):
            raise IndexError(f"frame index out of range 0..{shape[0] - 1}: {idx.tolist()}")
        if not self._raw_ok[name]:
            return np.asarray(arr[slot][idx])
        out = np.empty((len(idx), *shape[1:]), dtype=dtype)
        frame_bytes = out[0].nbytes if len(idx) else 0
        view = memoryview(out.reshape(-1).view(np.uint8))
        fd = os.open(self._chunk_path(name, slot), os.O_RDONLY)
        try:
            # Runs of consecutive frames (all 24 = one run) are read with one pread each. On a cold
            # page cache, announcing every run first lets the kernel queue all the I/O at once
            # (bench/data_path.py: 1.5x faster cold, ~6% slower warm).
            runs, start = [], 0
            for k in range(1, len(idx) + 1):
                if k == len(idx) or idx[k] != idx[k - 1] + 1:
                    runs.append((start, k))
                    start = k
            if len(runs) > 1 and hasattr(os, "posix_fadvise"):
                for i, j in runs:
                    os.posix_fadvise(fd, int(idx[i]) * frame_bytes, (j - i) * frame_bytes, os.POSIX_FADV_WILLNEED)
            for i, j in runs:
                want = (j - i) * frame_bytes
                got = os.preadv(fd, [view[i * frame_bytes : j * frame_bytes]], int(idx[i]) * frame_bytes)
                if got != want:
                    raise StoreError(f"short read in {name} slot {slot}: store is damaged")
        finally:
            os.close(fd)
        return out

    def read_slot(self, slot: int, frames: np.ndarray | None = None) -> dict[str, Any]:
        row: dict[str, Any] = {
            "dino": self._read_frames("dino", slot, frames),
            "latents": self._read_frames("latents", slot, frames),
            "timestamps": self._read_frames("timestamps", slot, frames),
            "caption": self.read_string("caption", slot),
            "video_id": self.read_string("video_id", slot),
            "slot": slot,
        }
        if "dino_scale" in self._arrays:
            row["dino_scale"] = self._read_frames("dino_scale", slot, frames)
        return row

    def read(self, i: int, frames: np.ndarray | None = None) -> dict[str, Any]:
        """The i-th committed video: dino [T', N, D], latents [T', C, h, w] (stored dtypes),
        caption, video_id, timestamps [T'] (float32 seconds). `frames` picks frame indices."""
        slots = self.committed_slots()
        if not -len(slots) <= i < len(slots):
            raise IndexError(f"row {i} out of range: the store has {len(slots)} committed videos")
        return self.read_slot(int(slots[i]), frames)

    def duration(self, i: int) -> float:
        return float(self._arrays["duration"][int(self.committed_slots()[i])])

    @property
    def failures(self) -> list[dict[str, Any]]:
        """Inputs that were skipped, with their source and the reason."""
        folder = self.path / "failure" / "c"
        if self._raw_ok["failure"]:
            slots = sorted(int(e.name) for e in os.scandir(folder) if e.name.isdigit()) if folder.exists() else []
        else:
            slots = range(self.capacity)
        out = []
        for slot in slots:
            reason = self.read_string("failure", slot)
            if reason:
                out.append({"slot": slot, "source": self.read_string("source", slot),
                            "video_id": self.read_string("video_id", slot), "reason": reason})
        return out

    def slot_state(self, slot: int) -> str:
        """'committed', 'failed' or 'empty' (never written, or interrupted before its commit)."""
        if self._read_raw_bytes("committed", slot) == b"\x01":
            return "committed"
        return "failed" if self.read_string("failure", slot) else "empty"

    def nbytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    # ------------------------------------------------------------------ writing
    def _check_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"{self.path} was opened read-only")

    def write_row(
        self,
        slot: int,
        *,
        dino: np.ndarray,
        latents: np.ndarray,
        caption: str,
        video_id: str,
        source: str,
        timestamps: np.ndarray,
        duration: float,
    ) -> None:
        """Write one video; it becomes visible to readers only when its commit marker is written last."""
        self._check_writable()
        a = self._arrays
        if self.attrs["feature_dtype"] == "int8":
            q, scale = quantize_int8(dino)
            a["dino"][slot] = q
            a["dino_scale"][slot] = scale
        else:
            a["dino"][slot] = dino.astype(np.float16)
        a["latents"][slot] = latents.astype(np.float16)
        a["timestamps"][slot] = np.asarray(timestamps, dtype=np.float32)
        a["duration"][slot] = np.float32(duration)
        a["caption"][slot] = caption
        a["video_id"][slot] = video_id
        a["source"][slot] = source
        a["failure"][slot] = ""
        a["committed"][slot] = 1  # the commit marker: always last
        self._committed = None

    def write_failure(self, slot: int, *, video_id: str, source: str, reason: str) -> None:
        """Record a skipped input; the failure text is written last, so it marks a complete record."""
        self._check_writable()
        self._arrays["video_id"][slot] = video_id
        self._arrays["source"][slot] = source
        self._arrays["failure"][slot] = reason.replace("\n", " ")[:500] or "unknown error"
