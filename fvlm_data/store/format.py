"""Store format 3 (and 2): what a store holds, how it is laid out, and which of its attributes must agree.

This module is the one place for these facts: the per-frame arrays (`FRAME_TABLE`, declared once
and read by everything that writes, reads, checks or batches them), the array specs and their Zarr schema, the layout
check that the byte-range reader relies on, the format/version check, and `check_compatible`,
which precompute (before loading any model) and the writer (on opening) both use.

Format 3 adds to format 2: the caption table (`captions`, `file_id`), a crc32c per frame of each
frame array (`<name>_crc32c`, [V, T] uint32), zarr's crc32c codec on every small array's inner
chunk, and the attributes `store_id` and `inputs` (the input list's fingerprint).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from fvlm_data.errors import StoreError

FORMAT_NAME = "fvlm-features"
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)  # format-2 stores (no caption table, no checksums) stay readable and writable
DEFAULT_SHARD_VIDEOS = 64

# `captions` is "" when a slot has one caption (then it is `caption`), else a JSON list of all of them.
STRING_ARRAYS = ("caption", "video_id", "source", "failure", "captions", "file_id")
FORMAT_3_ARRAYS = ("captions", "file_id")  # and the checksum arrays
CHECKSUM_SUFFIX = "_crc32c"
SCALE_SUFFIX = "_scale"


@dataclass(frozen=True)
class FrameArray:
    """One per-frame array of the store, [V, T, *shape]: one inner chunk per video, uncompressed (read
    by byte ranges, a few frames at a time), and in format 3 a crc32c per frame (`<name>_crc32c`)."""

    name: str  # the array's name: in the store, in the encoders' output and in the dataset's batch
    dtype: str  # how it is stored
    quantizable: bool = False  # --feature-dtype int8: int8 and a float16 scale per token (`<name>_scale`)
    encoded: bool = True  # an encoder output (its per-frame shape recorded in `feature_shapes`); else the decoder's
    read: bool = True  # the dataset reads it into every sample
    per_block: bool = False  # one array per DINO block the store records: `<name><block>` (e.g. dino_block10)

    def names(self, blocks: tuple[int, ...] = ()) -> tuple[str, ...]:
        """The store arrays of this entry (a per-block entry has one per block in `blocks`)."""
        return tuple(f"{self.name}{k}" for k in blocks) if self.per_block else (self.name,)


# The store's per-frame arrays: the one place they are declared. The writer, reader, consistency checks,
# checksums, dataset and `inspect` loop over this table; an encoder that returns one more array, declared
# here, reaches the store and the dataset's batch with nothing else changed (tests/test_feature_table.py).
FRAME_TABLE: tuple[FrameArray, ...] = (
    FrameArray("dino", "float16", quantizable=True),  # DINOv2's final tokens [N, D]
    FrameArray("latents", "float16"),  # SD-VAE latents [C, h, w], scaled by the VAE's factor
    FrameArray("timestamps", "float32", encoded=False),  # seconds of each sampled frame in its file
    # precompute --dino-layers N: the hidden states entering each of DINO's last N blocks [N, D], what the
    # deep query attends to (fvlm_model/deep_query.py); read only by a model that asks for them.
    FrameArray("dino_block", "float16", quantizable=True, read=False, per_block=True),
)
BLOCK_STATES = "dino_block"  # the per-block entry's name: block k's states are `dino_block{k}`


def block_array(block: int) -> str:
    """The array of the hidden states entering DINO block `block` (0-based)."""
    return f"{BLOCK_STATES}{block}"


def table_entry(name: str) -> FrameArray | None:
    """The table entry a store array belongs to (`dino` and `dino_scale`: dino; `dino_block10`: dino_block),
    or None for the small arrays."""
    base = name.removesuffix(SCALE_SUFFIX)
    for f in FRAME_TABLE:
        ours = base.startswith(f.name) and base[len(f.name):].isdigit() if f.per_block else base == f.name
        if ours and (base == name or f.quantizable):
            return f
    return None


def features() -> tuple[FrameArray, ...]:
    """The per-frame arrays the encoders make (`FRAME_TABLE` without the decoder's timestamps)."""
    return tuple(f for f in FRAME_TABLE if f.encoded)


def frame_array_names(read_by_dataset: bool = False, blocks: tuple[int, ...] = ()) -> tuple[str, ...]:
    """Every per-frame array a store with DINO states of `blocks` may hold, in table order: the table's
    arrays and the int8 scales of quantizable ones (`read_by_dataset`: only those the dataset reads into
    every sample)."""
    return tuple(n for f in FRAME_TABLE if f.read or not read_by_dataset for name in f.names(blocks)
                 for n in ((name, name + SCALE_SUFFIX) if f.quantizable else (name,)))


def is_frame_array(name: str) -> bool:
    return table_entry(name) is not None


def checksum_array(name: str) -> str:
    """The [V, T] uint32 array holding the crc32c of each frame of frame array `name` (format 3)."""
    return name + CHECKSUM_SUFFIX


@dataclass(frozen=True)
class FeatureRecipe:
    """How a store's features are made. Rows made another way never join the store."""

    dino: str
    vae: str
    num_frames: int
    image_size: int
    feature_dtype: str
    frame_sampling: str  # how frames were taken (precompute's --seek): rows sampled otherwise never mix
    dino_layers: int = 0  # DINO blocks whose input states are stored (--dino-layers); a store without the key has 0

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> FeatureRecipe:
        return cls(**{f.name: attrs.get(f.name, f.default if f.default is not MISSING else None)
                      for f in fields(cls)})


# Attributes that must match for a run to add rows to an existing store.
COMPATIBILITY_KEYS = tuple(f.name for f in fields(FeatureRecipe))
SHAPE_KEYS = ("dino_tokens", "dino_dim", "latent_shape")  # a model cannot even load on other shapes
# Attributes that say what the features are: a checkpoint records them and runs only on a store that agrees.
FEATURE_KEYS = ("dino", "vae", "preset", "num_frames", "image_size", "feature_dtype", *SHAPE_KEYS)


@dataclass(frozen=True)
class FeatureShapes:
    """Per-video shapes: T frames, and each encoder output's per-frame shape (`per_frame`, by name:
    DINO's [N, D], the VAE latents' [C, h, w], and any other array of the table)."""

    num_frames: int
    per_frame: Mapping[str, tuple[int, ...]]

    def as_attrs(self) -> dict[str, Any]:
        """`num_frames`, `feature_shapes` ({name: shape}) and, as every store has had them, the shape
        keys of DINO and the latents (`dino_tokens`, `dino_dim`, `latent_shape`: checkpoints record them)."""
        attrs: dict[str, Any] = {"num_frames": self.num_frames,
                                 "feature_shapes": {name: list(shape) for name, shape in self.per_frame.items()}}
        if "dino" in self.per_frame:
            attrs["dino_tokens"], attrs["dino_dim"] = (int(x) for x in self.per_frame["dino"])
        if "latents" in self.per_frame:
            attrs["latent_shape"] = list(self.per_frame["latents"])
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> FeatureShapes:
        """From a store's attributes; a store made before `feature_shapes` has DINO's and the latents' keys."""
        recorded = attrs.get("feature_shapes")
        if recorded is None:
            recorded = {"dino": [attrs["dino_tokens"], attrs["dino_dim"]], "latents": attrs["latent_shape"]}
        return cls(int(attrs["num_frames"]), {name: tuple(shape) for name, shape in recorded.items()})


def check_compatible(path: str | os.PathLike, existing: Mapping[str, Any], wanted: FeatureRecipe,
                     shard_videos: int | None = None) -> None:
    """Refuse to add rows made with other encoders, frame count, image size or feature dtype (or,
    if `shard_videos` is asked for, another shard size)."""
    have_recipe = asdict(FeatureRecipe.from_attrs(existing))
    pairs = [(key, have_recipe[key], value) for key, value in asdict(wanted).items()]
    if shard_videos is not None:  # not asked for: the store's own value is used
        pairs.append(("shard_videos", existing.get("shard_videos"), shard_videos))
    for key, have, want in pairs:
        if have != want:
            raise StoreError(f"{path} was made with {key}={have!r}, this run asks for {key}={want!r}: use a new --out")


def check_format(path: str | os.PathLike, attrs: Mapping[str, Any]) -> None:
    """Refuse a group this project did not write, a format-1 store, or a newer format."""
    if attrs.get("format") != FORMAT_NAME:
        raise StoreError(f"{path} is not an fvlm feature store (format={attrs.get('format')!r})")
    version = attrs.get("format_version")
    if version == 1:
        raise StoreError(f"{path} is a format-1 store (one file per video); this fvlm reads format "
                         f"{FORMAT_VERSION}: re-run precompute into a new --out")
    if version not in READABLE_VERSIONS:
        raise StoreError(f"{path} has store format version {version}; this fvlm reads version {FORMAT_VERSION}: "
                         "upgrade fvlm")


def array_specs(shapes: FeatureShapes, feature_dtype: str,
                version: int = FORMAT_VERSION) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Per-slot shape and dtype of every array in a store of format `version`: the table's per-frame
    arrays (an encoder output the shapes lack is refused), then the small ones."""
    t = shapes.num_frames
    specs: dict[str, tuple[tuple[int, ...], Any]] = {}
    for f in FRAME_TABLE:
        if not f.encoded:
            specs[f.name] = ((t,), f.dtype)
            continue
        if not f.per_block and f.name not in shapes.per_frame:
            raise StoreError(f"no per-frame shape for the feature {f.name!r} (the encoders made "
                             f"{', '.join(shapes.per_frame) or 'none'})")
        # A per-block entry has an array per block the encoders returned (none without --dino-layers).
        for name in [n for n in shapes.per_frame if table_entry(n) is f] if f.per_block else [f.name]:
            shape = (t, *shapes.per_frame[name])
            if f.quantizable and feature_dtype == "int8":
                specs[name], specs[name + SCALE_SUFFIX] = (shape, "int8"), (shape[:-1], "float16")
            else:
                specs[name] = (shape, f.dtype)
    specs.update({"duration": ((), "float32"), "committed": ((), "uint8")})
    for name in STRING_ARRAYS:
        if version >= 3 or name not in FORMAT_3_ARRAYS:
            specs[name] = ((), str)
    if version >= 3:
        for name in [n for n in specs if is_frame_array(n)]:
            specs[checksum_array(name)] = ((t,), "uint32")
    return specs


def inner_chunks(name: str, shard_videos: int) -> int:
    """Inner chunks per shard object: one per video for frame arrays, one for the small arrays."""
    return shard_videos if is_frame_array(name) else 1


def inner_chunk_videos(name: str, shard_videos: int) -> int:
    """Videos per inner chunk: one for frame arrays, the whole shard for the small arrays."""
    return shard_videos // inner_chunks(name, shard_videos)


def chunk_nbytes(arr: zarr.Array) -> int:
    """Bytes of one video's (uncompressed) inner chunk of a frame array."""
    return int(np.prod(arr.shape[1:])) * np.dtype(arr.dtype).itemsize


def schema(attrs: Mapping[str, Any], shapes: FeatureShapes, capacity: int, shard_videos: int,
           version: int = FORMAT_VERSION) -> dict[str, bytes]:
    """Every metadata object (zarr.json) of a new store, written by zarr into memory (`version` 2: the
    format-2 layout, for tests that check old stores stay readable)."""
    mem = zarr.storage.MemoryStore()
    group = zarr.open_group(mem, mode="w", zarr_format=3)
    for name, (shape, dtype) in array_specs(shapes, attrs["feature_dtype"], version).items():
        small = not is_frame_array(name)
        group.create_array(
            name,
            shape=(capacity, *shape),
            shards=(shard_videos, *shape),
            # Frame arrays: one video per inner chunk, uncompressed, for byte-range reads of frames.
            # Small arrays: the whole shard is one inner chunk (one read gives S values).
            chunks=(inner_chunk_videos(name, shard_videos), *shape),
            dtype=dtype,
            # Format 3: zarr's own crc32c on the small arrays' inner chunks (any Zarr reader verifies them);
            # the frame arrays' chunks stay raw for byte-range reads, their checksums are per frame.
            compressors=[zarr.codecs.Crc32cCodec()] if small and version >= 3 else None,
            fill_value="" if dtype is str else 0,
        )
    # The shapes are the arrays' own: the attributes agree with the arrays by construction.
    group.attrs.update({"format": FORMAT_NAME, "format_version": version, **attrs, **shapes.as_attrs(),
                        "shard_videos": shard_videos})
    return memory_objects(mem)


def memory_objects(mem: zarr.storage.MemoryStore, keys: list[str] | None = None) -> dict[str, bytes]:
    """The bytes of objects of an in-memory zarr store (all of them by default)."""

    async def read() -> dict[str, bytes]:
        names = keys if keys is not None else [key async for key in mem.list()]
        return {key: (await mem.get(key, default_buffer_prototype())).to_bytes() for key in names}

    return sync(read())


def check_layout(path: str | os.PathLike, name: str, arr: zarr.Array, shard_videos: int,
                 version: int = FORMAT_VERSION) -> None:
    """The byte-range reader assumes the layout `schema` writes; refuse anything else."""
    codecs = arr.metadata.codecs
    ok = len(codecs) == 1 and isinstance(codecs[0], zarr.codecs.ShardingCodec)
    if ok:
        sharding = codecs[0]
        inner = [type(c).__name__ for c in sharding.codecs]
        index = [type(c).__name__ for c in sharding.index_codecs]
        checksum = ["Crc32cCodec"] if version >= 3 and not is_frame_array(name) else []
        ok = (
            tuple(arr.shards or ()) == (shard_videos, *arr.shape[1:])
            and tuple(sharding.chunk_shape) == (inner_chunk_videos(name, shard_videos), *arr.shape[1:])
            and inner in (["BytesCodec", *checksum], ["VLenUTF8Codec", *checksum])
            and (inner[0] != "BytesCodec" or getattr(sharding.codecs[0].endian, "value", "little") == "little")
            and index == ["BytesCodec", "Crc32cCodec"]
            and sharding.index_location.value == "end"
            and getattr(arr.metadata.chunk_key_encoding, "separator", None) == "/"
        )
    if not ok:
        raise StoreError(f"{path}: array {name!r} is not laid out as fvlm store format {version} expects")


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one float16 scale per token (last axis is the feature axis)."""
    x = x.astype(np.float32)
    scale = np.abs(x).max(axis=-1) / 127.0
    # Smallest normal float16 as a floor: an all-zero token must not divide by zero.
    scale = np.maximum(scale, np.finfo(np.float16).tiny).astype(np.float16)
    q = np.clip(np.rint(x / scale[..., None].astype(np.float32)), -127, 127).astype(np.int8)
    return q, scale
