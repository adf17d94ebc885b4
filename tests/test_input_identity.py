"""What identifies a store's inputs and files: one file id per file (the split and the evaluation group rows
by it), the input fingerprint over everything that decides a row (and not over how its paths are spelled),
and manifest rows whose ids or bounds cannot be stored, named by their line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from fvlm_data import FeatureStore
from fvlm_data.dataset import FeatureDataset, split_by_file
from fvlm_data.errors import StoreError
from fvlm_data.inspect import inspect_store
from fvlm_data.precompute.config import PrecomputeConfig
from fvlm_data.precompute.pipeline import input_keys
from fvlm_data.sources import list_inputs
from fvlm_data.store.creation import inputs_fingerprint
from fvlm_data.store.writer import StoreWriter
from tests.helpers.small_stores import SHAPES, small_store

ATTRS = dict(dino="tiny", vae="tiny", preset="tiny", num_frames=4, image_size=28, feature_dtype="float16")


def one_row_per_caption(folder: Path, files: int = 6) -> Path:
    """A manifest as the README allows: one whole-file row per caption, each with its own video_id, and
    segments (with and without an id) of the same files."""
    rows = []
    for k in range(files):
        rows += [{"path": f"clip{k}.mp4", "video_id": f"clip{k}-caption{j}", "caption": f"caption {j}"}
                 for j in range(2)]
        rows += [{"path": f"clip{k}.mp4", "start": 1, "end": 3, "caption": "a segment"},
                 {"path": f"./clip{k}.mp4", "start": 2, "end": 4, "caption": "another", "video_id": f"seg{k}"}]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sides_of(store, fraction: float) -> dict[str, set[str]]:
    """file -> the sides ('train', 'val') its rows are on."""
    train, val, _, _, _ = split_by_file(store, fraction)
    sources = dict(zip(store.committed_slots().tolist(), store.read_strings("source"), strict=True))
    sides: dict[str, set[str]] = {}
    for side, slots in (("train", train), ("val", val)):
        for slot in slots.tolist():
            sides.setdefault(Path(sources[slot]).name, set()).add(side)
    return sides


def test_every_row_of_a_file_shares_one_file_id_so_the_split_never_puts_a_file_on_both_sides(tmp_path):
    items = list_inputs(videos=str(one_row_per_caption(tmp_path / "videos")))
    ids_of_file: dict[str, set[str]] = {}
    for it in items:
        ids_of_file.setdefault(Path(it.path).name, set()).add(it.file_id or it.video_id)
    assert ids_of_file == {f"clip{k}.mp4": {f"clip{k}"} for k in range(6)}
    store = small_store(tmp_path / "s.zarr", [it.video_id for it in items], file_ids=[it.file_id for it in items],
                        sources=[it.source for it in items], inputs=input_keys(items, PrecomputeConfig(out="s")))
    used = set()
    for fraction in np.linspace(0.1, 0.9, 5):
        sides = sides_of(store, fraction)
        assert all(len(s) == 1 for s in sides.values()), (fraction, sides)
        used |= set().union(*sides.values())
    assert used == {"train", "val"}


def test_an_old_store_with_several_file_ids_per_file_is_split_by_file_and_says_so(tmp_path):
    """A store made before file ids were per file: a whole-file row's file id was its own video id."""
    items = list_inputs(videos=str(one_row_per_caption(tmp_path / "videos")))
    old_ids = [it.video_id if it.start is None else f"{Path(it.path).stem}-caption1" for it in items]
    store = small_store(tmp_path / "old.zarr", [it.video_id for it in items], file_ids=old_ids,
                        sources=[it.source for it in items])
    for fraction in np.linspace(0.1, 0.9, 5):
        assert all(len(s) == 1 for s in sides_of(store, fraction).values()), fraction
    note = split_by_file(store, 0.5)[4]
    assert note.startswith(f"{store.path}: 6 file(s) have rows under several file ids") and "\n" not in note
    assert "recompute the store with a new --out" in note
    with pytest.warns(UserWarning, match="several file ids"):
        FeatureDataset(store.path, num_frames=4, split="val", val_fraction=0.5)
    assert inspect_store(str(store.path))["file_ids"] == note
    whole = small_store(tmp_path / "whole.zarr", [f"v{i}" for i in range(8)])  # whole videos: nothing to say
    assert split_by_file(whole, 0.5)[4] is None and "file_ids" not in inspect_store(str(whole.path))


