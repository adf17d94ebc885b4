"""Damage outside the shards' data: a missing small-array object, broken array metadata, a folder that is not a
store (or an empty one, or a mount point); and what `inspect --verify` and concurrent object writes do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from fvlm_data import FeatureStore, StoreError
from fvlm_data.inspect import inspect_store, main
from fvlm_data.store import creation
from fvlm_data.store.objects import HOST, TEMP_DIR, LocalObjects
from fvlm_data.store.writer import StoreWriter
from fvlm_train.config import TrainError
from fvlm_train.data import open_store
from tests.helpers.in_process import invoke
from tests.helpers.small_stores import SHAPES, small_store

IDS = [f"video-{i}" for i in range(8)]  # 2 shards of 4


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("damage") / "base.zarr"
    small_store(path, IDS, failures={1: "too short: 1 s"})
    return path


@pytest.fixture
def store(base, tmp_path) -> Path:
    path = tmp_path / "s.zarr"
    shutil.copytree(base, path)
    return path


# What reads each small array (duration has no reader: inspect and a rerun find it missing).
READS = {
    "caption": lambda s: s.read(0), "video_id": lambda s: s.read_strings("video_id"),
    "captions": lambda s: s.captions([0]), "file_id": lambda s: s.file_ids(), "source": lambda s: s.failures,
    "failure": lambda s: s.failures, "dino_crc32c": lambda s: s.read(0), "latents_crc32c": lambda s: s.read(0),
    "timestamps_crc32c": lambda s: s.read(0), "duration": None,
}


@pytest.mark.parametrize("name", sorted(READS))
def test_a_missing_small_object_of_a_committed_shard_is_an_error_on_read_and_in_inspect(store, name):
    reader = FeatureStore.open(store)
    key = reader.shard_key(name, 0)
    (store / key).unlink()
    if READS[name] is not None:
        with pytest.raises(StoreError, match=rf"shard 0 of '{name}' \({key}\) is missing although the shard "
                                             "is committed"):
            READS[name](reader)
    report = inspect_store(str(store))  # without --verify: a listing per array finds it
    assert report["shards"]["to_compute"] == [0] and f"'{name}'" in report["shards"]["damaged"]["0"]


DAMAGES = {
    "cut short": lambda meta: meta.write_text(meta.read_text()[:50]),
    "unknown codec": lambda meta: meta.write_text(meta.read_text().replace('"sharding_indexed"', '"nosuch"', 1)),
    "object dtype": lambda meta: meta.write_text(json.dumps({**json.loads(meta.read_text()), "data_type": "object"})),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_array_metadata_is_one_line_naming_store_and_file(store, damage, capsys):
    DAMAGES[damage](store / "dino" / "zarr.json")
    where = f"{store}: dino/zarr.json cannot be read"
    with pytest.raises(StoreError, match=where):
        FeatureStore.open(store)
    assert main([str(store)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and where in err and "Traceback" not in err
    with pytest.raises(TrainError, match=where):
        open_store(str(store))  # train.py's first step
    proc = invoke("precompute", ["--out", str(store), "--preset", "tiny", "--num-frames", "4", "--image-size", "28",
                                 "--synthetic", "8"])
    assert proc.returncode == 1 and where in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_a_folder_that_is_not_a_store_is_one_clear_line(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x")
    assert main([str(folder)]) == 1
    assert capsys.readouterr().err == f"error: {folder} is not an fvlm feature store (it has no zarr.json)\n"
    with pytest.raises(StoreError, match="holds files but no store"):
        StoreWriter.create_or_open(folder, dict(dino="tiny", vae="tiny", num_frames=4, image_size=28,
                                                feature_dtype="float16"), SHAPES, capacity=4)
    (folder / "zarr.json").write_text("{not json")
    assert main([str(folder)]) == 1
    err = capsys.readouterr().err
    assert f"{folder}/zarr.json is not the metadata of a Zarr v3 group (JSONDecodeError" in err
    assert err.count("\n") == 1 and "LocalStore" not in err


def _mount_tmpfs(path: Path) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_an_empty_folder_and_a_mount_point_are_new_stores(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    small_store(empty, IDS)
    assert len(FeatureStore.open(empty)) == 8
    mount = tmp_path / "mnt"
    if not _mount_tmpfs(mount):
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        (mount / "creation").mkdir()  # a creator killed in place, before its zarr.json
        monkeypatch.setattr(creation, "CLAIM_WAIT_S", 0.2)
        with pytest.raises(StoreError, match=f"being created by another writer .*delete {mount}/creation"):
            small_store(mount, IDS)
        (mount / "creation").rmdir()
        small_store(mount, IDS)
        assert len(FeatureStore.open(mount)) == 8 and not (mount / "creation").exists()
        assert len(StoreWriter.create_or_open(mount, FeatureStore.open(mount).attrs, SHAPES, 8)) == 8
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_inspect_verify_reads_the_data_as_a_rerun_does(store):
    dino = store / "dino" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(dino.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside a video's frames: the shard index is intact
    dino.write_bytes(bytes(data))
    report = inspect_store(str(store), verify=True)
    assert report["shards"]["to_compute"] == [1] and "fails its crc32c checksum" in report["shards"]["damaged"]["1"]


def test_writers_of_one_object_at_once_never_collide(tmp_path):
    """Two identical precompute commands at once write the same objects: each through its own temp file."""
    objects = LocalObjects(tmp_path)
    errors: list[BaseException] = []

    def write(value: int) -> None:
        try:
            for _ in range(150):
                objects.put("a/c/0", bytes([value]) * 50_000)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=write, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(set((tmp_path / "a" / "c" / "0").read_bytes())) == 1  # one writer's whole object
    assert [p.name for p in (tmp_path / "a" / "c").iterdir()] == ["0"] and not any((tmp_path / TEMP_DIR).iterdir())


def test_a_writer_removes_the_temp_files_of_killed_writers(store):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (store / TEMP_DIR).mkdir(exist_ok=True)
    stale, live = store / TEMP_DIR / f"{HOST}-{dead.pid}-1", store / TEMP_DIR / f"{HOST}-{os.getpid()}-1"
    stale.write_bytes(b"half an object")
    live.write_bytes(b"being written")
    StoreWriter.create_or_open(store, FeatureStore.open(store).attrs, SHAPES, 8)
    assert not stale.exists() and live.exists()


def test_len_and_read_count_committed_rows_while_failures_name_slots(base):
    store = FeatureStore.open(base)
    assert len(store) == 7 and store.failures[0]["slot"] == 1
    np.testing.assert_array_equal(store.committed_slots()[:2], [0, 2])
    assert store.read(1)["video_id"] == "video-2"  # row 1 is slot 2
