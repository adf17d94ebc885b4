"""The Zarr feature store: layout, commit marker, refusal of foreign/newer/incompatible stores."""

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from fvlm_data import FeatureStore, StoreError
from fvlm_data.store import FORMAT_VERSION, FeatureShapes, quantize_int8
from fvlm_data.store.writer import StoreWriter
from tests.helpers.store_helpers import duration, shard_problem, slot_state, write_failure, write_row

SHAPES = FeatureShapes(6, {"dino": (5, 8), "latents": (4, 2, 2)})


def attrs(**over):
    base = dict(dino="tiny", vae="tiny", num_frames=6, image_size=28, feature_dtype="float16")
    return {**base, **over}


def make_row(rng, shapes=SHAPES):
    t = shapes.num_frames
    return dict(
        dino=rng.standard_normal((t, *shapes.per_frame["dino"])).astype(np.float16),
        latents=rng.standard_normal((t, *shapes.per_frame["latents"])).astype(np.float16),
        timestamps=np.linspace(0.5, 5.5, t),
        duration=6.0,
    )


def test_rows_visible_only_after_commit_and_frames_read_exactly(tmp_path):
    rng = np.random.default_rng(0)
    store = StoreWriter.create_or_open(tmp_path / "s.zarr", attrs(), SHAPES, capacity=4)
    rows = {slot: make_row(rng) for slot in (0, 2)}
    for slot, row in rows.items():
        write_row(store, slot, caption=f"caption {slot}", video_id=f"v{slot}", source=f"/x/{slot}.mp4", **row)
    reader = FeatureStore.open(tmp_path / "s.zarr")
    assert len(reader) == 2
    assert reader.attrs["format"] == "fvlm-features" and reader.attrs["num_frames"] == 6
    got = reader.read(1, frames=[0, 3, 5])
    assert got["caption"] == "caption 2" and got["video_id"] == "v2"
    assert got["dino"].dtype == np.float16 and got["dino"].shape == (3, 5, 8)
    np.testing.assert_array_equal(got["dino"], rows[2]["dino"][[0, 3, 5]])
    np.testing.assert_array_equal(got["latents"], rows[2]["latents"][[0, 3, 5]])
    np.testing.assert_allclose(got["timestamps"], rows[2]["timestamps"][[0, 3, 5]], rtol=1e-6)
    full = reader.read(0)
    np.testing.assert_array_equal(full["dino"], rows[0]["dino"])
    # The pread fast path returns exactly what zarr's own reader returns.
    z = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    np.testing.assert_array_equal(z["dino"][2][[0, 3, 5]], got["dino"])
    assert z["caption"][2] == "caption 2"
    with pytest.raises(IndexError):
        reader.read(2)
    with pytest.raises(IndexError):
        reader.read(0, frames=[6])


def test_half_written_row_is_invisible(tmp_path):
    """A crash after the arrays but before the commit marker leaves no visible row."""
    rng = np.random.default_rng(1)
    store = StoreWriter.create_or_open(tmp_path / "s.zarr", attrs(), SHAPES, capacity=2)
    row = make_row(rng)
    z = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    z["dino"][1] = row["dino"]
    z["caption"][1] = "half written"
    assert len(FeatureStore.open(tmp_path / "s.zarr")) == 0
    assert slot_state(store, 1) == "empty"
    write_row(store, 1, caption="done", video_id="v1", source="s", **row)
    assert len(FeatureStore.open(tmp_path / "s.zarr")) == 1


def test_failures_are_recorded_with_source_and_reason(tmp_path):
    store = StoreWriter.create_or_open(tmp_path / "s.zarr", attrs(), SHAPES, capacity=3)
    write_failure(store, 1, video_id="bad", source="/videos/bad.mp4", reason="not a video: invalid data")
    reader = FeatureStore.open(tmp_path / "s.zarr")
    assert len(reader) == 0
    assert reader.failures == [{"slot": 1, "source": "/videos/bad.mp4", "video_id": "bad",
                                "reason": "not a video: invalid data"}]
    assert slot_state(store, 1) == "failed"


def test_refuses_foreign_newer_and_missing_stores(tmp_path):
    with pytest.raises(StoreError, match="no store"):
        FeatureStore.open(tmp_path / "missing.zarr")
    foreign = zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w")
    foreign.attrs["hello"] = "world"
    with pytest.raises(StoreError, match="not an fvlm feature store"):
        FeatureStore.open(tmp_path / "foreign.zarr")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file.txt").write_text("x")
    with pytest.raises(StoreError):
        FeatureStore.open(tmp_path / "plain")
    StoreWriter.create_or_open(tmp_path / "s.zarr", attrs(), SHAPES, capacity=1)
    meta_path = Path(tmp_path / "s.zarr" / "zarr.json")
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["format_version"] = FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="upgrade fvlm"):
        FeatureStore.open(tmp_path / "s.zarr")


