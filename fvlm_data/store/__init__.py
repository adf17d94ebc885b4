"""The feature store: one Zarr v3 group per dataset, one row (slot) per input video.

Layout (V slots, T frames, N DINO tokens of width D, VAE latents C x h x w):

    zarr.json      group attributes: format, version, shard_videos, encoders, sizes, dtypes, precompute args
    dino           [V, T, N, D] float16 (or int8, with dino_scale [V, T, N] float16 per token)
    latents        [V, T, C, h, w] float16
    timestamps     [V, T] float32, seconds of each sampled frame
    duration       [V] float32, seconds
    caption, video_id, source, failure   [V] strings
    captions, file_id                    [V] strings (format 3): the caption table, the file of each row
    <frame array>_crc32c                 [V, T] uint32 (format 3): crc32c of each frame
    committed      [V] uint8, written last: a shard's rows exist for readers once its object exists

Every array uses Zarr v3's sharding codec with S = attrs["shard_videos"] consecutive slots per
shard object (index at the end, crc32c-checked). Inside `dino`, `dino_scale`, `latents` and
`timestamps` shards the inner chunk is one video, uncompressed, so a reader fetches just the
frames it needs by byte ranges computed from the shard index; the small per-video arrays keep a
shard as one inner chunk (format 3: with zarr's crc32c codec). A store holds one object per array
per shard, plus a zarr.json per array and the group's (and locally a `.tmp` folder for objects being
written, each renamed into place whole). Format 3 adds the caption table, the
checksums and the attributes `store_id` and `inputs`; format-2 stores stay readable.

Modules, one job each: `format` (what a store holds and which attributes must agree),
`consistency` (attributes checked against the arrays on open), `checksums` (computing and checking
them), `creation` (identity, input fingerprint, exclusive creation), `shard_index` (zarr's shard
index as a value), `shards` (shard objects: keys, indexes, small arrays' values), `reader` (the
read-only `FeatureStore`), `writer` (creating and growing a store, shard states, whole-shard
publishing). Byte access to objects, local or remote, is `fvlm_data.store.objects`.
"""

from fvlm_data.errors import StoreError
from fvlm_data.store.format import (
    COMPATIBILITY_KEYS,
    DEFAULT_SHARD_VIDEOS,
    FEATURE_KEYS,
    FORMAT_NAME,
    FORMAT_VERSION,
    FRAME_TABLE,
    SHAPE_KEYS,
    STRING_ARRAYS,
    FeatureRecipe,
    FeatureShapes,
    FrameArray,
    check_compatible,
    quantize_int8,
)
from fvlm_data.store.reader import FeatureStore
from fvlm_data.store.writer import ShardBuffer, ShardState, StoreWriter, shard_states

__all__ = [
    "COMPATIBILITY_KEYS", "DEFAULT_SHARD_VIDEOS", "FEATURE_KEYS", "FORMAT_NAME", "FORMAT_VERSION", "FRAME_TABLE",
    "SHAPE_KEYS", "STRING_ARRAYS", "FeatureRecipe", "FeatureShapes", "FeatureStore", "FrameArray", "ShardBuffer",
    "ShardState", "StoreError", "StoreWriter", "check_compatible", "quantize_int8", "shard_states",
]
