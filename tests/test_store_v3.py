"""Store format 3: the caption table, checksums verified on every read, identity and input fingerprint,
attributes checked against the arrays on open, and format-2 stores (the old layout) still read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from fvlm_data import FeatureStore, StoreError
from fvlm_data.store import FeatureShapes, shard_states
from fvlm_data.store.creation import inputs_fingerprint
from fvlm_data.store.format import schema
from fvlm_data.store.objects import LocalObjects
from fvlm_data.store.reader import open_group
from fvlm_data.store.writer import StoreWriter

SHAPES = FeatureShapes(num_frames=6, dino_tokens=5, dino_dim=8, latent_shape=(4, 2, 2))
ATTRS = dict(dino="tiny", vae="tiny", num_frames=6, image_size=28, feature_dtype="float16")
CAPTIONS = {1: ("a dog runs", "a brown dog running", "dog"), 5: ("two cats",)}


def row(rng: np.random.Generator) -> dict:
    return dict(dino=rng.standard_normal((6, 5, 8)).astype(np.float16),
                latents=rng.standard_normal((6, 4, 2, 2)).astype(np.float16),
                timestamps=np.linspace(0.5, 5.5, 6), duration=6.0)


def fill(store: FeatureStore, seed: int = 0) -> dict[int, dict]:
    """Every slot: slot 3 failed, slot 1 with three captions cut from file 'f1', the rest one caption."""
    rng, rows = np.random.default_rng(seed), {}
    for shard in range(store.num_shard_objects):
        buf = store.shard_buffer(shard)
        for slot in range(buf.start, buf.stop):
            if slot == 3:
                buf.add_failure(slot, video_id="v3", source="/x/3.mp4", reason="broken", file_id="f3")
                continue
            rows[slot] = row(rng)
            caps = CAPTIONS.get(slot, (f"caption {slot}",))
            buf.add_row(slot, caption=caps[0], captions=caps, video_id=f"v{slot}", source=f"/x/{slot}.mp4",
                        file_id="f1" if slot == 1 else None, **rows[slot])
        buf.publish()
    return rows


@pytest.fixture
def store_path(tmp_path) -> Path:
    path = tmp_path / "s.zarr"
    fill(StoreWriter.create_or_open(path, ATTRS, SHAPES, capacity=8, shard_videos=4))
    return path


def format_2_store(path: Path) -> FeatureStore:
    """A store in the format-2 layout (no caption table, no checksums), written by today's writer."""
    for key, data in schema(ATTRS, SHAPES, capacity=8, shard_videos=4, version=2).items():
        (path / key).parent.mkdir(parents=True, exist_ok=True)
        (path / key).write_bytes(data)
    objects = LocalObjects(path)
    return StoreWriter(path, objects, open_group(path, objects, mode="r+"))


def test_caption_table_and_file_ids(store_path):
    store = FeatureStore.open(store_path)
    assert store.has_checksums and store.attrs["format_version"] == 3 and len(store.attrs["store_id"]) == 32
    assert store.read_slot(1)["captions"] == list(CAPTIONS[1]) and store.read_slot(1)["caption"] == "a dog runs"
    assert store.read_slot(5)["captions"] == ["two cats"] and store.read_slot(0)["captions"] == ["caption 0"]
    assert store.captions([0, 1, 5]) == [["caption 0"], list(CAPTIONS[1]), ["two cats"]]
    assert store.file_ids() == ["v0", "f1", "v2", "v4", "v5", "v6", "v7"]  # committed slots
    assert store.file_ids([3, 1]) == ["f3", "f1"]
    z = zarr.open_group(str(store_path), mode="r")  # plain zarr reads (and verifies) the small arrays
    assert z["captions"][:].tolist()[:2] == ["", json.dumps(list(CAPTIONS[1]))]  # one caption costs ""
    assert z["dino_crc32c"].shape == (8, 6) and z["dino_crc32c"].dtype == np.uint32
    assert inner_codecs(store_path, "caption") == ["vlen-utf8", "crc32c"]
    assert inner_codecs(store_path, "committed") == ["bytes", "crc32c"]
    assert inner_codecs(store_path, "dino") == ["bytes"]
    buf = StoreWriter.create_or_open(store_path, ATTRS, SHAPES, 8).shard_buffer(0)
    with pytest.raises(ValueError, match="captions\\[0\\] must be the caption"):
        buf.add_row(0, caption="x", captions=("y", "x"), video_id="v0", source="s", **row(np.random.default_rng()))


