"""Stores on object storage: a real S3-compatible server (moto in server mode) on 127.0.0.1 (conftest.py's `s3`
fixture, tests/helpers/s3.py)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from zarr.storage import WrapperStore

from fvlm_data import FeatureDataset, FeatureStore, StoreError
from fvlm_data.dataset import frame_indices
from fvlm_data.store import FeatureShapes
from fvlm_data.store.writer import StoreWriter
from tests.helpers.s3 import SMALL, local_objects, remote_objects

pytestmark = pytest.mark.slow  # the S3 server and precompute.py / train.py in new processes

pytest.importorskip("s3fs")
pytest.importorskip("moto")

ROOT = Path(__file__).resolve().parents[1]


def precompute(env: dict, out: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "precompute.py"), "--out", out, *SMALL, *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def local_reference(s3, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "s.zarr"
    precompute(s3, str(out))
    return out


def test_precompute_into_s3_reads_back_like_the_local_store(s3, local_reference):
    url = "s3://fvlm/runs/a/s.zarr"
    precompute(s3, url)
    assert remote_objects(url) == local_objects(local_reference)
    remote, local = FeatureStore.open(url), FeatureStore.open(local_reference)
    assert len(remote) == 6 and remote.attrs["shard_videos"] == 2 and remote.nbytes_on_disk() > 0
    for i in range(6):
        a, b = remote.read(i, frames=[0, 2, 3]), local.read(i, frames=[0, 2, 3])
        np.testing.assert_array_equal(a["dino"], b["dino"])
        np.testing.assert_array_equal(a["latents"], b["latents"])
        assert a["caption"] == b["caption"]
    ds = FeatureDataset(url, num_frames=4, split="all")
    items = ds.__getitems__([5, 0, 3])
    assert [it["video_id"] for it in items] == [local.read(i)["video_id"] for i in (5, 0, 3)]


def test_kill_9_then_rerun_on_s3_equals_the_local_store(s3, local_reference):
    url = "s3://fvlm/runs/killed/s.zarr"
    cmd = [sys.executable, str(ROOT / "precompute.py"), "--out", url, *SMALL, "--batch-videos", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=s3, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    first_shard = url.removeprefix("s3://") + "/committed/c/0"
    deadline = time.time() + 120
    while time.time() < deadline and not fs.exists(first_shard):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(FeatureStore.open(url))
    assert partial in (2, 4), f"the kill came too late to test anything ({partial} rows)"
    rerun = precompute(s3, url)
    assert f"skipped {partial} already in the store" in rerun.stdout
    assert remote_objects(url) == local_objects(local_reference)


def test_two_writer_processes_fill_one_s3_store(s3, local_reference):
    url = "s3://fvlm/runs/two/s.zarr"
    procs = [subprocess.Popen([sys.executable, str(ROOT / "precompute.py"), "--out", url, *SMALL,
                               "--num-shards", "2", "--shard-index", str(i)], cwd=ROOT, env=s3,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert remote_objects(url) == local_objects(local_reference)


def test_torchrun_two_ranks_fill_one_s3_store(s3, local_reference):
    url = "s3://fvlm/runs/torchrun/s.zarr"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "precompute.py"), "--out", url, *SMALL], capture_output=True, text=True,
                          cwd=ROOT, env=s3, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"store: {url}") == 1  # one summary for both ranks
    assert "written 6 videos, skipped 0 already in the store, 0 failed" in proc.stdout
    assert remote_objects(url) == local_objects(local_reference)


class RoundTrips(WrapperStore):
    """Counts a store's GETs and its round trips: a round trip starts when a GET starts with none in flight
    (requests sent together overlap; one sent after another's answer is another round trip)."""

    def __init__(self, store):
        super().__init__(store)
        self.gets = self.rounds = self.in_flight = 0

    async def get(self, key, prototype, byte_range=None):
        self.rounds += self.in_flight == 0
        self.gets += 1
        self.in_flight += 1
        try:
            return await self._store.get(key, prototype=prototype, byte_range=byte_range)
        finally:
            self.in_flight -= 1


def test_a_batch_costs_a_few_round_trips_not_one_per_sample(s3):
    """32 samples of 16 frames are read in a few round trips of concurrent requests (with a fixed latency per
    request, a few latencies), not one or more per sample."""
    url = "s3://fvlm/runs/latency/s.zarr"
    shapes = FeatureShapes(24, {"dino": (5, 8), "latents": (4, 2, 2)})
    attrs = dict(dino="tiny", vae="tiny", num_frames=24, image_size=28, feature_dtype="float16")
    store = StoreWriter.create_or_open(url, attrs, shapes, capacity=64, shard_videos=16)
    rng = np.random.default_rng(0)
    for shard in range(4):
        buf = store.shard_buffer(shard)
        for slot in range(buf.start, buf.stop):
            buf.add_row(slot, dino=rng.standard_normal((24, 5, 8)), latents=rng.standard_normal((24, 4, 2, 2)),
                        caption=f"c{slot}", video_id=f"v{slot}", source="s", timestamps=np.arange(24), duration=24.0)
        buf.publish()
    slots = rng.permutation(64)[:32].tolist()
    frames = [frame_indices(24, 16)] * 32  # runs of 1-2 frames: 8 ranges per video and array

    reader = FeatureStore.open(url)
    reader.objects.store = trips = RoundTrips(reader.objects.store)
    rows = reader.read_slots(slots, frames)
    assert [r["caption"] for r in rows] == [f"c{s}" for s in slots]
    # Shard indexes, then captions and ids, then frame ranges: three rounds, not 32 (or 32 x 3 x 8).
    assert 0 < trips.rounds <= 5, f"{trips.rounds} round trips ({trips.gets} GETs) for one batch"


def test_train_reads_an_s3_store_in_dataloader_workers(s3, tmp_path):
    url = "s3://fvlm/runs/a/s.zarr"  # written by the first test (or now)
    if not FeatureStore.exists(url):
        precompute(s3, url)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--store", url, "--preset", "tiny",
                           "--batch-size", "2", "--grad-accum", "1", "--num-frames", "4", "--workers", "2",
                           "--val-fraction", "0.34", "--max-steps", "3", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=ROOT, env=s3, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoint_latest.pt").exists()


def test_grow_killed_on_s3_then_rerun_equals_the_local_store_and_refresh_sees_it(s3, local_reference):
    """precompute of 4 inputs, then of 6 killed (kill -9) at a random metadata write of its grow: readers still
    open the store (its 4 rows), a reader's refresh() sees the rows another process publishes after, and the
    rerun ends with the shard objects of an uninterrupted run. Also: a bucket that does not exist is said so."""
    url = "s3://fvlm/runs/grown/s.zarr"
    precompute(s3, url, "--limit", "4")
    at = random.randrange(16)  # 16 writes: the attributes, 14 arrays, the attributes
    killed = subprocess.run([sys.executable, str(ROOT / "precompute.py"), "--out", url, *SMALL], cwd=ROOT,
                            env={**s3, "PYTHONPATH": f"{ROOT / 'tests' / 'kill_at'}{os.pathsep}{ROOT}",
                                 "FVLM_TEST_KILL_AT_METADATA_WRITE": str(at)}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, f"not killed at metadata write {at}: {killed.stderr[-2000:]}"
    reader = FeatureStore.open(url)
    assert len(reader) == 4 and reader.capacity == 4, f"killed at metadata write {at}"
    precompute(s3, url)
    reader.refresh()  # another process published the third shard: seen once the listing is read again
    assert len(reader) == 6
    assert FeatureStore.open(url).capacity == 6 and not FeatureStore.open(url).grow_unfinished
    assert remote_objects(url) == local_objects(local_reference)
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        StoreWriter.create_or_open("s3://no-such-bucket/s.zarr", dict(dino="tiny", vae="tiny", num_frames=2,
                                   image_size=28, feature_dtype="float16"),
                                   FeatureShapes(2, {"dino": (1, 2), "latents": (1, 1, 1)}), capacity=1)
