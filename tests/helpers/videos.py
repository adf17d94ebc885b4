"""Small real video files written with PyAV: flat colours that spell the frame index (the counter video), a
circle between bars (crop vs squash), any `draw(i)` through `write_video`."""

from __future__ import annotations

import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

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
    faststart: bool = False,
) -> Path:
    """Encode ``draw(i)`` (uint8 RGB [H, W, 3], even H and W) for i < num_frames; return the path.

    ``gop`` is the keyframe interval in frames, so tests can exercise seeking (short gop) and
    long forward decoding (one keyframe). ``sar`` marks the pixels as non-square (anamorphic).
    ``faststart``: an MP4's index (its 'moov' box) before the frames, as streaming sites serve them.
    """
    first = draw(0)
    height, width = first.shape[:2]
    with av.open(str(path), mode="w", options={"movflags": "faststart"} if faststart else {}) as container:
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