@pytest.mark.parametrize("key,value", [("dino", "facebook/dinov2-small"), ("num_frames", 8),
                                       ("image_size", 64), ("feature_dtype", "int8")])
def test_refuses_to_mix_encoders_or_sizes(tmp_path, key, value):
    StoreWriter.create_or_open(tmp_path / "s.zarr", attrs(), SHAPES, capacity=2)
    with pytest.raises(StoreError, match=f"made with {key}="):
        StoreWriter.create_or_open(tmp_path / "s.zarr", attrs(**{key: value}), SHAPES, capacity=2)


def test_grows_for_more_inputs_and_keeps_rows(tmp_path):
    """The old last shard (slots 2..3, only 2 in bounds) gains a slot and keeps its row."""
    rng = np.random.default_rng(2)
    store = StoreWriter.create_or_open(tmp_path / "s.zarr", attrs(), SHAPES, capacity=3, shard_videos=2)
    row = make_row(rng)
    write_row(store, 2, caption="c", video_id="v2", source="s", **row)
    bigger = StoreWriter.create_or_open(tmp_path / "s.zarr", attrs(), SHAPES, capacity=5)
    assert bigger.capacity == 5 and bigger.shard_videos == 2
    assert shard_problem(bigger, 1) is None and slot_state(bigger, 3) == "empty"
    write_row(bigger, 3, caption="d", video_id="v3", source="s", **make_row(rng))
    write_row(bigger, 4, caption="e", video_id="v4", source="s", **make_row(rng))
    reader = FeatureStore.open(tmp_path / "s.zarr")
    assert reader.committed_slots().tolist() == [2, 3, 4]
    np.testing.assert_array_equal(reader.read(0)["dino"], row["dino"])
    with pytest.raises(StoreError, match="shard_videos=2"):
        StoreWriter.create_or_open(tmp_path / "s.zarr", attrs(), SHAPES, capacity=5, shard_videos=4)


def test_int8_storage_halves_bytes_and_keeps_values_close(tmp_path):
    rng = np.random.default_rng(3)
    shapes = FeatureShapes(4, {"dino": (7, 64), "latents": (4, 2, 2)})
    store = StoreWriter.create_or_open(tmp_path / "q.zarr", attrs(num_frames=4, feature_dtype="int8"),
                                        shapes, capacity=1)
    row = make_row(rng, shapes)
    write_row(store, 0, caption="c", video_id="v", source="s", **row)
    got = FeatureStore.open(tmp_path / "q.zarr").read(0, frames=[1, 2])
    assert got["dino"].dtype == np.int8 and got["dino_scale"].shape == (2, 7)
    restored = got["dino"].astype(np.float32) * got["dino_scale"].astype(np.float32)[..., None]
    ref = row["dino"][[1, 2]].astype(np.float32)
    assert np.abs(restored - ref).max() <= np.abs(ref).max(axis=-1, keepdims=True).max() / 127 * 0.51 + 1e-3
    q, scale = quantize_int8(np.zeros((2, 3), np.float32))  # all-zero tokens must not divide by zero
    assert np.all(q == 0) and np.all(np.isfinite(scale.astype(np.float32)))


def write_shard(store, shard, rng, fail=()):
    buf = store.shard_buffer(shard)
    rows = {}
    for slot in range(buf.start, buf.stop):
        if slot in fail:
            buf.add_failure(slot, video_id=f"v{slot}", source=f"/x/{slot}.mp4", reason="broken")
        else:
            rows[slot] = make_row(rng)
            buf.add_row(slot, caption=f"caption {slot}", video_id=f"v{slot}", source=f"/x/{slot}.mp4", **rows[slot])
    buf.publish()
    return rows


def test_sharded_layout_few_objects_and_zarr_reads_the_same(tmp_path):
    """Format 3: one object per array per shard of 4 slots, readable by zarr-python itself."""
    rng = np.random.default_rng(4)
    store = StoreWriter.create_or_open(tmp_path / "s.zarr", attrs(), SHAPES, capacity=10, shard_videos=4)
    assert (store.attrs["format_version"], store.attrs["shard_videos"]) == (3, 4)
    rows = {}
    for shard in range(3):  # the last shard holds slots 8 and 9 only
        rows.update(write_shard(store, shard, rng, fail={5}))
    for name in ("dino", "latents", "timestamps", "duration", "caption", "video_id", "source", "failure", "committed"):
        objects = [f for f in (tmp_path / "s.zarr" / name / "c").rglob("*") if f.is_file()]
        assert len(objects) == 3, name
    reader = FeatureStore.open(tmp_path / "s.zarr")
    assert reader.committed_slots().tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert reader.failures == [{"slot": 5, "source": "/x/5.mp4", "video_id": "v5", "reason": "broken"}]
    z = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert z["video_id"][:].tolist() == [f"v{i}" for i in range(10)]
    assert z["committed"][:].tolist() == [1, 1, 1, 1, 1, 0, 1, 1, 1, 1]
    got = reader.read_slots([9, 0, 6], [np.array([1, 2, 4]), None, np.array([5])])
    for row, slot, frames in zip(got, [9, 0, 6], [[1, 2, 4], list(range(6)), [5]], strict=True):
        np.testing.assert_array_equal(row["dino"], z["dino"][slot][frames])
        np.testing.assert_array_equal(row["dino"], rows[slot]["dino"][frames])
        np.testing.assert_array_equal(row["latents"], z["latents"][slot][frames])
        assert row["caption"] == z["caption"][slot] == f"caption {slot}"
    assert duration(reader, 0) == 6.0 and slot_state(reader, 5) == "failed" and slot_state(reader, 4) == "committed"


