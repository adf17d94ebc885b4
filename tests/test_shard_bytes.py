"""The writer builds shard objects itself (store/shard_bytes.py): every object must be the one zarr's own
array write makes of the same values, and zarr-python (and tensorstore, where installed) must read them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from fvlm_data.store import FeatureShapes, shard_states
from fvlm_data.store.checksums import frame_checksums
from fvlm_data.store.format import checksum_array, memory_objects, schema
from fvlm_data.store.objects import LocalObjects
from fvlm_data.store.reader import open_group
from fvlm_data.store.writer import ShardBuffer, StoreWriter

SHAPES = FeatureShapes(3, {"dino": (5, 8), "latents": (4, 2, 2)})


def attrs(feature_dtype: str) -> dict:
    return dict(dino="tiny", vae="tiny", num_frames=3, image_size=28, feature_dtype=feature_dtype)


def zarr_objects(buf: ShardBuffer) -> dict[str, bytes]:
    """What zarr's own array write makes of the buffer's values (the writer's way before it built objects)."""
    store, mem = buf.store, zarr.storage.MemoryStore()
    for name, values in buf.data.items():
        meta = store.arrays[name].metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"]
        sync(mem.set(f"{name}/zarr.json", meta))
        arr = zarr.open_array(mem, path=name, mode="r+").with_config({"write_empty_chunks": True})
        arr[buf.start : buf.stop] = values
    return memory_objects(mem, [store.shard_key(name, buf.shard) for name in buf.data])


def fill(buf: ShardBuffer, rng: np.random.Generator, skip: int | None = None) -> dict[int, dict]:
    """Rows of every slot but `skip`: the second failed, one with several captions (JSON), unicode text."""
    rows = {}
    for slot in range(buf.start, buf.stop):
        if slot == skip:
            continue
        if slot == buf.start + 1:
            buf.add_failure(slot, video_id=f"v{slot}", source=f"/x/{slot}.mp4", reason="broken\nfile")
            continue
        rows[slot] = dict(dino=rng.standard_normal((3, 5, 8)).astype(np.float32),
                          latents=rng.standard_normal((3, 4, 2, 2)).astype(np.float16),
                          timestamps=np.array([0.5, 1.5, 2.5]), duration=3.0)
        caps = ("un chien é", "a dog") if slot == buf.start else (f"caption {slot}",)
        buf.add_row(slot, caption=caps[0], captions=caps, video_id=f"v{slot}", source=f"/x/{slot}.mp4", **rows[slot])
    return rows


def publish_like_zarr(path: Path, buf: ShardBuffer) -> None:
    """Publish, and check each object is what zarr writes of the same values."""
    buf.seal()
    expected = zarr_objects(buf)
    # The frame checksums mean what they meant: crc32c of each stored frame, of zeros for a row without one.
    for name in [n for n in buf.store.frame_arrays() if checksum_array(n) in buf.data]:
        want = np.stack([frame_checksums(frames) for frames in buf.data[name]])
        np.testing.assert_array_equal(buf.data[checksum_array(name)], want)
    buf.publish()
    for key, data in expected.items():
        assert (path / key).read_bytes() == data, key


@pytest.mark.parametrize("feature_dtype", ["float16", "int8"])
def test_shard_objects_are_the_ones_zarr_writes(tmp_path, feature_dtype):
    path = tmp_path / "s.zarr"
    # 10 slots in shards of 4: the last shard is partly past the array's end.
    store = StoreWriter.create_or_open(path, attrs(feature_dtype), SHAPES, capacity=10, shard_videos=4)
    rng, rows = np.random.default_rng(0), {}
    for shard in range(store.num_shard_objects):
        buf = store.shard_buffer(shard)
        rows.update(fill(buf, rng, skip=6))  # slot 6 never written: zeros, not committed
        publish_like_zarr(path, buf)
    z = zarr.open_group(str(path), mode="r")  # zarr-python reads every object back (and checks the crc32c)
    assert z["committed"][:].tolist() == [1, 0, 1, 1, 1, 0, 0, 1, 1, 0]
    assert json.loads(z["captions"][:][0]) == ["un chien é", "a dog"] and z["failure"][:][5] == "broken file"
    np.testing.assert_array_equal(z["latents"][8], rows[8]["latents"])
    if feature_dtype == "float16":
        np.testing.assert_array_equal(z["dino"][2], rows[2]["dino"].astype(np.float16))
    assert all(s.problem is None for s in shard_states(store, [0, 1, 2], verify_data=True).values())
    ts = pytest.importorskip("tensorstore")

    def ts_array(name: str):  # tensorstore reads the numeric arrays (it has no string data type)
        return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}}).result()

    np.testing.assert_array_equal(ts_array("latents")[8].read().result(), rows[8]["latents"])
    np.testing.assert_array_equal(ts_array("committed").read().result(), z["committed"][:])
    np.testing.assert_array_equal(ts_array("dino_crc32c").read().result(), z["dino_crc32c"][:])


def test_a_kept_shard_and_a_format_2_store_are_written_as_zarr_writes_them(tmp_path):
    path = tmp_path / "s.zarr"
    store = StoreWriter.create_or_open(path, attrs("float16"), SHAPES, capacity=4, shard_videos=4)
    rng = np.random.default_rng(1)
    buf = store.shard_buffer(0)
    fill(buf, rng, skip=3)
    buf.publish()
    again = store.shard_buffer(0, keep_existing=True)  # a grown store's shard: its rows kept, one added
    fill_one = dict(dino=rng.standard_normal((3, 5, 8)), latents=rng.standard_normal((3, 4, 2, 2)),
                    timestamps=np.array([0.5, 1.5, 2.5]), duration=3.0)
    again.add_row(3, caption="c", video_id="v3", source="/x/3.mp4", **fill_one)
    publish_like_zarr(path, again)
    old = tmp_path / "old.zarr"  # format 2: no checksum arrays, no crc32c codec on the small arrays
    for key, data in schema(attrs("float16"), SHAPES, capacity=4, shard_videos=4, version=2).items():
        (old / key).parent.mkdir(parents=True, exist_ok=True)
        (old / key).write_bytes(data)
    objects = LocalObjects(old)
    buf = StoreWriter(old, objects, open_group(old, objects, mode="r+")).shard_buffer(0)
    fill(buf, rng)
    publish_like_zarr(old, buf)