def inner_codecs(path: Path, name: str) -> list[str]:
    meta = json.loads((path / name / "zarr.json").read_text())
    return [c["name"] for c in meta["codecs"][0]["configuration"]["codecs"]]


def test_format_2_store_stays_readable_and_writable(tmp_path):
    path = tmp_path / "old.zarr"
    rows = fill(format_2_store(path))
    assert inner_codecs(path, "caption") == ["vlen-utf8"]  # the format-2 layout
    assert not (path / "captions").exists() and not (path / "dino_crc32c").exists()
    store = FeatureStore.open(path)
    assert store.attrs["format_version"] == 2 and not store.has_checksums and store.attrs.get("store_id") is None
    got = store.read_slot(1, frames=np.array([0, 4]))
    np.testing.assert_array_equal(got["dino"], rows[1]["dino"][[0, 4]])
    assert got["captions"] == ["a dog runs"]  # format 2 keeps the first caption only
    assert store.captions([1, 2]) == [["a dog runs"], ["caption 2"]]
    assert store.file_ids() == [f"v{i}" for i in (0, 1, 2, 4, 5, 6, 7)]
    assert all(s.problem is None for s in shard_states(store, [0, 1], verify_data=True).values())


def damage(path: Path, key: str, where: str | int) -> None:
    """Flip 8 bytes of an object: at its start, in its middle, or at a byte offset."""
    f = path / key
    data = bytearray(f.read_bytes())
    pos = {"start": 0, "middle": len(data) // 2}.get(where, where)
    data[pos : pos + 8] = bytes(b ^ 0x5A for b in data[pos : pos + 8])
    f.write_bytes(bytes(data))


def test_damaged_frames_fail_their_checksum_only_where_read(store_path):
    from fvlm_data.store.shard_index import ShardIndex

    data = (store_path / "dino/c/1/0/0/0").read_bytes()
    index = ShardIndex.parse(data, len(data), 4, "dino shard 1")
    damage(store_path, "dino/c/1/0/0/0", index.offset(1) + 2 * 5 * 8 * 2 + 10)  # slot 5 (shard 1's second), frame 2
    store = FeatureStore.open(store_path)
    damaged = next(t for t in range(6) if _frame_fails(store, 5, t))
    assert damaged == 2
    with pytest.raises(StoreError, match=r"shard 1 of 'dino' \(dino/c/1/0/0/0\), slot 5: frame \d fails its "
                                         r"crc32c checksum.*re-run precompute") as e:
        store.read_slot(5)
    assert "\n" not in str(e.value)
    others = np.array([t for t in range(6) if t != damaged])
    assert store.read_slot(5, frames=others)["dino"].shape == (5, 5, 8)  # the other frames verify
    assert store.read_slot(4)["dino"].shape == (6, 5, 8)
    states = shard_states(store, [0, 1], verify_data=True)
    assert states[0].problem is None and "slot 5: frame" in states[1].problem
    assert shard_states(store, [1])[1].problem is None  # the index alone cannot see it


def _frame_fails(store: FeatureStore, slot: int, t: int) -> bool:
    try:
        store.read_slot(slot, frames=np.array([t]))
    except StoreError:
        return True
    return False


@pytest.mark.parametrize("where", ["start", "middle"])
def test_damaged_caption_shard_fails_its_checksum_before_decoding(store_path, where):
    damage(store_path, "caption/c/1", where)
    store = FeatureStore.open(store_path)
    with pytest.raises(StoreError, match=r"shard 1 of 'caption' \(caption/c/1\) fails its crc32c checksum"):
        store.read_slot(5)
    with pytest.raises(ValueError, match="checksum"):  # zarr-python verifies the same codec
        zarr.open_group(str(store_path), mode="r")["caption"][5]
    assert store.read_slot(0)["caption"] == "caption 0"
    assert "fails its crc32c" in shard_states(store, [1], verify_data=True)[1].problem


@pytest.mark.parametrize("where", ["start", "middle"])
def test_damaged_caption_shard_of_a_format_2_store_is_one_line(tmp_path, where):
    path = tmp_path / "old.zarr"
    fill(format_2_store(path))
    damage(path, "caption/c/1", where)
    store = FeatureStore.open(path)
    with pytest.raises(StoreError, match=r"shard 1 of 'caption' .* cannot be decoded"):
        store.read_slot(5)


def edit(path: Path, key: str, change) -> None:
    meta_path = path / key
    meta = json.loads(meta_path.read_text())
    change(meta)
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("change,message", [
    (lambda m: m["attributes"].update(num_frames=4), "attribute num_frames=4 but array 'dino' says 6"),
    (lambda m: m["attributes"].update(num_frames=8), "attribute num_frames=8 but array 'dino' says 6"),
    (lambda m: m["attributes"].update(latent_shape=[4, 4, 1]),
     r"attribute latent_shape=\[4, 4, 1\] but array 'latents' says \[4, 2, 2\]"),
    (lambda m: m["attributes"].pop("num_frames"), "attribute 'num_frames' is missing"),
    (lambda m: m["attributes"].pop("shard_videos"), "attribute 'shard_videos' is missing"),
    (lambda m: m["attributes"].update(shard_videos=2), "attribute shard_videos=2 but array '.*' has shards of 4"),
    (lambda m: m["attributes"].update(feature_dtype="int8"), "attribute feature_dtype='int8' but array 'dino' says"),
    (lambda m: m["attributes"].update(dino_dim=16), "attribute dino_dim=16 but array 'dino' says 8"),
])
def test_attributes_disagreeing_with_the_arrays_are_refused_on_open(store_path, change, message):
    edit(store_path, "zarr.json", change)
    with pytest.raises(StoreError, match=message) as e:
        FeatureStore.open(store_path)
    assert "\n" not in str(e.value) and "zarr.json was edited or damaged" in str(e.value)


def test_another_committed_dtype_is_refused_on_open(store_path):
    assert len(FeatureStore.open(store_path)) == 7
    edit(store_path, "committed/zarr.json", lambda m: m.update(data_type="uint16"))
    with pytest.raises(StoreError, match=r"array 'committed' is uint16 \[\] per slot, format 3 says uint8 \[\]"):
        FeatureStore.open(store_path)


def keys(seed: int, n: int) -> list[tuple[str, str]]:
    return [(f"video-{seed}-{i}", f"/data/{seed}/{i}.mp4") for i in range(n)]


def test_input_fingerprint_refuses_other_inputs_and_grows_with_a_longer_list(tmp_path):
    path = tmp_path / "s.zarr"
    store = StoreWriter.create_or_open(path, ATTRS, SHAPES, capacity=4, shard_videos=2, inputs=keys(0, 4))
    store_id = store.attrs["store_id"]
    assert store.attrs["inputs"] == inputs_fingerprint(keys(0, 4)) and store.attrs["inputs"]["count"] == 4
    before = sorted(p.name for p in path.rglob("*"))
    with pytest.raises(StoreError, match="another input list.*the input list changed; use a new --out"):
        StoreWriter.create_or_open(path, ATTRS, SHAPES, capacity=4, inputs=keys(1, 4))
    with pytest.raises(StoreError, match="made from 4 inputs and this run lists 3"):
        StoreWriter.create_or_open(path, ATTRS, SHAPES, capacity=3, inputs=keys(0, 3))
    with pytest.raises(StoreError, match="another input list"):  # longer, but its first 4 differ
        StoreWriter.create_or_open(path, ATTRS, SHAPES, capacity=6, inputs=keys(1, 6))
    assert sorted(p.name for p in path.rglob("*")) == before and FeatureStore.open(path).capacity == 4
    grown = StoreWriter.create_or_open(path, ATTRS, SHAPES, capacity=6, inputs=keys(0, 4) + keys(9, 2))
    assert grown.capacity == 6 and grown.attrs["store_id"] == store_id
    assert grown.attrs["inputs"] == inputs_fingerprint(keys(0, 4) + keys(9, 2))
    StoreWriter.create_or_open(path, ATTRS, SHAPES, capacity=6, inputs=keys(0, 4) + keys(9, 2))  # same: fine


def test_of_writers_creating_one_store_at_once_exactly_one_wins(tmp_path):
    """Eight creators of other inputs at the same moment (a barrier): one store, one winner, seven refusals."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    path, start = tmp_path / "s.zarr", threading.Barrier(8)

    def create(seed: int) -> str:
        start.wait()
        try:
            StoreWriter.create_or_open(path, ATTRS, SHAPES, capacity=4, shard_videos=2, inputs=keys(seed, 4))
        except StoreError as e:
            assert "another input list" in str(e)
            return "refused"
        return "created"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(create, range(8)))
    assert sorted(results) == ["created"] + ["refused"] * 7
    winner = results.index("created")
    assert FeatureStore.open(path).attrs["inputs"] == inputs_fingerprint(keys(winner, 4))
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]  # no temporary folder left behind
