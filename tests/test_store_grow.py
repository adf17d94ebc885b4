"""A grow (a longer input list: every array resized) that is killed part-way: the next writer finishes or undoes
it, and readers see the store before or after it, never refused."""

from __future__ import annotations

import random
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

from fvlm_data import FeatureStore
from fvlm_data.inspect import inspect_store, render
from fvlm_data.store import FeatureShapes
from fvlm_data.store.creation import inputs_fingerprint
from fvlm_data.store.objects import LocalObjects
from fvlm_data.store.writer import StoreWriter
from tests.helpers.store_helpers import write_rows

SHAPES = FeatureShapes(3, {"dino": (2, 4), "latents": (1, 2, 2)})
ATTRS = dict(dino="tiny", vae="tiny", num_frames=3, image_size=28, feature_dtype="float16")
OLD, NEW = 12, 24
INPUTS = [(f"v{i}", f"/videos/{i}.mp4") for i in range(NEW)]


class Killed(BaseException):
    """Stands for a kill -9: nothing after it runs (not even `except Exception`)."""


def row(slot: int) -> dict:
    rng = np.random.default_rng(slot)
    return dict(caption=f"c{slot}", video_id=f"v{slot}", source=f"/videos/{slot}.mp4", duration=3.0,
                timestamps=np.arange(3, dtype=np.float32),
                dino=rng.standard_normal((3, 2, 4)).astype(np.float16),
                latents=rng.standard_normal((3, 1, 2, 2)).astype(np.float16))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A store of 12 slots (shards of 8: the last one half out of bounds), every row written."""
    path = tmp_path_factory.mktemp("grow") / "s.zarr"
    store = StoreWriter.create_or_open(path, ATTRS, SHAPES, OLD, shard_videos=8, inputs=INPUTS[:OLD])
    write_rows(store, [(slot, row(slot)) for slot in range(OLD)])
    return path


def objects(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def grow(path: Path, n: int = NEW) -> StoreWriter:
    return StoreWriter.create_or_open(path, ATTRS, SHAPES, n, inputs=INPUTS[:n])


def killed_after(monkeypatch, writes: int, partial: bool = False) -> list[str]:
    """Make the `writes`+1-th object write of this process a kill (`partial`: after half of its temp file)."""
    done: list[str] = []
    put, zarr_set = LocalObjects.put, zarr.storage.LocalStore.set

    def write(root: Path, key: str, data: bytes) -> None:
        if len(done) == writes:
            if partial:
                (root / key).with_name(f".{Path(key).name}.tmp-killed").write_bytes(data[: len(data) // 2])
            raise Killed
        done.append(key)

    def dying_put(self, key, data):
        write(self.root, key, data)
        put(self, key, data)

    async def dying_set(self, key, value):  # zarr's own writes (how grows were written before)
        write(Path(self.root), key, value.to_bytes())
        await zarr_set(self, key, value)

    monkeypatch.setattr(LocalObjects, "put", dying_put)
    monkeypatch.setattr(zarr.storage.LocalStore, "set", dying_set)
    return done


def check_before_or_after(path: Path, capacities: tuple[int, ...] = (OLD, NEW)) -> None:
    reader = FeatureStore.open(path)  # never refused
    assert reader.capacity in capacities
    assert reader.committed_slots().tolist() == list(range(OLD))
    np.testing.assert_array_equal(reader.read(11)["dino"], row(11)["dino"])


def test_grow_killed_after_each_metadata_write_is_finished_by_the_next_writer(small, tmp_path, monkeypatch):
    reference = tmp_path / "reference.zarr"
    shutil.copytree(small, reference)
    grow(reference)
    expected = objects(reference)
    assert FeatureStore.open(reference).attrs["inputs"] == inputs_fingerprint(INPUTS)
    k = 0
    while True:
        path = tmp_path / f"killed{k}.zarr"
        shutil.copytree(small, path)
        done = killed_after(monkeypatch, k)
        try:
            grow(path)
        except Killed:
            pass
        else:
            break  # the grow made fewer writes than k: every point is covered
        finally:
            monkeypatch.undo()
        assert len(done) == k and all(key.endswith("zarr.json") for key in done)
        check_before_or_after(path)
        if k == 3:
            assert "a grow was begun and not ended" in render(inspect_store(str(path)))
        # The old command (12 inputs) undoes the grow; the longer one finishes it, like an uninterrupted run.
        if k % 4 == 1:
            assert StoreWriter.create_or_open(path, ATTRS, SHAPES, OLD, inputs=INPUTS[:OLD]).capacity == OLD
            check_before_or_after(path)
        assert grow(path).capacity == NEW
        assert objects(path) == expected, f"killed after metadata write {k}"
        k += 1
    assert k >= 3  # the group's attributes, then the arrays one by one


def test_grow_killed_at_random_moments_then_rerun_equals_an_uninterrupted_run(small, tmp_path, monkeypatch):
    reference = tmp_path / "reference.zarr"
    shutil.copytree(small, reference)
    grow(reference)
    rng = random.Random(27)
    for attempt in range(3):
        path = tmp_path / f"random{attempt}.zarr"
        shutil.copytree(small, path)
        for _ in range(2):  # killed twice in a row, at random writes, halfway through a file or between two
            killed_after(monkeypatch, rng.randrange(16), partial=rng.random() < 0.5)
            try:
                grow(path, rng.choice([NEW, NEW + 4]))  # the killed run may have asked for another length
            except Killed:
                pass
            finally:
                monkeypatch.undo()
            check_before_or_after(path, (OLD, NEW, NEW + 4))
        grow(path)
        got = {k: v for k, v in objects(path).items() if ".tmp" not in k}
        assert got == objects(reference)


def test_a_grow_by_an_older_fvlm_killed_part_way_is_read_and_finished(small, tmp_path):
    """Older fvlm resized the arrays one by one with zarr, then wrote the fingerprint: killed in between, its
    store was refused for good. It reads as before the grow, and the next writer finishes the grow."""
    reference, path = tmp_path / "reference.zarr", tmp_path / "old.zarr"
    shutil.copytree(small, reference)
    grow(reference)
    shutil.copytree(small, path)
    group = zarr.open_group(str(path), mode="r+")
    for name in ("dino", "caption", "timestamps"):
        group[name].resize((NEW, *group[name].shape[1:]))
    check_before_or_after(path)
    assert grow(path).capacity == NEW
    assert objects(path) == objects(reference)


def test_refresh_sees_a_grow_and_the_rows_written_after_it(small, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(small, path)
    reader = FeatureStore.open(path)
    writer = grow(path)
    for shard in (1, 2):
        buf = writer.shard_buffer(shard, keep_existing=True)  # shard 1 keeps its 4 rows
        for slot in range(max(OLD, buf.start), buf.stop):
            buf.add_row(slot, **row(slot))
        buf.publish()
    assert reader.capacity == OLD and len(reader) == OLD
    reader.refresh()
    assert reader.capacity == NEW and len(reader) == NEW
    np.testing.assert_array_equal(reader.read(NEW - 1)["dino"], row(NEW - 1)["dino"])


def test_readers_opening_during_grows_are_never_refused(small, tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"s{i}.zarr")
        shutil.copytree(small, paths[-1])
    errors: list[BaseException] = []
    current = [paths[0]]
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                check_before_or_after(current[0], (OLD, NEW, NEW + 8))
            except BaseException as e:  # noqa: BLE001 (reported below)
                errors.append(e)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for path in paths:
            current[0] = path
            for n in (NEW, NEW + 8):
                StoreWriter.create_or_open(path, ATTRS, SHAPES, n, inputs=INPUTS[:NEW] + [("x", str(i)) for i in
                                                                                            range(n - NEW)])
    finally:
        stop.set()
        reader.join()
    assert not errors, errors[0]
