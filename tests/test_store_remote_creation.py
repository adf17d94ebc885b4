"""Exclusive creation and the input fingerprint on the test S3 server (moto in server mode)."""

from __future__ import annotations

import json

import pytest

from fvlm_data import StoreError
from fvlm_data.store import FeatureShapes, creation, writer
from fvlm_data.store.creation import CLAIM_KEY, inputs_fingerprint
from fvlm_data.store.objects import RemoteObjects
from fvlm_data.store.writer import StoreWriter

pytestmark = pytest.mark.slow  # the S3 server

SHAPES = FeatureShapes(4, {"dino": (5, 8), "latents": (4, 2, 2)})
ATTRS = dict(dino="tiny", vae="tiny", num_frames=4, image_size=28, feature_dtype="float16")


def keys(seed: int, n: int = 4) -> list[tuple[str, str]]:
    return [(f"video-{seed}-{i}", f"/data/{i}.mp4") for i in range(n)]


def listing(url: str) -> list[str]:
    import s3fs

    return sorted(s3fs.S3FileSystem(skip_instance_cache=True).find(url.removeprefix("s3://")))


def test_conditional_put_creates_an_object_once(s3):
    objects = RemoteObjects("s3://fvlm/cond/x", read_only=False)
    assert objects.put_if_absent("a.json", b"first") is True
    assert objects.put_if_absent("a.json", b"second") is False
    assert objects.get_many(["a.json"]) == [b"first"]


def test_a_store_is_created_once_and_other_inputs_are_refused(s3):
    url = "s3://fvlm/identity/s.zarr"
    store = StoreWriter.create_or_open(url, ATTRS, SHAPES, capacity=4, shard_videos=2, inputs=keys(0))
    claim = json.loads(store.objects.get_many([CLAIM_KEY])[0])["attributes"]
    assert claim["store_id"] == store.attrs["store_id"] and claim["inputs"] == inputs_fingerprint(keys(0))
    before = listing(url)
    with pytest.raises(StoreError, match="another input list"):
        StoreWriter.create_or_open(url, ATTRS, SHAPES, capacity=4, inputs=keys(1))
    assert listing(url) == before
    again = StoreWriter.create_or_open(url, ATTRS, SHAPES, capacity=4, inputs=keys(0))
    assert again.attrs["store_id"] == store.attrs["store_id"]


def test_losing_the_creation_race_to_other_inputs_is_refused_before_writing(s3, monkeypatch):
    url = "s3://fvlm/race/s.zarr"
    winner = RemoteObjects(url, read_only=False)  # another writer has claimed the store, not yet written it
    claim = {"store_id": "x", "inputs": inputs_fingerprint(keys(1)), "created": "now"}
    assert winner.put_if_absent(CLAIM_KEY, json.dumps({"attributes": claim}).encode())
    with pytest.raises(StoreError, match="being created by another writer from another input list"):
        StoreWriter.create_or_open(url, ATTRS, SHAPES, capacity=4, inputs=keys(0))
    assert listing(url) == [url.removeprefix("s3://") + "/" + CLAIM_KEY]  # nothing else written
    # The same inputs wait for the winner's metadata (here it never comes: one line saying what to do).
    monkeypatch.setattr(creation, "CLAIM_WAIT_S", 0.5)
    with pytest.raises(StoreError, match=f"is being created by another writer since now.*delete {url}/{CLAIM_KEY}"):
        StoreWriter.create_or_open(url, ATTRS, SHAPES, capacity=4, inputs=keys(1))


def test_a_claim_of_our_own_counts_as_won(s3, monkeypatch):
    """A conditional PUT retried after its first try landed (the answer was lost) finds our own claim."""
    url = "s3://fvlm/retried/s.zarr"
    monkeypatch.setattr(writer, "new_store_id", lambda: "ours")
    objects = RemoteObjects(url, read_only=False)
    claim = {"store_id": "ours", "inputs": inputs_fingerprint(keys(0)), "created": "now"}
    body = {"zarr_format": 3, "node_type": "group", "attributes": claim}
    assert objects.put_if_absent(CLAIM_KEY, json.dumps(body).encode())
    monkeypatch.setattr(creation, "CLAIM_WAIT_S", 0.5)  # without the check: waits, then fails
    store = StoreWriter.create_or_open(url, ATTRS, SHAPES, capacity=4, shard_videos=2, inputs=keys(0))
    assert store.attrs["store_id"] == "ours" and store.capacity == 4