def create(path: Path, manifest: Path | str, **config) -> StoreWriter:
    """What precompute does with a store before anything is written: list, fingerprint, create or check."""
    items = list_inputs(videos=str(manifest))
    keys = input_keys(items, PrecomputeConfig(out=str(path), **config))
    return StoreWriter.create_or_open(path, ATTRS, SHAPES, len(items), 4, keys)


def rewrite(manifest: Path, row: int, **change) -> None:
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[row].update(change)
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("change", [dict(row=1, caption="another caption"), dict(row=2, start=1.5),
                                    dict(row=3, end=5), dict(max_duration=60.0), dict(min_duration=1.0)])
def test_a_changed_caption_segment_or_filter_is_another_input_list(tmp_path, change):
    manifest = one_row_per_caption(tmp_path / "videos", files=2)
    path = tmp_path / "s.zarr"
    create(path, manifest)
    before = sorted(str(p) for p in path.rglob("*"))
    config = {k: change.pop(k) for k in ("max_duration", "min_duration") if k in change}
    if change:
        rewrite(manifest, **change)
    with pytest.raises(StoreError, match=r"another input list .*: the input list changed; use a new --out "
                                         r"\(compared: video ids, files, captions, segment bounds"):
        create(path, manifest, **config)
    assert sorted(str(p) for p in path.rglob("*")) == before  # refused before anything was written


def test_the_same_inputs_under_another_spelling_of_their_path_are_the_same_list(tmp_path, monkeypatch):
    manifest = one_row_per_caption(tmp_path / "videos", files=2)
    path = tmp_path / "s.zarr"
    fingerprint = create(path, manifest).attrs["inputs"]
    assert fingerprint["version"] == 2
    create(path, tmp_path / "videos" / ".." / "videos" / "m.jsonl")  # dir/../dir/m.jsonl
    monkeypatch.chdir(tmp_path / "videos")
    create(path, "m.jsonl")  # a relative path from another folder
    monkeypatch.chdir(tmp_path)
    shutil.move(tmp_path / "videos", tmp_path / "moved")
    create(path, tmp_path / "moved" / "m.jsonl")  # the folder moved
    folder = tmp_path / "folder"  # a folder of videos, moved
    (folder / "sub").mkdir(parents=True)
    for name in ("a.mp4", "sub/b.mp4"):
        (folder / name).write_bytes(b"")
    create(tmp_path / "f.zarr", folder)
    os.rename(folder, tmp_path / "elsewhere")
    create(tmp_path / "f.zarr", tmp_path / "elsewhere")
    assert FeatureStore.open(path).attrs["inputs"] == fingerprint


def test_a_store_with_the_old_fingerprint_keeps_its_old_check_and_grows_in_it(tmp_path):
    manifest = one_row_per_caption(tmp_path / "videos", files=2)
    items = list_inputs(videos=str(manifest))
    old = inputs_fingerprint([(it.video_id, it.source) for it in items], version=1)
    assert "version" not in old  # what stores made before record
    path = tmp_path / "s.zarr"
    StoreWriter.create_or_open(path, ATTRS, SHAPES, len(items), 4, [(it.video_id, it.source) for it in items])
    zarr.open_group(str(path), mode="r+").attrs["inputs"] = old
    rewrite(manifest, 0, caption="a new caption")
    create(path, manifest)  # the old check: video ids and paths only
    rewrite(manifest, 0, video_id="renamed")
    with pytest.raises(StoreError, match="another input list .*compared: video ids and paths"):
        create(path, manifest)
    rewrite(manifest, 0, video_id="clip0-caption0")
    with manifest.open("a") as f:
        f.write(json.dumps({"path": "new.mp4", "caption": "one more"}) + "\n")
    grown = create(path, manifest)
    assert grown.capacity == len(items) + 1
    assert grown.attrs["inputs"] == inputs_fingerprint(
        [(it.video_id, it.source) for it in list_inputs(videos=str(manifest))], version=1)


