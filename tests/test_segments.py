"""Segments of long videos as rows: listing, one-pass decoding, precompute and the split, on real files."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fvlm_data import FeatureStore
from fvlm_data.dataset import split_slots, validation_mask
from fvlm_data.inspect import inspect_store
from fvlm_data.precompute.workers import InlineExecutor, decoded_in_order, file_groups
from fvlm_data.records import Decoding, VideoInput
from fvlm_data.sources import list_inputs, load_file_frames, load_frames
from tests.helpers.small_stores import small_store
from tests.helpers.videos import write_video

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}
FPS, SECONDS = 5, 60


def draw_index(i: int) -> np.ndarray:
    """Flat colour spelling frame i in base 10: red ones, green tens, blue hundreds (steps of 20 survive
    encoding)."""
    colour = (20 + 20 * (i % 10), 20 + 20 * (i // 10 % 10), 20 + 20 * (i // 100))
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (64, 64, 3)).copy()


def frame_index(frame: np.ndarray) -> int:
    red, green, blue = (round((frame[..., c].mean() - 20) / 20) for c in range(3))
    return red + 10 * green + 100 * blue


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """long.mp4: 60 s at 5 fps, 64x64, a keyframe every 5 s; short.mp4: its first 10 s."""
    root = tmp_path_factory.mktemp("segments")
    write_video(root / "long.mp4", draw_index, FPS * SECONDS, fps=FPS, gop=25)
    write_video(root / "short.mp4", draw_index, FPS * 10, fps=FPS, gop=25)
    return root


ROWS = [
    {"path": "long.mp4", "caption": "the whole file"},
    {"path": "long.mp4", "start": 5, "end": 20, "captions": ["five to twenty", "a second caption"]},
    {"path": "long.mp4", "start": 10, "end": 30.5, "caption": "overlapping", "captions": ["another"]},
    {"path": "long.mp4", "start": 12.5, "end": 13.5, "caption": "too short for --min-duration 2"},
    {"path": "long.mp4", "start": 50, "end": 70, "caption": "past the end"},
    {"path": "long.mp4", "start": 30, "end": 30, "caption": "end <= start"},
    {"path": "short.mp4", "start": 0, "end": 4, "caption": "short, first part"},
    {"path": "short.mp4", "start": 3, "end": 9.6, "caption": "short, second part", "video_id": "mine"},
    {"path": "long.mp4", "start": 40, "end": 59.9, "caption": "the end"},
]
GOOD = {"long": (0, 60), "long#5-20": (5, 20), "long#10-30.5": (10, 30.5), "short#0-4": (0, 4), "mine": (3, 9.6),
        "long#40-59.9": (40, 59.9)}


@pytest.fixture(scope="module")
def manifest(clips) -> Path:
    path = clips / "segments.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def decoding(seek: str = "exact", min_duration: float = 2.0) -> Decoding:
    return Decoding(num_frames=6, image_size=32, min_duration=min_duration, max_duration=None, seek=seek)


def test_segment_rows_are_listed_in_order_with_ids_file_ids_and_captions(manifest):
    items = list_inputs(videos=str(manifest))
    assert [it.video_id for it in items] == ["long", "long#5-20", "long#10-30.5", "long#12.5-13.5", "long#50-70",
                                             "long#30-30", "short#0-4", "mine", "long#40-59.9"]
    assert items[0].start is None  # a whole file, as today
    assert [it.file_id for it in items[:6] + items[8:]] == ["long"] * 7
    assert items[6].file_id == items[7].file_id == "short"
    assert (items[1].start, items[1].end) == (5.0, 20.0)
    assert items[1].caption == "five to twenty" and items[1].captions == ("five to twenty", "a second caption")
    assert items[2].captions == ("overlapping", "another")  # `caption` first, then the list
    assert items[3].captions == ("too short for --min-duration 2",)


def test_segment_frames_lie_inside_the_segment_and_are_the_nearest_frames(manifest):
    items = list_inputs(videos=str(manifest))
    for item in items:
        if item.video_id not in GOOD:
            continue
        lo, hi = GOOD[item.video_id]
        video = load_frames(item, 6, 32, min_duration=2.0)
        assert np.all(video.timestamps >= lo) and np.all(video.timestamps <= hi), item.video_id
        # uniform over [lo, hi] with the whole-video rule: the frame nearest each segment centre
        targets = lo + (np.arange(6) + 0.5) * (hi - lo) / 6
        np.testing.assert_allclose(video.timestamps, np.round(targets * FPS) / FPS, atol=1e-6)
        assert [frame_index(f) for f in video.frames] == np.round(video.timestamps * FPS).astype(int).tolist()
        assert video.duration == pytest.approx(hi - lo)


@pytest.mark.parametrize("seek", ["exact", "keyframe"])
def test_one_pass_decodes_the_same_frames_as_one_open_per_segment(manifest, seek):
    items = [it for it in list_inputs(videos=str(manifest)) if it.path.endswith("long.mp4")]
    together = load_file_frames(items, decoding(seek))
    for item, got in zip(items, together, strict=True):
        try:
            alone = load_frames(item, 6, 32, min_duration=2.0, seek=seek)
        except Exception as e:  # the same refusal, with the same reason
            assert str(got) == str(e), item.video_id
            continue
        np.testing.assert_array_equal(got.frames, alone.frames)
        np.testing.assert_array_equal(got.timestamps, alone.timestamps)
    reasons = {it.video_id: str(r) for it, r in zip(items, together, strict=True) if isinstance(r, Exception)}
    assert reasons == {"long#12.5-13.5": "too short: 1.0 s < 2 s",
                       "long#50-70": "segment outside the file: 50-70 s of a 60.0 s video",
                       "long#30-30": "bad segment: end 30 s <= start 30 s"}


def test_a_whole_video_decodes_exactly_as_before(clips):
    item = VideoInput(video_id="long", source="s", caption="c", path=str(clips / "long.mp4"))
    video = load_frames(item, 6, 32)
    np.testing.assert_allclose(video.timestamps, np.round((np.arange(6) + 0.5) * 10 * FPS) / FPS)
    assert video.duration == pytest.approx(60.0)


def test_a_files_rows_go_to_one_worker_and_come_back_in_slot_order(manifest, clips):
    items = list_inputs(videos=str(manifest))
    todo = [(slot, it) for slot, it in enumerate(items)]
    assert file_groups(todo, window=16) == [[0, 1, 2, 3, 4, 5, 8], [6, 7]]
    assert file_groups(todo, window=3) == [[0, 1, 2], [3, 4, 5], [6, 7], [8]]  # rows further apart: another open
    results = list(decoded_in_order(InlineExecutor(), todo[1:], window=4, decoding=decoding()))
    assert [slot for slot, _, _ in results] == list(range(1, len(items)))
    for slot, item, result in results:
        assert item is items[slot]
        if item.video_id in GOOD:
            np.testing.assert_array_equal(result.frames, load_frames(item, 6, 32, min_duration=2.0).frames)
        else:
            assert isinstance(result, str)


def test_a_file_cut_short_keeps_the_segments_before_the_cut(tmp_path):
    # Matroska: a cut mp4 is refused on open (its box sizes say so), a cut mkv only when frames end.
    data = write_video(tmp_path / "long.mkv", draw_index, FPS * SECONDS, fps=FPS, gop=25).read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    items = [VideoInput(video_id=f"cut#{a}", source="s", caption="c", path=str(cut), start=a, end=a + 5.0)
             for a in (1.0, 50.0)]
    first, last = load_file_frames(items, decoding())
    np.testing.assert_array_equal(first.frames, load_frames(items[0], 6, 32).frames)
    assert isinstance(last, Exception) and str(last).startswith("truncated")


@pytest.mark.parametrize("faststart", [True, False], ids=["index-first", "index-last"])
def test_an_mp4_cut_short_keeps_the_segments_before_the_cut_if_its_index_is_first(tmp_path, faststart):
    """Cut with head -c. Index first (faststart): ffmpeg decodes the frames before the cut, so do we; index
    last: the cut took the index (ffmpeg decodes nothing either), so every row fails, saying so."""
    whole = write_video(tmp_path / "whole.mp4", draw_index, FPS * 30, fps=FPS, gop=25, faststart=faststart)
    cut = tmp_path / "cut.mp4"
    with open(cut, "wb") as f:
        subprocess.run(["head", "-c", str(whole.stat().st_size // 2), str(whole)], stdout=f, check=True)
    items = [VideoInput(video_id=f"cut#{a}", source="s", caption="c", path=str(cut), start=a, end=b)
             for a, b in ((1.0, 6.0), (2.0, 9.0), (20.0, 29.0), (None, None))]
    results = load_file_frames(items, decoding())
    if not faststart:
        assert all(str(r).startswith("truncated: 'mdat' box ends at byte") and "index ('moov') is lost" in str(r)
                   for r in results), results
        return
    for item, result in zip(items[:2], results, strict=False):
        reference = load_frames(dataclasses.replace(item, path=str(whole)), 6, 32)
        np.testing.assert_array_equal(result.frames, reference.frames)
        np.testing.assert_array_equal(result.timestamps, reference.timestamps)
    for result in results[2:]:  # past the cut, and the whole file (its frames span the cut)
        assert isinstance(result, Exception) and str(result).startswith("truncated: "), result
        assert " of 30.0 s" in str(result)


@pytest.fixture(scope="module")
def segment_store(manifest, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("segstore") / "seg.zarr"
    proc = subprocess.run([sys.executable, str(ROOT / "precompute.py"), "--out", str(out), "--videos", str(manifest),
                           "--preset", "tiny", "--image-size", "28", "--num-frames", "6", "--shard-videos", "4",
                           "--min-duration", "2", "--workers", "1", "--batch-videos", "1", "--quiet"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, env=OFFLINE)
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.mark.slow  # precompute.py in new processes
def test_a_rerun_after_a_stop_gives_the_arrays_of_an_uninterrupted_run(segment_store, tmp_path):
    """A run stopped before its second shard was published (its `committed` object, written last, absent;
    one video per encoder batch as in the reference, so the bytes can agree), then run again."""
    reference, proc = segment_store
    out = Path(shutil.copytree(reference, tmp_path / "stopped.zarr"))
    (out / "committed" / "c" / "1").unlink()
    (out / "dino" / "c" / "1" / "0" / "0" / "0").unlink()
    rerun = subprocess.run(proc.args[:3] + [str(out)] + proc.args[4:], capture_output=True, text=True, cwd=ROOT,
                           timeout=300, env=OFFLINE)
    assert rerun.returncode == 0, rerun.stderr
    assert "written 2 videos, skipped 5 already in the store, 2 failed" in rerun.stdout
    objects = {str(f.relative_to(reference)): f.read_bytes() for f in reference.glob("*/c/**/*") if f.is_file()}
    assert objects == {str(f.relative_to(out)): f.read_bytes() for f in out.glob("*/c/**/*") if f.is_file()}


@pytest.mark.slow  # precompute.py in new processes
def test_kill_9_then_rerun_equals_an_uninterrupted_run(clips, tmp_path):
    """A real SIGKILL mid-run on segment rows with caption lists (27 rows, 9 shards), then the same command."""
    rows = [{**row, "video_id": f"r{k}-{i}"} for k in range(3) for i, row in enumerate(ROWS)]
    listing = clips / "kill.jsonl"
    listing.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def command(out: Path) -> list[str]:
        return [sys.executable, str(ROOT / "precompute.py"), "--out", str(out), "--videos", str(listing),
                "--preset", "tiny", "--image-size", "28", "--num-frames", "6", "--shard-videos", "3",
                "--min-duration", "2", "--workers", "0", "--batch-videos", "1", "--quiet"]

    reference = tmp_path / "uninterrupted.zarr"
    subprocess.run(command(reference), check=True, capture_output=True, cwd=ROOT, timeout=300, env=OFFLINE)
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen(command(out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=OFFLINE)
    markers = out / "committed" / "c"  # one object per published shard
    deadline = time.time() + 120
    while time.time() < deadline and not (markers.exists() and sum(n.isdigit() for n in os.listdir(markers)) >= 2):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    published = sum(n.isdigit() for n in os.listdir(markers))
    assert 2 <= published < 9, f"the kill came too late to test anything ({published} of 9 shards)"
    rerun = subprocess.run(command(out), capture_output=True, text=True, cwd=ROOT, timeout=300, env=OFFLINE)
    assert rerun.returncode == 0, rerun.stderr
    objects = {str(f.relative_to(reference)): f.read_bytes() for f in reference.glob("*/c/**/*") if f.is_file()}
    assert objects == {str(f.relative_to(out)): f.read_bytes() for f in out.glob("*/c/**/*") if f.is_file()}
    assert FeatureStore.open(out).read(1)["captions"] == ["five to twenty", "a second caption"]


@pytest.mark.slow  # precompute.py in new processes
def test_precompute_of_segments_writes_the_good_ones_and_records_the_bad(segment_store):
    out, proc = segment_store
    assert "written 6 videos, skipped 0 already in the store, 3 failed" in proc.stdout
    store = FeatureStore.open(out)
    rows = {store.read(i)["video_id"]: store.read(i) for i in range(len(store))}
    assert set(rows) == set(GOOD)
    for video_id, (lo, hi) in GOOD.items():
        ts = rows[video_id]["timestamps"]
        assert np.all(ts >= lo) and np.all(ts <= hi), video_id
    assert rows["long#5-20"]["caption"] == "five to twenty"
    reasons = {f["video_id"]: f["reason"] for f in store.failures}
    assert reasons == {"long#12.5-13.5": "too short: 1.0 s < 2 s",
                       "long#50-70": "segment outside the file: 50-70 s of a 60.0 s video",
                       "long#30-30": "bad segment: end 30 s <= start 30 s"}
    report = inspect_store(str(out))
    assert report["slots"] == {"total": 9, "committed": 6, "failed": 3, "pending": 0}
    assert {g["reason"]: g["count"] for g in report["failures"]} == {
        "too short": 1, "segment outside the file": 1, "bad segment": 1}


@pytest.mark.slow  # precompute.py in new processes
def test_the_split_never_separates_two_segments_of_one_file(segment_store):
    path = segment_store[0]
    store = FeatureStore.open(path)
    assert "file_id" in store.arrays  # format 3 records each row's file
    slots = store.committed_slots()
    file_of = dict(zip(slots.tolist(), store.file_ids(slots), strict=True))
    assert sorted(file_of.values()) == ["long"] * 4 + ["short"] * 2
    video_ids = store.read_strings("video_id", slots)
    mixed, leaky = 0, 0
    for fraction in np.linspace(0.05, 0.95, 19):
        train, val, val_ids = split_slots(store, fraction)
        assert not {file_of[s] for s in train.tolist()} & {file_of[s] for s in val.tolist()}
        assert sorted(val_ids) == sorted(store.read_strings("video_id", val))
        mixed += bool(len(train) and len(val))
        # what a split by segment would do: some file on both sides
        by_segment = validation_mask(video_ids, fraction)
        files = [file_of[s] for s in slots.tolist()]
        leaky += any(len({m for m, f in zip(by_segment, files, strict=True) if f == name}) == 2 for name in files)
    assert mixed and leaky  # both sides used, and a split by segment would have leaked


def test_the_split_of_whole_videos_is_the_split_by_video_id(tmp_path):
    store = small_store(tmp_path / "whole.zarr", [f"video-{i:03d}" for i in range(40)], failures={3: "too short"})
    slots = store.committed_slots()
    ids = store.read_strings("video_id", slots)
    assert store.file_ids(slots) == ids
    train, val, val_ids = split_slots(store, 0.3)
    mask = validation_mask(ids, 0.3)
    np.testing.assert_array_equal(val, slots[mask])
    np.testing.assert_array_equal(train, slots[~mask])
    assert val_ids == [v for v, m in zip(ids, mask, strict=True) if m] and 0 < len(val) < 39


@pytest.mark.slow  # a new interpreter (the benchmark pins itself to one core)
def test_the_segment_benchmark_measures_both_ways_on_the_same_frames(tmp_path):
    """`python -m bench.segments` at its smallest: segments spread over a generated file, decoded both ways (one
    open per segment, one pass for all), with the same frames and timestamps (the script checks every repeat)."""
    proc = subprocess.run([sys.executable, "-m", "bench.segments", "--minutes", "0.2", "--size", "64x36",
                           "--segments", "3", "--num-frames", "4", "--image-size", "32", "--repeats", "1",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**OFFLINE, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in ("### 3 segments", "| exact |", "| keyframe |", "same frames and timestamps both ways: yes"):
        assert text in proc.stdout, proc.stdout
