"""The group's attributes checked against its arrays' metadata when a store is opened.

Readers trust the attributes (frames, shapes, dtypes, shard size); a `zarr.json` edited by hand
or damaged would otherwise read the wrong frames silently or fail later with a traceback. Every
attribute a reader uses must agree with what the arrays' own metadata says, or the store is
refused in one line naming the attribute and both values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from fvlm_data.errors import StoreError
from fvlm_data.store.format import BLOCK_STATES, FeatureShapes, array_specs

# {"from": n, "to": m} while a grow is under way (`writer._grow`): the store is its n slots until the grow ends.
GROW_KEY = "growing"
REQUIRED = ("shard_videos", "num_frames", "dino_tokens", "dino_dim", "latent_shape", "feature_dtype")
_FIX = "the store's zarr.json was edited or damaged"


def _dtype_name(arr: zarr.Array) -> str:
    return "str" if getattr(arr.dtype, "kind", "") in ("T", "U", "O") else str(np.dtype(arr.dtype))


class UnevenArrays(StoreError):
    """The arrays have different slot counts and nothing says why (a reader raced a grow: open again)."""


def slot_count(path: str | os.PathLike, attrs: Mapping[str, Any], arrays: Mapping[str, zarr.Array]) -> int:
    """The store's slots. A grow resizes the arrays one metadata write at a time, after recording
    `growing` = {"from": n, ...} in the attributes: until it ends (or if it was killed) the store is its n
    slots, which every array has. A grow by an older fvlm (no `growing`) that was killed part-way left the
    input fingerprint's count at the old length: every array has at least that many slots, the store is those."""
    lengths = {name: int(arr.shape[0]) for name, arr in arrays.items()}
    low = min(lengths.values())
    growing = attrs.get(GROW_KEY)
    if growing is not None:
        start = growing.get("from") if isinstance(growing, dict) else None
        if not isinstance(start, int) or start < 0 or low < start:
            raise StoreError(f"{path}: attribute {GROW_KEY}={growing!r} but an array has {low} slots: {_FIX}")
        return start
    count = attrs.get("inputs", {}).get("count") if isinstance(attrs.get("inputs"), dict) else None
    if len(set(lengths.values())) == 1 or count == low:
        return low
    name = next(n for n, length in lengths.items() if length != lengths["committed"])
    raise UnevenArrays(f"{path}: array {name!r} has {lengths[name]} slots but 'committed' has "
                       f"{lengths['committed']}: {_FIX}")


def check_attrs_match_arrays(path: str | os.PathLike, attrs: Mapping[str, Any], arrays: Mapping[str, zarr.Array],
                             version: int) -> int:
    """Refuse a store whose attributes disagree with its arrays (see the module docstring); its slot count."""

    def refuse(what: str) -> None:
        raise StoreError(f"{path}: {what}: {_FIX}")

    for key in REQUIRED:
        if key not in attrs:
            refuse(f"attribute {key!r} is missing")
    ints = ("shard_videos", "num_frames", "dino_tokens", "dino_dim")
    for key in ints:
        if not isinstance(attrs[key], int) or attrs[key] < 1:
            refuse(f"attribute {key}={attrs[key]!r} is not a positive integer")
    latent = attrs["latent_shape"]
    if not (isinstance(latent, list) and len(latent) == 3 and all(isinstance(x, int) for x in latent)):
        refuse(f"attribute latent_shape={latent!r} is not three integers")
    if attrs["feature_dtype"] not in ("float16", "int8"):
        refuse(f"attribute feature_dtype={attrs['feature_dtype']!r} is neither 'float16' nor 'int8'")
    for name in ("dino", "latents", "committed"):
        if name not in arrays:
            refuse(f"array {name!r} is missing")
    dino, latents = arrays["dino"], arrays["latents"]
    said = [  # (attribute, its value, what the arrays say, which array says it)
        ("num_frames", attrs["num_frames"], dino.shape[1] if dino.ndim == 4 else None, "dino"),
        ("dino_tokens", attrs["dino_tokens"], dino.shape[2] if dino.ndim == 4 else None, "dino"),
        ("dino_dim", attrs["dino_dim"], dino.shape[3] if dino.ndim == 4 else None, "dino"),
        ("latent_shape", latent, list(latents.shape[2:]), "latents"),
        ("feature_dtype", attrs["feature_dtype"], _dtype_name(dino), "dino"),
    ]
    if "latent_dtype" in attrs:
        said.append(("latent_dtype", attrs["latent_dtype"], _dtype_name(latents), "latents"))
    for key, value, actual, name in said:
        if value != actual:
            refuse(f"attribute {key}={value!r} but array {name!r} says {actual!r}")
    for name, arr in arrays.items():
        shard = (arr.shards or (None,))[0]
        if shard != attrs["shard_videos"]:
            refuse(f"attribute shard_videos={attrs['shard_videos']!r} but array {name!r} has shards of {shard!r} slots")
    recorded = attrs.get("feature_shapes", {})
    if not (isinstance(recorded, dict) and all(isinstance(shape, list) and all(isinstance(x, int) for x in shape)
                                               for shape in recorded.values())):
        refuse(f"attribute feature_shapes={recorded!r} is not a shape (a list of integers) per feature")
    shapes = FeatureShapes.from_attrs(attrs)
    try:
        specs = array_specs(shapes, attrs["feature_dtype"], version)
    except StoreError as e:
        refuse(str(e))
    blocks = sorted(int(n.removeprefix(BLOCK_STATES)) for n in shapes.per_frame if n.startswith(BLOCK_STATES))
    if blocks != list(attrs.get("dino_blocks", [])) or attrs.get("dino_layers", 0) != len(blocks):
        refuse(f"attributes dino_layers={attrs.get('dino_layers', 0)!r}, dino_blocks={attrs.get('dino_blocks', [])!r} "
               f"but feature_shapes has the states of blocks {blocks}")
    for name, (shape, dtype) in specs.items():
        if name not in arrays:
            refuse(f"array {name!r} is missing")
        arr = arrays[name]
        want = "str" if dtype is str else str(np.dtype(dtype))
        if (tuple(arr.shape[1:]), _dtype_name(arr)) != (shape, want):
            refuse(f"array {name!r} is {_dtype_name(arr)} {list(arr.shape[1:])} per slot, format {version} says "
                   f"{want} {list(shape)}")
    return slot_count(path, attrs, arrays)