def test_unpublished_shard_is_invisible(tmp_path):
    rng = np.random.default_rng(5)
    store = StoreWriter.create_or_open(tmp_path / "s.zarr", attrs(), SHAPES, capacity=8, shard_videos=4)
    buf = store.shard_buffer(1)
    buf.add_row(4, caption="c", video_id="v4", source="s", **make_row(rng))
    assert not buf.complete() and buf.complete(until=5)
    assert len(FeatureStore.open(tmp_path / "s.zarr")) == 0  # buffered rows are not in the store
    buf.publish()
    assert FeatureStore.open(tmp_path / "s.zarr").committed_slots().tolist() == [4]


@pytest.mark.parametrize("damage", ["truncate", "flip_index", "remove"])
def test_damaged_shard_is_a_one_line_error_naming_it(tmp_path, damage):
    rng = np.random.default_rng(6)
    store = StoreWriter.create_or_open(tmp_path / "s.zarr", attrs(), SHAPES, capacity=8, shard_videos=4)
    for shard in range(2):
        write_shard(store, shard, rng)
    victim = tmp_path / "s.zarr" / "latents" / "c" / "1" / "0" / "0" / "0" / "0"
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(data[: len(data) - 100])
    elif damage == "flip_index":
        data[-10] ^= 0xFF
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
    reader = FeatureStore.open(tmp_path / "s.zarr")
    np.testing.assert_array_equal(reader.read(0)["latents"].shape, (6, 4, 2, 2))  # shard 0 is intact
    with pytest.raises(StoreError, match=r"shard 1 of 'latents' \(latents/c/1/0/0/0/0\)") as e:
        reader.read(5)
    assert "\n" not in str(e.value) and "re-run precompute" in str(e.value)
    assert shard_problem(reader, 0) is None
    assert "shard 1 of 'latents'" in shard_problem(reader, 1)


def test_refuses_format_1_stores_with_what_to_do(tmp_path):
    StoreWriter.create_or_open(tmp_path / "s.zarr", attrs(), SHAPES, capacity=1)
    meta_path = Path(tmp_path / "s.zarr" / "zarr.json")
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["format_version"] = 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="format-1 store.*re-run precompute into a new --out"):
        FeatureStore.open(tmp_path / "s.zarr")


def test_shard_index_reads_what_zarr_writes_and_refuses_damage(tmp_path):
    """The index at the end of a shard object, as zarr's sharding codec writes it."""
    from fvlm_data.store.shard_index import ShardIndex

    rng = np.random.default_rng(7)
    store = StoreWriter.create_or_open(tmp_path / "s.zarr", attrs(), SHAPES, capacity=3, shard_videos=4)
    rows = write_shard(store, 0, rng, fail={1})
    data = (tmp_path / "s.zarr" / "dino" / "c" / "0" / "0" / "0" / "0").read_bytes()
    index = ShardIndex.parse(data[-ShardIndex.nbytes(4):], len(data), 4, "dino shard 0")
    frame_bytes = rows[0]["dino"][0].nbytes
    assert not index.is_empty(0) and index.chunk_nbytes(0) == 6 * frame_bytes
    assert index.is_empty(3)  # slot 3 is beyond the capacity: never written
    assert np.frombuffer(index.chunk(data, 2), np.float16).tolist() == rows[2]["dino"].reshape(-1).tolist()
    assert index.frame_ranges(2, np.array([0, 1, 2, 4, 5]), frame_bytes) == [
        (index.offset(2), 0, 3), (index.offset(2) + 4 * frame_bytes, 3, 5)]
    with pytest.raises(StoreError, match="dino shard 0 fails its index checksum"):
        ShardIndex.parse(data[:-1] + bytes([data[-1] ^ 1]), len(data), 4, "dino shard 0")
    with pytest.raises(StoreError, match=r"dino shard 0 is truncated \(10 bytes\)"):
        ShardIndex.parse(data[-10:], 10, 4, "dino shard 0")
