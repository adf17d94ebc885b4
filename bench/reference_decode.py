"""Today's exact decoder, the reference the GOP-planned one is checked against.

`ReferenceVideoFile(path).frames_at(targets, image_size)` is `fvlm_data.video.decode.VideoFile.frames_at`
without GOP-planned decoding (fvlm_data/video/gops.py; `VideoFile(..., plan_gops=False)`): the full path, as it
was before, which decodes every frame from the keyframe before each target on. tests/test_video_gops.py and
`python -m bench.precompute_speed --part decode` compare the two frame for frame.
"""

from __future__ import annotations

from fvlm_data.video.decode import VideoFile


def ReferenceVideoFile(src: str | bytes, threads: bool = False) -> VideoFile:
    return VideoFile(src, threads=threads, plan_gops=False)