@pytest.mark.parametrize("rows, message", [
    ([{"path": "a.mp4", "start": 1.0001, "end": 2, "caption": "x"},
      {"path": "a.mp4", "start": 1.0002, "end": 2, "caption": "y"}],
     "line 2: video_id 'a#1-2' is also line 1's (default segment ids are rounded to the millisecond): give each "
     "row its own video_id"),
    ([{"path": "a.mp4", "caption": "x", "video_id": "same"}, {"path": "b.mp4", "caption": "y"},
      {"path": "b.mp4", "caption": "z", "video_id": "same"}], "line 3: video_id 'same' is also line 1's: give"),
    ([{"path": "a.mp4", "caption": "x"}, {"path": "a.mp4", "start": 0, "end": 1e308, "caption": "y"}],
     "line 2: 'end' must be between -1e+07 and 1e+07 seconds, got 1e+308"),
    ([{"path": "a.mp4", "start": -2e7, "caption": "y"}], "line 1: 'start' must be between -1e+07 and 1e+07 seconds"),
])
def test_ids_and_bounds_a_store_cannot_hold_are_refused_with_their_line(tmp_path, rows, message):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError) as e:
        list_inputs(videos=str(manifest))
    assert str(e.value).startswith(f"manifest {manifest} {message}") and "\n" not in str(e.value)


@pytest.mark.slow  # real precompute runs (in this process)
def test_precompute_refuses_changed_captions_accepts_another_spelling_and_notes_an_old_fingerprint(tmp_path):
    from tests.helpers.in_process import invoke
    from tests.helpers.videos import write_video

    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(folder / "clip.mp4", lambda i: np.full((32, 32, 3), 20 * i, np.uint8), 10, fps=5)
    rows = [{"path": "clip.mp4", "caption": "whole"}, {"path": "clip.mp4", "caption": "again", "video_id": "two"},
            {"path": "clip.mp4", "start": 0.5, "end": 1.5, "caption": "a part"}]
    manifest = folder / "m.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "s.zarr"

    def precompute(listing: Path | str, cwd: Path | None = None):
        return invoke("precompute", ["--out", str(out), "--videos", str(listing), "--preset", "tiny", "--image-size",
                                     "28", "--num-frames", "2", "--workers", "0", "--quiet"], cwd=cwd)

    first = precompute(manifest)
    assert first.returncode == 0 and "written 3 videos" in first.stdout, first.stderr
    assert FeatureStore.open(out).file_ids() == ["clip"] * 3
    again = precompute("videos/../videos/m.jsonl", cwd=tmp_path)  # another spelling, from another folder
    assert again.returncode == 0 and "written 0 videos, skipped 3 already in the store" in again.stdout, again.stderr
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rewrite(manifest, 2, caption="another caption")
    refused = precompute(manifest)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].endswith("the input list changed; use a new --out (compared: "
                                                             "video ids, files, captions, segment bounds, "
                                                             "--min/--max-duration)")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written
    items = list_inputs(videos=str(manifest))  # a store made before: the old fingerprint
    zarr.open_group(str(out), mode="r+").attrs["inputs"] = inputs_fingerprint(
        [(it.video_id, it.source) for it in items], version=1)
    old = precompute(manifest)
    assert old.returncode == 0 and "skipped 3 already in the store" in old.stdout
    assert f"note: {out} has an old input fingerprint (video ids and paths only)" in old.stderr

