"""Phone videos stand upright (issue 18 pt 5): clips stored turned, with a display rotation, decode like the upright
source, portrait and landscape, exact and keyframe seeking; checked against ffmpeg's own player where it is
installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest

from fvlm_data.video.decode import VideoFile, sample_timestamps

SIZE = 32


def upright(height: int, width: int) -> np.ndarray:
    """Four flat quadrants (red, green, blue, white): any turn or flip moves a colour to another corner, and a crop
    on the wrong axis changes how much of each is kept. A dark bar along the long side's first quarter tells a
    wrong-axis crop apart too."""
    img = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    img[:h, :w], img[:h, w:], img[h:, :w], img[h:, w:] = (220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 220)
    if height > width:
        img[: height // 8] //= 4
    else:
        img[:, : width // 8] //= 4
    return img


def write_clip(path: Path, picture: np.ndarray, rotation: int = 0, frames: int = 6) -> Path:
    """`picture` stored turned clockwise by `rotation` degrees, with a display matrix that turns it back
    (counter-clockwise `rotation`): what a phone writes for a video it filmed upright."""
    stored = np.ascontiguousarray(np.rot90(picture, -(rotation // 90)))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.height, stream.width = stored.shape[:2]
        stream.pix_fmt, stream.gop_size = "yuv420p", 2
        stream.options = {"crf": "1", "preset": "ultrafast", "sc_threshold": "0"}
        if rotation:
            stream.set_display_rotation(rotation)
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def off(frames: np.ndarray, reference: np.ndarray) -> float:
    """Share of pixels far (> 40 levels) from the reference's: chroma subsampling blurs the quadrants' edges
    differently in a turned picture (about 5% of the pixels at 32 px), a turned or wrongly cropped picture
    moves most of them."""
    return float((np.abs(frames - reference).max(-1) > 40).mean())


def decode(path: Path, keyframes: bool = False) -> np.ndarray:
    with VideoFile(str(path)) as video:
        targets = sample_timestamps(video.duration, 3)
        frames, _ = (video.keyframes_at if keyframes else video.frames_at)(targets, SIZE)
    return frames.astype(np.float32)


@pytest.mark.parametrize("shape", [(64, 48), (48, 64)], ids=["portrait", "landscape"])
@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotated_clips_decode_upright(tmp_path, shape, rotation):
    picture = upright(*shape)
    reference = decode(write_clip(tmp_path / "upright.mp4", picture))
    turned = write_clip(tmp_path / "turned.mp4", picture, rotation)
    for keyframes in (False, True):
        frames = decode(turned, keyframes)
        assert off(frames, reference) < 0.1, f"rotation {rotation}: not upright"
    # The same clip without its display matrix is visibly turned: the check above can fail.
    with av.open(str(turned)) as container:
        assert next(container.decode(video=0)).rotation % 360 == rotation
    unrotated = np.rot90(picture, -(rotation // 90))
    wrong = decode(write_clip(tmp_path / "plain.mp4", np.ascontiguousarray(unrotated)))
    assert off(wrong, reference) > 0.9


@pytest.mark.slow  # the ffmpeg command line
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg command line")
@pytest.mark.parametrize("rotation", [90, 270])
def test_upright_as_ffmpeg_plays_it(tmp_path, rotation):
    """ffmpeg turns a clip by its display matrix when it decodes (autorotate); our frames are its frames."""
    turned = write_clip(tmp_path / "turned.mp4", upright(64, 48), rotation)  # portrait, stored landscape
    played = tmp_path / "played.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(turned), "-c:v", "libx264", "-crf", "1",
                    "-preset", "ultrafast", str(played)], check=True, timeout=60)
    with av.open(str(played)) as container:
        assert next(container.decode(video=0)).height == 64  # ffmpeg shows it portrait
    assert off(decode(turned), decode(played)) < 0.1
